"""An exponential moving average (EMA) of the network's weights, for sampling and evaluation (DiT, BAGEL: 0.9999).

``EMA`` is a callback (``trainer.callbacks`` in YAML, or ``transfusion quickstart --ema 0.999``). After the optimizer
step ``start_step`` it copies the trainable weights of ``pl_module.model``; every ``every_n_steps`` steps after that,
update n (0, 1, ...) moves the copy towards the weights:

    ema <- d_n * ema + (1 - d_n) * weights,   d_n = min(decay, (1 + n) / (10 + n))  (``warmup``; else d_n = decay)

so that a short run is not dominated by its first weights. Several EMAs (one per ``name``) may be tracked at once.

Which weights are used where:

* during ``fit``, validation (losses, ``Evaluation``) runs on the first EMA's weights (``ema_weights`` swaps
  them in and back, bit for bit); after ``fit`` the module holds them (as Lightning's ``WeightAveraging``);
* a checkpoint keeps the raw weights in ``state_dict`` (resuming, ``init_from``, ``consolidate`` read them) and
  each EMA's under ``checkpoint["ema"][name]``; ``--ckpt_path last`` restores both bit for bit;
* loading a checkpoint outside ``fit`` (``validate``, ``test``, ``predict``, ``load_from_checkpoint``,
  ``transfusion export``) takes the first EMA's weights unless the module option ``eval_weights`` says ``raw``
  or another EMA's name (``select_weights``).

Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` (2.6) are not used: they deep-copy the whole
LightningModule (the frozen autoencoder too), allow one instance (one state key, and each would rewrite
``state_dict``), have no decay warm-up, put the averaged weights in ``state_dict`` and copy them over the raw ones
when ``fit`` ends, so a ``last.ckpt`` written then resumes from the average, and build the average outside
the strategy (unsharded under FSDP2).
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


def ema_decay(update: int, decay: float, warmup: bool = True) -> float:
    """d_n of update n (0-based): ``min(decay, (1 + n) / (10 + n))`` with warm-up, else ``decay``."""
    return min(decay, (1 + update) / (10 + update)) if warmup else decay


class EMA(Callback):
    """An EMA of the trainable weights of ``pl_module.model``; see this file's docstring."""

    def __init__(self, decay: float = 0.9999, warmup: bool = True, start_step: int = 0, every_n_steps: int = 1,
                 name: str | None = None):
        """
        Args:
            decay: the largest decay (DiT: 0.9999; with about 1 / (1 - decay) updates of memory, pick a decay
                whose memory is a fraction of the run: 0.999 for a few thousand steps).
            warmup: d_n = min(decay, (1 + n) / (10 + n)) for update n.
            start_step: the optimizer step after which the average starts (a copy of the weights then).
            every_n_steps: update every this many optimizer steps (d_n applies per update).
            name: the key in checkpoints and for ``eval_weights`` (default ``ema_<decay>``, e.g. ``ema_0.9999``).
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA(decay={decay}) must be in [0, 1)")
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(f"EMA(start_step={start_step}, every_n_steps={every_n_steps}): need start_step >= 0 "
                             "and every_n_steps >= 1")
        self.decay, self.warmup, self.start_step, self.every_n_steps = decay, warmup, start_step, every_n_steps
        self.name = name or f"ema_{decay:g}"
        if self.name in ("ema", "raw"):
            raise ValueError(f"EMA(name={self.name!r}): 'ema' and 'raw' are reserved by eval_weights")
        self.updates = 0  # n: updates made since the copy
        self.last_step = -1  # the optimizer step of the copy or of the last update
        self.weights: dict[str, torch.Tensor] | None = None  # "model.<parameter>" -> the averaged (or, swapped, raw)
        self.swapped = False  # the module holds the average and ``weights`` the raw weights
        self._entered_for_validation = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ the average
    @staticmethod
    def parameters(pl_module) -> dict[str, torch.Tensor]:
        """The averaged tensors: trainable parameters of the network, by their names in the module's state_dict."""
        return {f"model.{n}": p for n, p in pl_module.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def step(self, trainer, pl_module) -> None:
        """Copy or update for the current optimizer step, once (called after each step, and before evaluations)."""
        step = trainer.global_step
        if step == self.last_step or step < self.start_step or self.swapped:
            return
        params = self.parameters(pl_module)
        if self.weights is None:
            self.weights = {k: p.detach().clone() for k, p in params.items()}
            self.updates, self.last_step = 0, step
            if step > self.start_step:
                rank_zero_info(f"{self.name}: starts at step {step} from the current weights (none saved before)")
            return
        if (step - self.start_step) % self.every_n_steps:
            return
        d = ema_decay(self.updates, self.decay, self.warmup)
        names = list(self.weights)
        torch._foreach_lerp_([self.weights[k] for k in names], [params[k].detach() for k in names], 1.0 - d)
        self.updates, self.last_step = self.updates + 1, step

    @torch.no_grad()
    def swap(self, pl_module) -> None:
        """Exchange the module's weights with ``weights`` (exact copies both ways)."""
        for key, param in self.parameters(pl_module).items():
            held = param.detach().clone()
            param.detach().copy_(self.weights[key])
            self.weights[key].copy_(held)
        self.swapped = not self.swapped
        pl_module.weights_source = self.name if self.swapped else "raw"  # named in evaluation reports

    def averaged_and_raw(self, pl_module) -> tuple[dict, dict]:
        """(averaged, raw) weights, wherever each is held now."""
        held = self.parameters(pl_module)
        return (held, self.weights) if self.swapped else (self.weights, held)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
            raise ValueError(f"EMA ({self.name}) keeps a whole copy of the weights on every process and cannot be "
                             f"sharded: remove it from trainer.callbacks with {type(trainer.strategy).__name__}, or "
                             "train with a single-device or ddp strategy")
        names = [c.name for c in trainer.callbacks if isinstance(c, EMA)]
        if len(set(names)) < len(names):
            raise ValueError(f"EMA callbacks need distinct names (set EMA(name=...)); got {names}")
        from transfusion.lightning.generative import GenerativeModule

        if not isinstance(pl_module, GenerativeModule):
            raise ValueError(f"EMA averages the network of a TransfusionModule or ChameleonModule, not of a "
                             f"{type(pl_module).__name__}")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.swapped:  # a second fit of the same module: continue from the raw weights
            self.swap(pl_module)
        if self.weights is not None:  # loaded from a checkpoint (on the CPU)
            params = self.parameters(pl_module)
            missing = set(params) ^ set(self.weights)
            if missing:
                raise ValueError(f"the checkpoint's {self.name} does not fit the network: {sorted(missing)[:5]}")
            self.weights = {k: v.to(device=params[k].device, dtype=params[k].dtype) for k, v in self.weights.items()}
        self.step(trainer, pl_module)  # the copy, when start_step is the first step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if _select_callback(trainer, pl_module) is self:
            self._enter(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._entered_for_validation:
            self._exit(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        """The module leaves ``fit`` with the chosen EMA's weights (``save_pretrained``, sampling); the raw ones stay
        here (``averaged_and_raw``) and in the last checkpoint."""
        if _select_callback(trainer, pl_module) is self and self.weights is not None:
            self.step(trainer, pl_module)
            self.swap(pl_module)

    def _enter(self, trainer, pl_module) -> None:
        self._entered_for_validation = False
        if self.weights is None or self.swapped:
            return
        self.step(trainer, pl_module)
        self.swap(pl_module)
        self._entered_for_validation = True

    def _exit(self, pl_module) -> None:
        self.swap(pl_module)
        self._entered_for_validation = False

    def state_dict(self) -> dict:
        return {"name": self.name, "decay": self.decay, "warmup": self.warmup, "start_step": self.start_step,
                "every_n_steps": self.every_n_steps, "updates": self.updates, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.updates, self.last_step = int(state_dict["updates"]), int(state_dict["last_step"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.weights is None:
            return
        averaged, raw = self.averaged_and_raw(pl_module)
        if self.swapped:  # the module holds the average: state_dict must still hold the raw weights
            checkpoint["state_dict"].update({k: v.detach().clone() for k, v in raw.items()})
        checkpoint.setdefault("ema", {})[self.name] = {k: v.detach().clone() for k, v in averaged.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get("ema", {}).get(self.name)
        self.weights, self.swapped = (None if saved is None else dict(saved)), False
        if saved is None:
            self.updates, self.last_step = 0, -1
            rank_zero_info(f"{self.name}: the checkpoint holds no such EMA; it starts from the loaded weights")


def _wanted(pl_module) -> str:
    return getattr(pl_module, "hparams", {}).get("eval_weights", "ema") or "ema"


@contextlib.contextmanager
def ema_weights(trainer, pl_module):
    """Run the block with the EMA weights the module option ``eval_weights`` names, in ``fit`` (a no-op when there
    is no EMA yet, when they are already in, or outside ``fit``, where loading chose the weights)."""
    ema = _select_callback(trainer, pl_module)
    if ema is None or ema.weights is None or ema.swapped or any(
            c.swapped for c in trainer.callbacks if isinstance(c, EMA)):
        yield
        return
    ema.step(trainer, pl_module)
    ema.swap(pl_module)
    try:
        yield
    finally:
        ema.swap(pl_module)


def _select_callback(trainer, pl_module) -> EMA | None:
    if trainer is None or trainer.state.fn != "fit":
        return None
    wanted = _wanted(pl_module)
    if wanted == "raw":
        return None
    emas = [c for c in trainer.callbacks if isinstance(c, EMA)]
    if wanted == "ema":
        return emas[0] if emas else None
    return next((c for c in emas if c.name == wanted), None)


def select_weights(checkpoint: dict, eval_weights: str = "ema") -> str:
    """Put the weights ``eval_weights`` names ("ema": the first EMA, "raw", or an EMA's name) into the
    checkpoint's ``state_dict`` (in place, before it is loaded outside ``fit``); the name of those weights."""
    saved = checkpoint.get("ema") or {}
    if eval_weights == "raw" or (eval_weights == "ema" and not saved):
        return "raw"
    name = next(iter(saved)) if eval_weights == "ema" else eval_weights
    if name not in saved:
        raise ValueError(f"eval_weights={eval_weights!r}: the checkpoint holds "
                         + (f"the EMAs {sorted(saved)}" if saved else "no EMA weights") + " (and 'raw')")
    checkpoint["state_dict"].update(saved[name])
    return name
