"""LightningModule for Transfusion: a frozen autoencoder in front of the Transfusion model."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from transfusion.data.tokenizer import Tokenizer
from transfusion.errors import UserError, check_checkpoint_file
from transfusion.generation.options import UNSET, legacy_fields
from transfusion.generation import SamplingOptions, TransfusionGenerator
from transfusion.lightning.autoencoder import AutoencoderModule, load_frozen, rename_legacy_keys
from transfusion.lightning.checkpoint import check_config, flatten_config
from transfusion.lightning.generative import GenerativeModule
from transfusion.lightning.optim import OptimizerConfig
from transfusion.lightning.seeding import step_generator
from transfusion.lightning.text_model import check_text_options, load_text_model, text_model_settings
from transfusion.models.lmfusion import freeze_text_weights, is_text_weight
from transfusion.models.transfusion import Transfusion, TransfusionConfig
from transfusion.models.transformer import TransformerConfig
from transfusion.schedules import schedule_class

TIMESTEP_BUCKETS = 4  # the validation DDPM loss is also logged per quarter of the noise scale

# TransfusionConfig fields that define the weights; the others (lambda, masks, attention kernel) may change
ARCHITECTURE = ("transformer", "vocab_size", "latent_channels", "latent_size", "patch_size", "patch_encoder",
                "unet_channels", "num_timesteps", "objective")  # a flow model read as DDPM would sample noise


class TransfusionModule(GenerativeModule):
    """LightningModule for Transfusion: a frozen autoencoder in front of the Transfusion network.

    Args:
        tokenizer: path of the tokenizer: a SentencePiece model (``transfusion tokenizer`` trains one) or a Hugging
            Face ``tokenizer.json`` (its ``tokenizer_config.json`` beside it); None: the text model's.
        autoencoder: path of a trained ``AutoencoderModule`` checkpoint, or of a diffusers ``AutoencoderKL``
            folder (SD, SDXL, SD3, FLUX VAEs; ``{path: FOLDER, image_size: N}`` for images of another size than
            its ``sample_size``: ``transfusion.models.diffusers_vae``); kept frozen. (A dict of
            ``AutoencoderModule`` arguments builds an untrained one, for weights loaded afterwards:
            ``from_pretrained``.)
        preset: transformer size (``TRANSFORMER_PRESETS``: debug, cpu-small, cpu-base, 0.16B ... 7B); None: debug,
            or the text model's shape.
        transformer: overrides of the preset's ``TransformerConfig`` fields, e.g. ``{n_layers: 6}``.
        modality_experts: Mixture-of-Transformers (Liang et al. 2024): image positions get their own norms,
            attention projections and FFN in every block; attention stays global. The same FLOPs per position.
        objective: "ddpm" (the paper's noise prediction) or "flow" (rectified flow: velocity prediction, logit-normal
            timesteps, Euler sampler: set ``sampler: euler``).
        text_model: a pretrained Llama-layout text model (a Hugging Face folder: ``config.json``, safetensors,
            ``tokenizer.model`` or ``tokenizer.json``) whose weights start a fresh ``fit`` (LMFusion, Shi et al.
            2024); it sets the transformer's shape (``preset`` and ``transformer`` are not used) and, unless
            ``tokenizer`` is given, the tokenizer (special tokens appended). ``transformer`` then records the
            shape, and checkpoints and exports hold the weights: they load without the folder (but for its
            tokenizer, unless exported).
        freeze_text: keep the text weights fixed (embedding, LM head, the blocks' text weights): text-only outputs
            stay exactly the text model's. Needs ``modality_experts``, whose image weights train. The embedding
            and LM head rows of BOI, EOI and the specials appended to the tokenizer train (to start images).
        image_weights_from_text: the image weights start as copies of the text model's (LMFusion).
        text_lr: learning rate of the text weights (pretrained: ``text_model`` or ``init_from``) when they train;
            the other weights (image weights, patch layers) take ``lr``; the schedule scales both. None: ``lr``.
        patch_encoder: "linear" (with timestep embedding) or "unet" (down/up blocks).
        diffusion_lambda: weight of the DDPM loss (paper: 5).
        min_snr_gamma: weigh each image's epsilon MSE by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. 2023);
            None: the paper's plain MSE. On the embedded data gamma = 5 learns to follow captions several
            times faster (the plain MSE spends its gradient on fine detail at low noise). The logged
            ``ddpm_loss`` is then the weighted loss (the one trained); ``val/ddpm_loss_t*`` stay plain MSE.
        bidirectional_images: attention inside an image is bidirectional (paper) or causal (ablation).
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio`` (paper: 3e-4 -> 1.5e-5).
        sampling: generation settings (``transfusion.generation.SamplingOptions``: ``cfg_scale``, ``num_steps``,
            ``sampler``, ``max_new_tokens``, ...), in YAML one group ``sampling: {cfg_scale: 5, num_steps: 100}``;
            prompt i uses seed generation_seed + i. The same fields as flat arguments (``cfg_scale: 5``) are
            deprecated: mapped into ``sampling`` with a warning.
        noise_seed: the training noise and timesteps of a step are drawn from a generator seeded by
            (noise_seed, global step, batch index, rank): a resumed run draws what an uninterrupted one would.
        activation_checkpointing: recompute each transformer block in backward (less memory, ~1/3 more compute).
        compile: ``torch.compile`` each transformer block (GPU; on CPU it compiles slowly and gains little).
        init_from: a Transfusion checkpoint whose network weights start a new ``fit`` (fine-tuning, e.g. for image
            editing): the optimizer and schedule start afresh; the architecture and the autoencoder must match.
            A resumed fit (``--ckpt_path``) ignores it. It starts from the checkpoint's raw weights.
        eval_weights: with EMA callbacks (``transfusion.lightning.ema``), the weights that validation and
            evaluations use, and that a checkpoint loads outside ``fit`` (test, predict, export): "ema" (the
            first EMA), "raw", or an EMA's name (``ema_0.9999``).

    The network is built in ``configure_model`` (on the meta device and sharded per block under
    ``ModelParallelStrategy``, see ``transfusion.lightning.parallel``), or on first use of ``.model``.
    """

    network_class = Transfusion
    generator_class = TransfusionGenerator
    image_sampling_fields = ("sampler", "num_steps", "clip_x0", "image_cfg_scale")  # reported by evaluations
    eval_loss_names = ("lm_loss", "ddpm_loss", *(f"ddpm_bucket{k}" for k in range(TIMESTEP_BUCKETS)))

    def __init__(self, tokenizer: str | None, autoencoder: str | dict, preset: str | None = None, patch_size: int = 2,
                 patch_encoder: str = "linear", unet_channels: int = 64, diffusion_lambda: float = 5.0,
                 min_snr_gamma: float | None = None, bidirectional_images: bool = True, attention: str = "auto",
                 transformer: dict | None = None, modality_experts: bool = False, objective: str = "ddpm",
                 text_model: str | None = None, freeze_text: bool = False, image_weights_from_text: bool = True,
                 text_lr: float | None = None, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8,
                 weight_decay: float = 0.1, warmup_steps: int = 4000, min_lr_ratio: float = 0.05,
                 sampling: SamplingOptions | None = None, generation_seed: int = 0, noise_seed: int = 0,
                 activation_checkpointing: bool = False, compile: bool = False, init_from: str | None = None,
                 eval_weights: str = "ema",
                 # deprecated: the fields of ``sampling`` as flat arguments (earlier YAMLs and checkpoints)
                 cfg_scale: float | None = None, image_cfg_scale: float | None | Literal["unset"] = UNSET,
                 num_steps: int | None = None, sampler: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 clip_x0: float | None | Literal["unset"] = UNSET):
        """The arguments are described in the class's docstring."""
        super().__init__()
        # options first, files after: a bad option is reported before anything is read
        self.save_hyperparameters(ignore=legacy_fields(SamplingOptions))
        self.set_sampling(SamplingOptions, sampling, locals())
        self.optim = OptimizerConfig(lr, tuple(betas), eps, weight_decay, warmup_steps, min_lr_ratio, text_lr)
        schedule_class(objective).check_sampler(self.sampling.sampler)
        check_text_options(text_model, init_from, freeze_text, text_lr, modality_experts)
        if "modality_experts" in (transformer or {}):
            raise ValueError("set modality experts with model option modality_experts, not in transformer")
        text_vocab = 0
        if text_model is not None:  # the text model sets the shape; recorded in hparams for checkpoints and exports
            text = text_model_settings(text_model, tokenizer, preset, transformer)
            transformer = self.hparams.transformer = text.transformer
            tokenizer = self.hparams.tokenizer = text.tokenizer
            text_vocab = text.vocab_size
        if tokenizer is None:
            raise ValueError("model option tokenizer is required (tokenizer.model or tokenizer.json) unless text_model "
                             "is given")
        transformer_config = TransformerConfig.from_name(preset or "debug", **{**(transformer or {}),
                                                                     "modality_experts": modality_experts})
        self.tokenizer = Tokenizer(tokenizer)
        self.autoencoder = load_frozen(AutoencoderModule, autoencoder)
        ae_cfg = self.autoencoder.config
        self.config = TransfusionConfig(
            transformer=transformer_config,
            vocab_size=max(self.tokenizer.vocab_size, text_vocab), latent_channels=ae_cfg.latent_channels,
            latent_size=ae_cfg.latent_size, patch_size=patch_size, patch_encoder=patch_encoder,
            unet_channels=unet_channels, diffusion_lambda=diffusion_lambda, min_snr_gamma=min_snr_gamma,
            bidirectional_images=bidirectional_images, attention=attention, objective=objective,
        )
        self.flop_counter = self.network_flop_counter()  # N (body + patch layers) without building the weights

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # FlopAccounting
        if self.hparams.get("text_model") and "hyper_parameters" in checkpoint:  # its weights and shape are in here:
            checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "text_model": None}  # no folder needed
        checkpoint["transfusion_config"] = flatten_config(self.config)
        checkpoint["autoencoder_config"] = flatten_config(self.autoencoder.config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another architecture: a clear error naming the fields, not a shape mismatch."""
        if "transfusion_config" in checkpoint:
            check_config(checkpoint["transfusion_config"], self.config, "this Transfusion checkpoint", ARCHITECTURE)
        if "autoencoder_config" in checkpoint:
            check_config(checkpoint["autoencoder_config"], self.autoencoder.config, "the autoencoder in this checkpoint")
        super().on_load_checkpoint(checkpoint)

    def before_sharding(self, model: Transfusion) -> None:
        if self.hparams.freeze_text:  # its SpecialRows parameters must exist before FSDP2 shards
            freeze_text_weights(model, self.special_ids)

    def network_built(self, model: Transfusion) -> None:
        if self.hparams.freeze_text:  # before configure_optimizers, which takes the trainable parameters only
            trainable = freeze_text_weights(model, self.special_ids)
            rank_zero_info(f"text weights frozen: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
                           "parameters train")
        model.transformer.activation_checkpointing = self.hparams.activation_checkpointing
        if self.hparams.compile:
            for block in model.transformer.layers:
                block.compile()  # in place: parameter names and checkpoints stay the same

    @property
    def special_ids(self) -> list[int]:
        """Ids whose embedding and LM head rows train with frozen text weights: BOI, EOI and appended specials."""
        return sorted({self.tokenizer.boi_id, self.tokenizer.eoi_id, *self.tokenizer.appended_ids})

    def configure_optimizers(self):
        """AdamW over the network; with ``text_lr`` the text weights (``is_text_weight``) have groups of their own."""
        if self.hparams.text_lr is None:
            return super().configure_optimizers()
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if is_text_weight(n)], "lr": self.hparams.text_lr},
                  {"params": [p for n, p in named if not is_text_weight(n)]}]
        return self.optim.configure(groups, self.trainer.estimated_stepping_batches)

    @property
    def patches_per_image(self) -> int:
        return self.config.patches_per_image

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> unit-variance latents (N, C, h, w); cached latents pass through."""
        c, s = self.config.latent_channels, self.config.latent_size
        if images.shape[0] == 0:
            return images.new_zeros(0, c, s, s)
        if tuple(images.shape[1:]) == (c, s, s):  # from `transfusion cache-latents` (h < H: never pixels)
            return images
        return self.autoencoder.encode_latents(images)

    def text_logits(self, tokens: torch.Tensor, doc_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (P, V) at the ``at`` positions of text-only rows (B, L) (perplexity)."""
        hidden, _ = self.model(tokens, doc_ids, torch.full_like(tokens, -1))
        return self.model.lm_head(hidden[at])

    def image_generators(self, batch: dict, step: int) -> list[torch.Generator]:
        """One generator per image of the batch, image k of a row seeded by (noise_seed, step, row index, k): its time
        and noise (``Schedule.draw_times``) are the same however rows are split over processes or micro-batches."""
        rows = batch["row_index"].tolist()
        images_per_row = ((batch["image_ids"] >= 0).sum(1) // self.config.patches_per_image).tolist()
        return [torch.Generator().manual_seed(hash((self.hparams.noise_seed, step, row, k)) % 2**63)
                for row, count in zip(rows, images_per_row) for k in range(count)]

    def _common_step(self, batch: dict, stage: str, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.encode_images(batch["images"])
        if "row_index" in batch:  # rows that know their place in the data: draws per image (resumable, any split)
            generator = self.image_generators(batch, self.global_step if stage == "train" else -1)
        out = self.model.loss(batch["tokens"], batch["doc_ids"], batch["image_ids"], latents, batch["max_t"],
                              pad_id=self.tokenizer.pad_id, boi_id=self.tokenizer.boi_id, generator=generator,
                              text_loss=batch.get("text_loss"))
        B = batch["tokens"].shape[0]
        if stage != "train":  # means over every LM token and image of all processes, logged at the epoch's end
            self.eval_losses.update("lm_loss", out["lm_loss"], out["text_tokens"])
            self.eval_losses.update("ddpm_loss", out["ddpm_loss"], out["images"])
            buckets = self.model.schedule.bucket(out["t"], TIMESTEP_BUCKETS)
            for k in range(TIMESTEP_BUCKETS):
                if (buckets == k).any():
                    self.eval_losses.update(f"ddpm_bucket{k}", out["ddpm_per_image"][buckets == k])
            return out["loss"]
        padding = ((batch["tokens"] == self.tokenizer.pad_id) & (batch["image_ids"] < 0)).float().mean()
        self.log("train/padding", padding, batch_size=B)  # share of row positions that packing left empty
        for key in ("loss", "lm_loss", "ddpm_loss"):
            self.log(f"train/{key}", out[key], prog_bar=True, batch_size=B)
        return self._global_mean_loss(out)

    def _bucket_name(self, k: int) -> str:
        T = self.model.schedule.num_timesteps
        return f"ddpm_loss_t{k * T // TIMESTEP_BUCKETS + 1}-{(k + 1) * T // TIMESTEP_BUCKETS}"

    def _global_mean_loss(self, out: dict) -> torch.Tensor:
        """The loss whose gradient, averaged over processes by DDP/FSDP, is that of one process on the global
        batch: L_LM per LM token and L_DDPM per image of all processes, not a mean of per-process means (a
        process whose rows hold no image would halve the DDPM gradient of 2 processes)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return out["loss"]
        local = torch.stack([out["text_tokens"], out["images"].to(out["text_tokens"].device)]).float()
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum").clamp_min(1)
        lm_weight, ddpm_weight = (world * local / total).unbind()
        return lm_weight * out["lm_loss"] + self.config.diffusion_lambda * ddpm_weight * out["ddpm_loss"]

    def eval_figures(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lm, ddpm = means["lm_loss"], torch.nan_to_num(means["ddpm_loss"])  # no image in the data: no DDPM loss
        figures = {"loss": lm + self.config.diffusion_lambda * ddpm, "lm_loss": lm, "ddpm_loss": ddpm,
                   "lm_ppl": lm.exp()}  # text and captions
        for k in range(TIMESTEP_BUCKETS):  # where along the noise scale the model fails (absent: no image there)
            if torch.isfinite(means[f"ddpm_bucket{k}"]):
                figures[self._bucket_name(k)] = means[f"ddpm_bucket{k}"]
        return figures

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path is None:  # a fresh fit; a resumed one has its weights from the checkpoint
            if self.hparams.freeze_text and not (self.hparams.text_model or self.hparams.init_from):
                raise UserError("freeze_text freezes pretrained text weights: "
                                "set model option text_model (or init_from)")
            if self.hparams.init_from:
                self._load_network(self.hparams.init_from)
            if self.hparams.text_model:
                self._load_text_model(self.hparams.text_model)

    def _load_text_model(self, directory: str) -> None:
        """LMFusion's start: the text model's weights as the text weights (``transfusion.lightning.text_model``)."""
        load_text_model(self.model, directory, self.hparams.image_weights_from_text)

    def _load_network(self, path: str) -> None:
        """Network weights from a checkpoint of the same architecture, trained with the same autoencoder."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        check_checkpoint_file(path, "init_from checkpoint")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "transfusion_config" not in checkpoint:
            raise UserError(f"init_from={path!r} is not a Transfusion checkpoint (no transfusion_config)")
        check_config(checkpoint["transfusion_config"], self.config, f"init_from={path!r}", ARCHITECTURE)
        state = checkpoint["state_dict"]
        rename_legacy_keys(state, "autoencoder.")
        ours = self.autoencoder.state_dict()
        if any(not torch.equal(state.get(f"autoencoder.{k}", torch.empty(0)), v.cpu()) for k, v in ours.items()):
            raise UserError(f"init_from={path!r} was trained with another autoencoder than model.init_args.autoencoder")
        network = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        set_model_state_dict(self.model, network, options=StateDictOptions(full_state_dict=True))
        rank_zero_info(f"network weights from {path} (step {checkpoint.get('global_step', '?')})")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        is_patch = batch["image_ids"] >= 0
        self.count_flops(batch["doc_ids"], batch["image_ids"], is_patch | (batch["tokens"] != self.tokenizer.pad_id),
                         self.config.bidirectional_images)
        return self._common_step(batch, "train", step_generator(self, batch_idx, self.hparams.noise_seed))

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(batch_idx)  # same noise every validation
        return self._common_step(batch, "val", generator)

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        return self._common_step(batch, "test", generator)
