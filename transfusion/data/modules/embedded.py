"""LightningDataModule for Transfusion on the embedded data: shapes (or scenes) with captions + the Lee news corpus.

The sequence layout (tokenizer, patches per image, image size) comes from the model being trained
(``TransfusionModule.sequence_layout()``), so it is configured once, on the model; tests and scripts
may pass a ``SequenceLayout`` directly.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from transfusion.data.embedded.scenes import ScenesDataset
from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.data.embedded.text import read_documents, split_documents
from transfusion.data.modules.base import RowsDataModule
from transfusion.data.rows.prompts import PromptDataset, collate_prompts, read_prompts, shapes_prompts
from transfusion.data.rows.sequences import SequenceLayout, TransfusionRows
from transfusion.data.rows.tokens import token_stream


class TransfusionDataModule(RowsDataModule):
    def __init__(self, seq_len: int = 128, batch_size: int = 16, rows_per_epoch: int = 100_000, val_rows: int = 64,
                 num_examples: int = 10_000, text_path: str | None = None, text_ratio: float = 1.0,
                 p_caption_first: float = 0.8, image_first_max_t: int | None = 500, caption_dropout: float = 0.1,
                 num_workers: int = 0, seed: int = 0, predict_examples: int = 8, prompts: str | None = None,
                 images: str = "shapes", layout: SequenceLayout | None = None):
        """
        Args:
            seq_len: row length L in tokens (text tokens + image patches + specials).
            rows_per_epoch: training rows per epoch; row i is a pure function of (seed, i) and the order of
                an epoch of (seed, epoch), so a run resumed from a checkpoint sees the same rows in the same order.
            num_examples: image-caption examples to train on; 0 trains a text model (text rows only).
            text_ratio: text-only tokens per image-caption token (1.0 = the paper's 1:1).
            image_first_max_t: noise limit for images that precede their caption (None: no limit).
            caption_dropout: probability of dropping a (caption-first) caption, for classifier-free guidance.
            predict_examples: held-out examples whose caption and image are the ``predict`` prompts.
            prompts: a prompt file for ``predict`` instead (see ``transfusion.data.rows.prompts``).
            images: ``shapes`` (one shape a picture, ``transfusion.data.embedded.shapes``) or ``scenes`` (1-4 shapes
                captioned for GenEval's tasks, ``transfusion.data.embedded.scenes``: held-out combinations are the
                evaluation examples).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["layout"])
        check_options(self.hparams)  # at start-up, before any data is read
        self.layout = layout
        self.train_set = self.val_set = None
        self.heldout_text: torch.Tensor | None = None  # the held-out text split as one token stream (perplexity)

    def setup(self, stage: str | None = None) -> None:
        self._resolve_layout()
        hp = self.hparams
        train_docs, val_docs = split_documents(read_documents(hp.text_path))
        self.heldout_text = token_stream(val_docs, self.layout.tokenizer)
        common = dict(layout=self.layout, seq_len=hp.seq_len, text_ratio=hp.text_ratio,
                      p_caption_first=hp.p_caption_first, image_first_max_t=hp.image_first_max_t)
        text_only = hp.num_examples == 0  # a text model (e.g. the text model LMFusion starts from)
        self.train_set = TransfusionRows(
            [] if text_only else self.images(hp.num_examples, seed=hp.seed),
            token_stream(train_docs, self.layout.tokenizer),
            num_rows=hp.rows_per_epoch, caption_dropout=hp.caption_dropout, seed=hp.seed, **common)
        self.val_set = TransfusionRows(
            [] if text_only else self.images(max(hp.val_rows, 64), seed=hp.seed + 1), self.heldout_text,
            num_rows=hp.val_rows, caption_dropout=0.0, seed=hp.seed + 1, **common)

    def images(self, num: int, seed: int, split: str = "train") -> ShapesDataset | ScenesDataset:
        """The image-caption examples of the ``images`` option (``split``: scenes' train or held-out prompts)."""
        if self.hparams.images == "scenes":
            return ScenesDataset(num, self.layout.image_size, seed=seed, split=split)
        return ShapesDataset(num, self.layout.image_size, seed=seed)

    def evaluation_examples(self, num: int) -> list[dict]:
        """``num`` held-out examples for metrics: ``{"image": (3, H, W) in [-1, 1], "caption": prompt,
        "references": every caption of the image}`` (the ``predict`` examples, phrasings in rotation); scenes add
        ``metadata``, the prompt's GenEval record."""
        data = self.images(num, seed=self.hparams.seed + 2, split="heldout")
        examples = []
        for i in range(num):
            item = data[i]
            examples.append({"image": item["image"], "caption": item["captions"][i % len(item["captions"])],
                             "references": item["captions"], **({"metadata": item["metadata"]} if "metadata" in item
                                                                else {})})
        return examples

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        records = (read_prompts(hp.prompts) if hp.prompts
                   else shapes_prompts(hp.predict_examples, self.layout.image_size, seed=hp.seed + 2,
                                       dataset=self.images(hp.predict_examples, seed=hp.seed + 2, split="heldout")))
        return DataLoader(PromptDataset(records), batch_size=hp.batch_size, shuffle=False, collate_fn=collate_prompts)


def check_options(hp) -> None:
    """Raise a ValueError naming the first invalid data option."""
    for name in ("seq_len", "batch_size", "rows_per_epoch", "val_rows", "num_examples", "predict_examples"):
        least = 0 if name == "num_examples" else 1  # 0 examples: text only
        if not isinstance(hp[name], int) or hp[name] < least:
            raise ValueError(f"data option {name} must be an integer >= {least}, got {hp[name]!r}")
    if hp.num_examples == 0 and hp.text_ratio == 0:
        raise ValueError("data option num_examples: 0 trains on text only, which needs text_ratio > 0")
    if hp.images not in ("shapes", "scenes"):
        raise ValueError(f"data option images must be 'shapes' or 'scenes', got {hp.images!r}")
    if hp.num_workers < 0:
        raise ValueError(f"data option num_workers must be >= 0, got {hp.num_workers}")
    if hp.text_ratio < 0:
        raise ValueError(f"data option text_ratio must be >= 0, got {hp.text_ratio}")
    if not 0.0 <= hp.p_caption_first <= 1.0:
        raise ValueError(f"data option p_caption_first must be in [0, 1], got {hp.p_caption_first}")
    if not 0.0 <= hp.caption_dropout < 1.0:
        raise ValueError(f"data option caption_dropout must be in [0, 1), got {hp.caption_dropout}")
    if hp.image_first_max_t is not None and not 1 <= hp.image_first_max_t <= 1000:
        raise ValueError(f"data option image_first_max_t must be in [1, 1000] or null, got {hp.image_first_max_t}")
