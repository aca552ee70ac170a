"""What Transfusion's and Chameleon's LightningModules share: a tokenizer, a frozen autoencoder, the network
(``model``), FLOP accounting, the optimiser, and generation with the module's own settings.

A subclass builds ``tokenizer``, ``autoencoder`` (a frozen autoencoder LightningModule), ``optim`` (an
``OptimizerConfig``), ``sampling`` (its ``SamplingOptions``, by ``set_sampling``) and ``flop_counter`` in ``__init__``, names its
``generator_class`` and the ``image_sampling_fields`` that say how images are sampled, and provides
``patches_per_image`` and ``text_logits``. It gets:

* ``generator(sampling, **overrides)``: the model's generator with ``sampling`` or the module's (``transfusion.generation``);
* ``generate_images(captions, seeds, sampling)`` / ``generate_captions(images, seeds, sampling)``: shortcuts;
* ``predict_step`` for ``transfusion predict`` prompt records, ``configure_optimizers``;
* ``training_flops()`` and ``sampling_summary()`` for reports, ``trained_steps`` after loading a checkpoint;
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
from transfusion.generation.options import SamplingOptions, legacy_fields, sampling_options
from transfusion.lightning.autoencoder import rename_legacy_keys
from transfusion.lightning.ema import select_weights
from transfusion.lightning.flops import FlopAccounting
from transfusion.lightning.hub import HubMixin

# the frozen autoencoder stays in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class GenerativeModule(FlopAccounting, HubMixin, L.LightningModule):
    generator_class: type
    image_sampling_fields: tuple[str, ...] = ()

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
                                    replace(sampling or self.sampling, **overrides), seed=self.hparams.generation_seed)

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
            [r["prompt"] for r in batch], seeds=[self.hparams.generation_seed + r["index"] for r in batch],
            max_new_tokens=[r.get("max_new_tokens") for r in batch])
        return [{**record, "output": output} for record, output in zip(batch, outputs)]

    # ------------------------------------------------------------------ reports
    def training_flops(self) -> dict:
        """``{params, tokens, flops (6ND), attention_pairs, exact_flops}`` of the training so far."""
        return self.flop_counter.summary()

    def sampling_summary(self, sampling: SamplingOptions | None = None) -> dict:
        s = sampling or self.sampling
        return {**{name: getattr(s, name) for name in self.image_sampling_fields},
                "cfg_scale": s.cfg_scale,
                "caption_decoding": "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top_p {s.top_p}"}
