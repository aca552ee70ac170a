"""What Transfusion's and Chameleon's LightningModules share: a tokenizer, a frozen autoencoder, the network
(``model``), FLOP accounting, the optimiser, validation and test losses, and generation with the module's own
settings.

A subclass builds ``tokenizer``, ``autoencoder`` (a frozen autoencoder LightningModule), ``config`` (its network's),
``optim`` (an ``OptimizerConfig``), ``sampling`` (its ``SamplingOptions``, by ``set_sampling``) and ``flop_counter``
(``network_flop_counter``) in ``__init__``, names its ``network_class``, ``generator_class``, the
``image_sampling_fields`` that say how images are sampled and the ``eval_loss_names`` its ``_common_step`` adds to
``eval_losses``, and provides ``patches_per_image``, ``text_logits`` and ``eval_figures``. It gets:

* ``model``: the network, built once in ``configure_model`` (on the meta device, sharded per block under
  ``ModelParallelStrategy`` and given its weights from the seed alone under a Trainer; plainly without one), or on
  first use;
* ``val/*`` and ``test/*`` logged at the end of each epoch from ``eval_losses``: means over every target of the
  epoch and every process (``transfusion.lightning.eval_losses``);
* ``generator(sampling, **overrides)``: the model's generator with ``sampling`` or the module's (``transfusion.generation``);
* ``generate_images(captions, seeds, sampling)`` / ``generate_captions(images, seeds, sampling)``: shortcuts;
* ``predict_step`` for ``transfusion predict`` prompt records, ``configure_optimizers``;
* ``training_flops()``, ``sampling_summary()`` and ``report_fields()`` for evaluation reports, ``generation_seed``,
  ``max_seq_len``, ``trained_steps`` after loading a checkpoint;
* ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (``transfusion.lightning.hub``);
* outside ``fit``, a checkpoint's EMA weights (``transfusion.lightning.ema``) as the module option ``eval_weights``
  says; ``weights_source`` names the weights held ("raw" or an EMA's name).

Legend: B rows, L length, N images, P selected positions, V vocabulary.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, replace

import lightning as L
import torch

from transfusion.data.rows.sequences import SequenceLayout
from transfusion.data.sources.latent_cache import autoencoder_fingerprint
from transfusion.errors import UserError, check_checkpoint_file, user_error
from transfusion.flops import FlopCounter, attention_width, flop_parameters
from transfusion.generation.options import SamplingOptions, legacy_fields, sampling_options
from transfusion.lightning.autoencoder import rename_legacy_keys
from transfusion.lightning.ema import select_weights
from transfusion.lightning.eval_losses import EvalLosses
from transfusion.lightning.flops import FlopAccounting
from transfusion.lightning.hub import HubMixin
from transfusion.lightning.parallel import fully_shard_blocks

# the frozen autoencoder stays in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class GenerativeModule(FlopAccounting, HubMixin, L.LightningModule):
    network_class: type  # the pure-PyTorch network, built from ``config``
    generator_class: type
    image_sampling_fields: tuple[str, ...] = ()
    eval_loss_names: tuple[str, ...] = ()  # the means ``eval_losses`` keeps
    PROGRESS_BAR = ("loss", "lm_loss", "ddpm_loss", "image_loss")  # shown in the progress bar when logged

    def __init__(self):
        super().__init__()
        self.eval_losses = EvalLosses(list(self.eval_loss_names))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, with a checkpoint that cannot be read or does not fit (another class, missing arguments,
        weights of other shapes) a UserError naming the file."""
        check_checkpoint_file(checkpoint_path)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except Exception as error:
            if user_error(error) is not None:  # names the file, or the fields that differ
                raise
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:500]
            raise UserError(f"checkpoint {checkpoint_path} cannot be loaded as a {cls.__name__} ({reason})") from error

    @property
    def patches_per_image(self) -> int:
        """n: the sequence positions one image takes (patches or codes)."""
        raise NotImplementedError

    def text_logits(self, tokens: torch.Tensor, doc_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (P, V) at the ``at`` (B, L) positions of text-only rows (B, L), for perplexity."""
        raise NotImplementedError

    def eval_figures(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``val/*`` / ``test/*`` figures (name -> value) from the epoch's ``eval_losses`` means."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the network
    @property
    def model(self) -> torch.nn.Module:
        """The network; built here (unsharded) if no Trainer has called ``configure_model`` yet."""
        if "model" not in self._modules:
            self.configure_model()
        return self._modules["model"]

    def configure_model(self) -> None:
        if "model" in self._modules:  # called again by a later fit/validate, or after first use
            return
        if self._trainer is None:  # direct use, or load_from_checkpoint (whose weights replace these)
            model = self.network_class(self.config)
        else:  # under a Trainer: the same weights under every strategy (from seed_everything's seed)
            with torch.device("meta"):  # no memory until the weights are sharded (FSDP2) or placed
                model = self.network_class(self.config)
            if self.device_mesh is not None:
                self.before_sharding(model)
                fully_shard_blocks(model, self.device_mesh)
            model.to_empty(device=self.trainer.strategy.root_device)
            model.init_weights(torch.initial_seed())
        self.model = model
        self.network_built(model)

    def before_sharding(self, model: torch.nn.Module) -> None:
        """Changes to the network's parameters that FSDP2 must see (it shards the parameters present)."""

    def network_built(self, model: torch.nn.Module) -> None:
        """Set up the network once built and holding its initial weights (before ``configure_optimizers``)."""

    def network_flop_counter(self) -> FlopCounter:
        """The FLOP counter of ``config``'s network: N (``flop_parameters``) counted without building the weights."""
        with torch.device("meta"):
            params = flop_parameters(self.network_class(self.config))
        return FlopCounter(params, self.config.transformer.n_layers, attention_width(self.config.transformer))

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the network takes (RoPE positions)."""
        return self.config.transformer.max_seq_len

    # ------------------------------------------------------------------ validation and test losses
    def _log_eval(self, stage: str) -> None:
        for name, value in self.eval_figures(self.eval_losses.compute()).items():  # on every process: it synchronises
            self.log(f"{stage}/{name}", value, prog_bar=name in self.PROGRESS_BAR)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ------------------------------------------------------------------ the frozen autoencoder and the rows
    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    @functools.cached_property
    def autoencoder_fingerprint(self) -> str:
        """Hash of the frozen autoencoder's weights (checked against latent caches), computed once."""
        return autoencoder_fingerprint(self.autoencoder)

    def sequence_layout(self) -> SequenceLayout:
        return SequenceLayout(self.tokenizer, self.patches_per_image, self.autoencoder.config.image_size,
                              autoencoder_fingerprint=self.autoencoder_fingerprint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rename_legacy_keys(checkpoint.get("state_dict", {}), "autoencoder.")
        if self._trainer is None or self.trainer.state.fn != "fit":  # fit resumes from the raw weights
            self.weights_source = select_weights(checkpoint, self.hparams.get("eval_weights", "ema"))
        super().on_load_checkpoint(checkpoint)  # FlopAccounting
        self.trained_steps = int(checkpoint.get("global_step", 0))  # for evaluation reports (validate/test)

    def configure_optimizers(self):
        return self.optim.configure(self.model.parameters(), self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------ generation
    def set_sampling(self, options_class: type, sampling, args: dict) -> None:
        """``self.sampling`` from the ``sampling`` argument and the deprecated flat ones in ``args`` (the
        constructor's locals); hparams keep the group only, so checkpoints hold one ``sampling`` dict."""
        legacy = {name: args[name] for name in legacy_fields(options_class) if name in args}
        self.sampling = sampling_options(options_class, sampling, legacy, type(self).__name__)
        self.hparams["sampling"] = asdict(self.sampling)

    def generator(self, sampling: SamplingOptions | None = None, **overrides):
        """The model's generator with ``sampling`` (default: the module's), ``overrides`` replaced; prompt i is
        seeded ``generation_seed + i`` unless ``generate`` is given seeds."""
        return self.generator_class(self.model, self.autoencoder.model, self.tokenizer,
                                    replace(sampling or self.sampling, **overrides), seed=self.generation_seed)

    @property
    def generation_seed(self) -> int:
        """Prompt i of a generation is seeded ``generation_seed + i``."""
        return self.hparams.generation_seed

    def generate_images(self, captions: list[str], seeds: list[int] | None = None,
                        sampling: SamplingOptions | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] for N captions, with ``sampling`` (default: the module's)."""
        return self.generator(sampling).generate_images(captions, seeds)

    def generate_captions(self, images, seeds: list[int] | None = None,
                          sampling: SamplingOptions | None = None) -> list[str]:
        """Text for each image ((N, 3, H, W) in [-1, 1] or PIL RGB), with ``sampling`` (default: the module's)."""
        return self.generator(sampling).generate_captions(images, seeds)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """Generate for prompt records (``transfusion.data.rows.prompts``); each gets its ``output`` segments."""
        outputs = self.generator().generate(
            [r["prompt"] for r in batch], seeds=[self.generation_seed + r["index"] for r in batch],
            max_new_tokens=[r.get("max_new_tokens") for r in batch])
        return [{**record, "output": output} for record, output in zip(batch, outputs)]

    # ------------------------------------------------------------------ reports
    def training_flops(self) -> dict:
        """``{params, tokens, flops (6ND), attention_pairs, exact_flops}`` of the training so far."""
        return self.flop_counter.summary()

    def report_fields(self, sampling: SamplingOptions | None = None) -> dict:
        """What an evaluation report (``transfusion.evaluation.report``) says of this module: its class, the weights
        held, the tokenizer, ``sampling_summary(sampling)``, ``training_flops()`` and the optimizer steps behind the
        weights (the Trainer's in fit, the checkpoint's in validate / test)."""
        steps = self._trainer.global_step if self._trainer is not None else 0
        return {"model": type(self).__name__, "weights": getattr(self, "weights_source", "raw"),
                "tokenizer": str(self.hparams.get("tokenizer")), "sampling": self.sampling_summary(sampling),
                "flops": self.training_flops(), "training_steps": steps or getattr(self, "trained_steps", 0)}

    def sampling_summary(self, sampling: SamplingOptions | None = None) -> dict:
        s = sampling or self.sampling
        return {**{name: getattr(s, name) for name in self.image_sampling_fields},
                "cfg_scale": s.cfg_scale,
                "caption_decoding": "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top_p {s.top_p}"}
