"""LightningDataModule for Transfusion on real data: an image-caption source and a text source.

Sources (``transfusion.data.sources``) are chosen in YAML by ``class_path``::

    data:
      class_path: transfusion.data.modules.image_text.ImageTextDataModule
      init_args:
        image_captions: {class_path: transfusion.data.sources.ImageFolderSource, init_args: {data_dir: data/photos}}
        text: {class_path: transfusion.data.sources.TextFilesSource, init_args: {paths: data/wiki/*.jsonl}}

Images are checked (``scan``), decoded and resized + centre-cropped to the autoencoder's size; captions
longer than a row allows are cut. Text is tokenized once (to ``cache_dir`` when given: memory-mapped,
streamed sources need not fit in memory). Rows are built by ``TransfusionRows`` (a pure function of
seed and index) in a seeded per-epoch order dealt to the ranks (``RowsDataModule``, a
``ResumableDataModule``): under DDP each rank gets a distinct set of rows, and a killed run resumes at the
same row.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

from torch.utils.data import DataLoader

from transfusion.data.modules.base import RowsDataModule
from transfusion.data.rows.prompts import PromptDataset, collate_prompts, read_prompts
from transfusion.data.rows.sequences import SequenceLayout, TransfusionRows
from transfusion.data.rows.tokens import TokenArray, tokenize_documents, tokens_file
from transfusion.data.sources import ImageCaptionSource, TextSource
from transfusion.data.sources.latent_cache import LatentPairs, is_cache
from transfusion.data.sources.pairs import BadDataWarning, ImageCaptionPairs
from transfusion.images import IMAGE

log = logging.getLogger(__name__)


class ImageTextDataModule(RowsDataModule):
    def __init__(self, image_captions: ImageCaptionSource | None = None, text: TextSource | None = None,
                 seq_len: int = 128, batch_size: int = 16, rows_per_epoch: int = 100_000, val_rows: int = 64,
                 text_ratio: float = 1.0, p_caption_first: float = 0.8, image_first_max_t: int | None = 500,
                 caption_dropout: float = 0.1, val_fraction: float = 0.05, scan: str = "header", strict: bool = False,
                 min_image_size: int = 8, max_image_pixels: int = 64_000_000, max_text_tokens: int | None = None,
                 cache_dir: str | None = None, latent_cache: str | None = None, num_workers: int = 0, seed: int = 0, predict_examples: int = 8,
                 prompts: str | None = None, layout: SequenceLayout | None = None):
        """
        Args:
            image_captions: an image-caption source; None trains on text only.
            text: a text source; None trains on image-caption rows only (then text_ratio must be 0).
            seq_len, rows_per_epoch, val_rows, text_ratio, p_caption_first, image_first_max_t, caption_dropout: as in
                ``TransfusionDataModule`` (rows of seq_len tokens; text:image-caption tokens = text_ratio, 1:1 in the paper).
            val_fraction: share of the pairs held out when the source has no validation split.
            scan: image checks before training: "header" (files open, sizes), "full" (decode every image), "none".
            strict: a bad image, caption or text file is an error instead of a counted, warned skip.
            min_image_size, max_image_pixels: images smaller on a side / larger in area are skipped.
            max_text_tokens: cap on the training text stream (a streamed corpus is read only this far).
            cache_dir: where tokenized text streams are kept (memory-mapped) between runs.
            latent_cache: a ``transfusion cache-latents`` folder (or ``transfusion shards --encode`` output): train on its latents (checked against the model's
                autoencoder) instead of encoding images every step; when it does not exist, images are encoded on the fly.
            predict_examples: held-out pairs as ``predict`` prompts (caption -> image, image -> caption with all
                its captions as references), unless ``prompts`` names a prompt file.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["layout", "image_captions", "text"])
        self.image_captions, self.text = image_captions, text
        for source in (image_captions, text):
            if strict and hasattr(source, "strict"):
                source.strict = True  # one switch for the whole module
        self.layout = layout
        self.train_set = self.val_set = self.heldout_text = None
        self.pairs: dict[str, ImageCaptionPairs] = {}
        self.pixel_pairs: dict[str, ImageCaptionPairs] = {}  # for metrics and prompts when pairs are latents
        for name in ("seq_len", "batch_size", "rows_per_epoch", "val_rows", "min_image_size", "max_image_pixels"):
            if not isinstance(self.hparams[name], int) or self.hparams[name] <= 0:
                raise ValueError(f"data option {name} must be a positive integer, got {self.hparams[name]!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data option val_fraction must be in (0, 1), got {val_fraction}")
        if scan not in ("none", "header", "full"):
            raise ValueError(f"data option scan must be 'none', 'header' or 'full', got {scan!r}")
        if image_captions is None and text is None:
            raise ValueError("ImageTextDataModule needs image_captions, text or both")
        if text is None and text_ratio > 0:
            raise ValueError(f"text_ratio={text_ratio} needs a text source; set text_ratio: 0 to train on pairs only")

    # -- layout, text and pairs ------------------------------------------------------------------------------
    def _layout(self) -> SequenceLayout:
        self._resolve_layout()
        return self.layout

    def _text_path(self, split: str) -> Path | None:
        if self.hparams.cache_dir is None:
            return None
        key = hashlib.sha1(repr(sorted((k, repr(v)) for k, v in vars(self.text).items() if k != "_cache")).encode())
        key.update(Path(self._layout().tokenizer.path).read_bytes())
        key.update(repr((type(self.text).__name__, self.hparams.max_text_tokens if split == "train" else None)).encode())
        return Path(self.hparams.cache_dir) / f"text-{split}-{key.hexdigest()[:16]}.tokens.bin"

    def _tokens(self, split: str) -> TokenArray:
        cap, path = self.hparams.max_text_tokens if split == "train" else None, self._text_path(split)
        cached = tokens_file(path)
        if cached is not None:  # tokenized by an earlier run: the corpus is not read again
            return cached
        return tokenize_documents(self.text.documents(split), self._layout().tokenizer, path=path,
                                  max_tokens=cap, desc=f"tokenizing {split} text")

    def _pairs(self, split: str) -> ImageCaptionPairs | LatentPairs | None:
        """The split's pairs: from the latent cache when there is one, else decoded on the fly."""
        if self.image_captions is None:
            return None
        if split not in self.pairs:
            cache, layout = self.hparams.latent_cache, self._layout()
            if cache is not None and is_cache(cache):
                self.pairs[split] = LatentPairs(cache, split, layout.autoencoder_fingerprint, layout.image_size)
            else:
                if cache is not None:
                    warnings.warn(f"latent cache {cache!r} not found: encoding images on the fly (make it with "
                                  "`transfusion cache-latents`)", BadDataWarning)
                self.pairs[split] = self.uncached_pairs(split)
            log.info("%s: %d usable pairs; %s", self.pairs[split].name, len(self.pairs[split]), self.pairs[split].summary())
        return self.pairs[split]

    def uncached_pairs(self, split: str) -> ImageCaptionPairs:
        """The split's usable pairs, checked and decoded from the source."""
        hp, layout = self.hparams, self._layout()
        rows = self.image_captions.load("validation")
        if rows is not None:
            rows = self.image_captions.load("train") if split == "train" else rows
        else:  # no split of its own: hold out the last val_fraction of the training rows
            train = self.image_captions.load("train")
            if len(train) < 2:
                raise ValueError(f"{type(self.image_captions).__name__}: needs at least two images to hold one out")
            n_train = len(train) - max(1, round(len(train) * hp.val_fraction))
            rows = train.select(range(n_train) if split == "train" else range(n_train, len(train)))
        max_caption = hp.seq_len - layout.patches_per_image - 4  # a document must fit in one row
        return ImageCaptionPairs(
            rows, layout.image_size, name=f"{type(self.image_captions).__name__} {split}", scan=hp.scan,
            strict=hp.strict, min_size=hp.min_image_size, max_pixels=hp.max_image_pixels,
            tokenizer=layout.tokenizer, max_caption_tokens=max_caption)

    def prepare_data(self) -> None:
        """Tokenize text into ``cache_dir`` once (local rank 0), so ranks and later runs memory-map it."""
        if self.text is not None and self.hparams.cache_dir is not None and self.hparams.text_ratio > 0:
            for split in ("train", "validation"):
                self._tokens(split)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        common = dict(layout=self._layout(), seq_len=hp.seq_len, text_ratio=hp.text_ratio,
                      p_caption_first=hp.p_caption_first, image_first_max_t=hp.image_first_max_t)
        text = {s: self._tokens(s) if self.text is not None and hp.text_ratio > 0 else None
                for s in ("train", "validation")}
        rows = hp.rows_per_epoch
        world = self.trainer.world_size if self.trainer is not None else 1
        if rows % world:  # a distributed sampler would pad with repeated rows
            rows -= rows % world
            warnings.warn(f"rows_per_epoch rounded down to {rows}, a multiple of the {world} processes", BadDataWarning)
        self.heldout_text = text["validation"][:] if text["validation"] is not None else None  # for perplexity
        self.train_set = TransfusionRows(self._pairs("train") or [], text["train"], num_rows=rows,
                                         caption_dropout=hp.caption_dropout, seed=hp.seed, **common)
        self.val_set = TransfusionRows(self._pairs("validation") or [], text["validation"], num_rows=hp.val_rows,
                                       caption_dropout=0.0, seed=hp.seed + 1, **common)
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None and self.pairs:
            logger.log_metrics(self.data_counts(), step=0)

    def data_counts(self) -> dict[str, int]:
        """Usable, skipped and converted image-caption rows per split (logged at setup as ``data/...``)."""
        counts = {}
        for split, pairs in self.pairs.items():
            counts[f"data/{split}_pairs"] = len(pairs)
            counts[f"data/{split}_skipped"] = sum(pairs.skipped.values())
            counts[f"data/{split}_converted"] = sum(pairs.converted.values())
        return counts

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        records = read_prompts(hp.prompts) if hp.prompts else self.heldout_prompts(hp.predict_examples)
        return DataLoader(PromptDataset(records), batch_size=hp.batch_size, shuffle=False, collate_fn=collate_prompts)

    def evaluation_examples(self, num: int) -> list[dict]:
        """The first ``num`` held-out pairs for metrics (``transfusion.lightning.evaluation``): ``{"image": (3, H, W)
        in [-1, 1], "caption": the prompt, "references": every caption of the image}``."""
        pairs = self._pixel_pairs("validation")
        examples = []
        for i in range(min(num, len(pairs))):
            item = pairs[i]
            examples.append({"image": item["image"], "caption": item["captions"][0], "references": item["captions"]})
        return examples

    def _pixel_pairs(self, split: str) -> ImageCaptionPairs:
        if self.image_captions is None:
            raise ValueError("image metrics and predict prompts need an image-caption source (or a prompt file)")
        pairs = self.pairs.get(split)
        if isinstance(pairs, ImageCaptionPairs):
            return pairs
        if split not in self.pixel_pairs:  # trained from a latent cache: the pixels, checked once
            self.pixel_pairs[split] = self.uncached_pairs(split)
        return self.pixel_pairs[split]

    def heldout_prompts(self, count: int) -> list[dict]:
        """The first ``count`` held-out pairs: caption -> image, and image -> caption (references: all its captions)."""
        pairs = self._pixel_pairs("validation")
        records = []
        for i in range(min(count, len(pairs))):
            example = pairs[i]
            records.append({"prompt": [example["captions"][0], IMAGE], "reference": example["captions"][0],
                            "max_new_tokens": 0, "kind": "text-to-image"})
            records.append({"prompt": [example["image"]], "reference": example["captions"], "max_new_tokens": None,
                            "kind": "image-to-text"})
        return records
