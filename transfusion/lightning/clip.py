"""A small CLIP trained in-package (``transfusion fit --config lightning_configs/clip_embedded.yaml``).

A contrastive dual encoder (a ``transformers`` ``CLIPModel`` of a few layers) trained on an image-caption
data module and exported as a Hugging Face CLIP directory, which ``transfusion.evaluation.clip`` loads.
Scores from such a model are NOT comparable to published CLIP scores; reports name the CLIP that computed
them (``clip_score@<name>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from transfusion.evaluation.clip import NAME_FILE
from transfusion.lightning.optim import adamw_cosine


def clip_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A CLIP BPE tokenizer (lower-cased, byte-level, ``</w>`` word ends) learnt on ``texts``; any text encodes."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    base = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[])
    return base.train_new_from_iterator(texts, vocab_size=vocab_size,
                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


class ClipModule(L.LightningModule):
    """A small CLIP trained contrastively on ``{"image": (N, 3, H, W) in [-1, 1], "caption": [str]}`` batches."""

    def __init__(self, name: str = "shapes-clip", export_dir: str = "outputs/clip", image_size: int = 32,
                 patch_size: int = 4, width: int = 128, layers: int = 3, heads: int = 4, embed_dim: int = 64,
                 vocab_size: int = 1024, max_text_len: int = 32, tokenizer_texts: str | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.1, warmup_steps: int = 50):
        """
        Args:
            name: the name scores from this CLIP are reported under (``clip_score@name``).
            export_dir: where the Hugging Face directory is written at the end of ``fit``.
            tokenizer_texts: a text file (one text a line) to learn the BPE from; None: the embedded captions.
        """
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.save_hyperparameters()
        if tokenizer_texts is None:
            from transfusion.data.embedded.shapes import all_captions
            texts = all_captions()
        else:
            texts = [line.strip() for line in Path(tokenizer_texts).read_text(encoding="utf-8").splitlines() if line.strip()]
            if not texts:
                raise ValueError(f"tokenizer_texts={tokenizer_texts}: the file has no text")
        self.tokenizer = clip_tokenizer(texts, vocab_size)
        tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
        tok = self.tokenizer
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tok), max_position_embeddings=max_text_len, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **tower),
            vision_config=dict(image_size=image_size, patch_size=patch_size, **tower), projection_dim=embed_dim)
        self.clip = CLIPModel(config)

    def _text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.hparams.max_text_len,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        # images in [-1, 1] are exactly what the exported processor makes of uint8 pixels (mean = std = 0.5)
        out = self.clip(pixel_values=batch["image"], return_loss=True, **self._text(batch["caption"]))
        B = batch["image"].shape[0]
        accuracy = (out.logits_per_image.argmax(1) == torch.arange(B, device=self.device)).float().mean()
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=B, sync_dist=stage != "train")
        self.log(f"{stage}/retrieval_acc", accuracy, prog_bar=True, batch_size=B, sync_dist=stage != "train")
        return out.loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self):
        hp = self.hparams  # AdamW (CLIP's betas and eps), linear warm-up, cosine decay to 0
        return adamw_cosine(self.parameters(), hp.lr, (0.9, 0.98), 1e-6, hp.weight_decay, hp.warmup_steps, 0.0,
                            self.trainer.estimated_stepping_batches)

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the Hugging Face directory that ``clip_score_metric`` (and CLIPScore) loads."""
        from transformers import CLIPImageProcessor, CLIPProcessor

        hp, directory = self.hparams, Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        images = CLIPImageProcessor(size={"shortest_edge": hp.image_size},
                                    crop_size={"height": hp.image_size, "width": hp.image_size},
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
        CLIPProcessor(image_processor=images, tokenizer=self.tokenizer).save_pretrained(str(directory))
        self.clip.save_pretrained(str(directory))
        step = self.trainer.global_step if self._trainer is not None else None
        (directory / NAME_FILE).write_text(json.dumps({"name": hp.name, "trained_steps": step}, indent=2) + "\n")
        return directory

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.export(self.hparams.export_dir)
            print(f"CLIP '{self.hparams.name}' written to {path}")
