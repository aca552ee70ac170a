"""LightningDataModule for streamed shards: weighted sources, exact mid-epoch resume across ranks and workers.

    data:
      class_path: transfusion.data.modules.streaming.StreamingDataModule
      init_args:
        sources: [{url: s3://bucket/pairs, weight: 0.8}, {url: s3://bucket/text, weight: 0.2}]
        val: s3://bucket/pairs-val           # or null: the last shard of the first pair source is held out

A training batch carries its consumer's position after it; ``on_before_batch_transfer`` (run in the main
process, in training order, just before the step: never for a batch that was only prefetched) strips and
records it. ``state_dict`` gathers every rank's positions into the checkpoint and ``load_state_dict`` hands
each rank its own; the workers started for the next epoch (or after ``--ckpt_path``) begin where training
stopped. Resuming with another number of processes or workers is refused: the sharding rule would change.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from transfusion.data.embedded.text import read_documents, split_documents
from transfusion.data.modules.base import RowsDataModule
from transfusion.data.preprocess import BadRecord, clean_caption, preprocess_image
from transfusion.data.rows.prompts import PromptDataset, collate_prompts, read_prompts
from transfusion.data.rows.sequences import SequenceLayout, collate_rows
from transfusion.data.rows.tokens import token_stream
from transfusion.data.shards.rows import Consumer, RowContext, Source, StreamingRows
from transfusion.data.shards.stream import (ShardSet, open_shard_set, read_records, record_captions, record_image,
                                            record_pictures, record_segments)
from transfusion.images import IMAGE


class StreamingDataModule(RowsDataModule):
    def __init__(self, sources: list[dict | str], val: str | list[str] | None = None, text_file: str | None = None,
                 text_weight: float = 0.0, seq_len: int = 128, batch_size: int = 16, rows_per_epoch: int = 100_000,
                 val_rows: int = 64, p_caption_first: float = 0.8, image_first_max_t: int | None = 500,
                 caption_dropout: float = 0.1, num_workers: int = 0, seed: int = 0, strict: bool = False,
                 predict_examples: int = 8, prompts: str | None = None, storage_options: dict | None = None,
                 layout: SequenceLayout | None = None):
        """
        Args:
            sources: shard sets to train on: ``{"url": folder URL with index.json | glob | [shard URLs], "weight": w,
                "name": optional}`` or just the URL (weight 1). Contents ``pairs``, ``documents`` or ``text``.
            val: the validation shard set (pairs or documents); None holds out the last shard of the first pair
                source (or, without pairs, of the first documents source).
            text_file: a local one-document-per-line text file (``transfusion.data.embedded.text``; None: the embedded
                news corpus) mixed in with ``text_weight`` (0: none); its last 10% of documents are held out for
                perplexity.
            rows_per_epoch: rows of one Trainer epoch over all processes; the data streams on, pass after pass.
            strict: raise at the first bad record instead of counting and skipping it.
            storage_options: fsspec options (credentials, endpoint) for every URL.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["layout"])
        for name in ("seq_len", "batch_size", "rows_per_epoch", "val_rows"):
            if not isinstance(self.hparams[name], int) or self.hparams[name] < 1:
                raise ValueError(f"data option {name} must be an integer >= 1, got {self.hparams[name]!r}")
        if not sources:
            raise ValueError("data option sources: no shard set to train on (give [{url: FOLDER, weight: 1.0}, ...])")
        self.source_specs = [s if isinstance(s, dict) else {"url": s} for s in sources]
        for spec in self.source_specs:
            if "url" not in spec or float(spec.get("weight", 1.0)) <= 0:
                raise ValueError(f"data option sources: each needs a url and a weight > 0, got {spec!r}")
        self.layout = layout
        self.train_set = self.val_set = self.val_shards = None
        self.heldout_text: torch.Tensor | None = None
        self.names: list[str] = []
        self.realised: dict = {}  # realised shares of the sources (rows, tokens) and skipped records, this rank
        self._position: dict = {"batch": 0, "slots": {}}

    # -------------------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return world, rank, max(self.hparams.num_workers, 1)

    def _check_images(self, shard_set: ShardSet) -> None:
        fingerprint = self.layout.autoencoder_fingerprint
        if shard_set.content != "text" and shard_set.image != "pixels" and fingerprint is not None \
                and shard_set.autoencoder_fingerprint != fingerprint:
            made = shard_set.autoencoder_fingerprint
            raise ValueError(f"shard set {shard_set.name!r} holds {shard_set.image} of another autoencoder "
                             f"(fingerprint {(made or 'unknown')[:12]}..., this model's is {fingerprint[:12]}...); "
                             "re-encode it with `transfusion shards` or train from pixels")

    def _image_shape(self, shard_set: ShardSet | None) -> tuple[tuple, torch.dtype]:
        size = self.layout.image_size
        if shard_set is None or shard_set.image == "pixels":
            return (3, size, size), torch.float32
        for shard in range(len(shard_set.shards)):  # the first record that has an array
            for _, raw in read_records(shard_set, shard, 0, shard_set.samples[shard]):
                value = None
                if isinstance(raw, dict) and shard_set.content == "documents":
                    value = next(iter(record_pictures(raw, shard_set.image)), None)
                elif isinstance(raw, dict):
                    value = record_image(raw, shard_set.image)
                if value is not None:
                    return tuple(value.shape), torch.long if shard_set.image == "codes" else torch.float32
        raise ValueError(f"shard set {shard_set.name!r}: no record with a {shard_set.image} array")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._resolve_layout()
        hp = self.hparams
        options = dict(hp.storage_options or {})
        sources = []
        for spec in self.source_specs:
            shard_set = open_shard_set(spec["url"], options)
            self._check_images(shard_set)
            sources.append(Source(spec.get("name") or shard_set.name, float(spec.get("weight", 1.0)), shard_set))
        pair_sets = [s.shards for s in sources if s.shards.content == "pairs"]
        pair_sets += [s.shards for s in sources if s.shards.content == "documents"]  # image sources: pairs first
        if hp.val is not None:
            self.val_shards = open_shard_set(hp.val, options)
            self._check_images(self.val_shards)
        elif pair_sets and len(pair_sets[0].shards) > 1:  # hold out the last shard of the first pair source
            first = pair_sets[0]
            self.val_shards = ShardSet(f"{first.name} (held out)", first.kind, first.content, first.image,
                                       first.autoencoder_fingerprint, first.shards[-1:], first.samples[-1:], options)
            first.shards, first.samples = first.shards[:-1], first.samples[:-1]
        elif pair_sets:
            raise ValueError(f"shard set {pair_sets[0].name!r} has one shard: pass data option `val` "
                             "(a validation set)")
        val_text = None
        if hp.text_weight > 0:
            train_docs, val_docs = split_documents(read_documents(hp.text_file))
            val_text = token_stream(val_docs, self.layout.tokenizer)
            sources.append(Source(hp.text_file or "embedded text", hp.text_weight,
                                  tokens=token_stream(train_docs, self.layout.tokenizer)))
        self.heldout_text = val_text
        self.names = [s.name for s in sources]
        shape, dtype = self._image_shape(pair_sets[0] if pair_sets else None)
        common = dict(layout=self.layout, seq_len=hp.seq_len, image_shape=shape, image_dtype=dtype,
                      p_caption_first=hp.p_caption_first, image_first_max_t=hp.image_first_max_t, strict=hp.strict)
        world, rank, workers = self._world()
        batches = hp.rows_per_epoch // (world * hp.batch_size)
        if batches < 1:
            raise ValueError(f"data option rows_per_epoch={hp.rows_per_epoch} is less than one batch of "
                             f"{hp.batch_size} rows on each of {world} processes")
        ctx = RowContext(caption_dropout=hp.caption_dropout, seed=hp.seed, **common)
        self.train_set = StreamingRows(sources, ctx, hp.batch_size, batches, rank, world, workers, self._position)
        # validation: the first val_rows rows of the validation set (and held-out text), one consumer, no dropout
        val_sources = [Source("val", 1.0, self.val_shards)] if self.val_shards is not None else []
        if val_text is not None:
            val_sources.append(Source("val text", hp.text_weight, tokens=val_text))
        if val_sources:
            val = Consumer(val_sources, RowContext(caption_dropout=0.0, seed=hp.seed + 1, **common), 0, 1)
            self.val_set = [val.next_row() for _ in range(hp.val_rows)]
        else:
            self.val_set = []

    def train_dataloader(self) -> DataLoader:
        # workers are started anew each epoch, from the position of the last trained batch (not persistent:
        # a persistent worker would go on after the batches it had prefetched and the epoch dropped)
        warnings.filterwarnings("ignore", message=".*IterableDataset.* has `__len__` defined")  # each worker is
        return DataLoader(self.train_set, batch_size=None, num_workers=self.hparams.num_workers)  # its own consumer

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate_rows)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # -------------------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning's training_epoch_loop.advance calls this after next(data_fetcher), just before the step; the
        # batch the fetcher prefetched meanwhile gets here only when its own step comes
        if isinstance(batch, dict) and "stream" in batch:  # a training batch, about to be trained on
            stream = batch.pop("stream")
            self._position["batch"] = int(stream["batch"]) + 1
            self._position["slots"][str(stream["slot"])] = stream["state"]
            if self._position["batch"] % self.train_set.batches_per_epoch == 0:
                self._report()
        return batch

    def _report(self) -> None:
        """Realised source shares (rows, tokens) and skipped records of this rank, at the end of an epoch."""
        states = list(self._position["slots"].values())
        rows = [sum(s["source_rows"][k] for s in states) for k in range(len(self.names))]
        tokens = [sum(s["source_tokens"][k] for s in states) for k in range(len(self.names))]
        skipped: dict = {}
        for s in states:
            for reason, count in s["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
        self.realised = {"rows": {n: round(r / max(sum(rows), 1), 4) for n, r in zip(self.names, rows)},
                         "tokens": {n: round(t / max(sum(tokens), 1), 4) for n, t in zip(self.names, tokens)},
                         "skipped": skipped}
        rank_zero_info(f"streamed data, rank 0 so far: row shares {self.realised['rows']}, token shares "
                       f"{self.realised['tokens']}, skipped {skipped or 'none'}")

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or self.train_set is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        world, rank, workers = self._world()
        mine = {"batch": self._position["batch"], "slots": dict(self._position["slots"])}
        positions = [mine]
        if world > 1 and dist.is_available() and dist.is_initialized():  # every rank dumps; rank 0 writes
            positions = [None] * world
            dist.all_gather_object(positions, mine)
        return {"world_size": world, "workers": workers, "positions": positions}

    def load_state_dict(self, state_dict: dict) -> None:
        trainer = self.trainer
        if not state_dict or (trainer is not None and trainer.state.fn != TrainerFn.FITTING):
            return  # validate / test / predict from a checkpoint: no training position to take up
        world, rank, workers = self._world()
        if (state_dict["world_size"], state_dict["workers"]) != (world, workers):
            raise ValueError(
                f"the checkpoint's data position is for {state_dict['world_size']} processes x {state_dict['workers']} "
                f"data workers, this run has {world} x {workers}: streamed data resumes exactly only with the same "
                "processes and num_workers (the sharding rule depends on both); use them, or start a new run "
                "from the weights")
        position = state_dict["positions"][rank]
        self._position.clear()  # in place: the training set holds this dict
        self._position.update({"batch": int(position["batch"]), "slots": dict(position["slots"])})

    # -------------------------------------------------------------------------------------------------------
    def evaluation_examples(self, num: int) -> list[dict]:
        """The first ``num`` usable validation pairs: ``{"image": (3, H, W) in [-1, 1], "caption", "references"}``
        (of documents: each one's first picture, if text comes just before it, and that text)."""
        shard_set = self.val_shards
        if shard_set is None or shard_set.image != "pixels":
            raise ValueError("image metrics and predict prompts need a validation set of pixel shards "
                             "(data option val)")
        examples = []
        for shard in range(len(shard_set.shards)):
            for _, raw in read_records(shard_set, shard, 0, shard_set.samples[shard]):
                if not isinstance(raw, dict):
                    continue
                if shard_set.content == "documents":  # the first picture and the text just before it
                    captions, value = document_example(raw)
                else:
                    captions = [c for c in (clean_caption(c, 10_000)[0] for c in record_captions(raw)) if c]
                    value = record_image(raw, "pixels")
                try:
                    image = preprocess_image(value, self.layout.image_size) if value is not None else None
                except BadRecord:
                    continue
                if captions and image is not None:
                    examples.append({"image": image, "caption": captions[0], "references": captions})
                if len(examples) == num:
                    return examples
        return examples

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.prompts:
            records = read_prompts(hp.prompts)
        else:
            records = []
            for example in self.evaluation_examples(hp.predict_examples):
                records.append({"prompt": [example["caption"], IMAGE], "reference": example["caption"],
                                "max_new_tokens": 0, "kind": "text-to-image"})
                records.append({"prompt": [example["image"]], "reference": example["references"],
                                "max_new_tokens": None, "kind": "image-to-text"})
        return DataLoader(PromptDataset(records), batch_size=hp.batch_size, shuffle=False, collate_fn=collate_prompts)


def document_example(raw: dict) -> tuple[list[str], bytes | None]:
    """([the text just before a document's first picture] or [], that picture's bytes or None)."""
    try:
        segments = record_segments(raw) or []
        pictures = record_pictures(raw, "pixels")
    except (ValueError, TypeError):
        return [], None
    for before, segment in zip([None, *segments], segments):
        if isinstance(segment, dict) and "image" in segment:
            text = clean_caption(before.get("text"), 10_000)[0] if isinstance(before, dict) else ""
            index = segment["image"]
            ok = text and isinstance(index, int) and 0 <= index < len(pictures)
            return ([text], pictures[index]) if ok else ([], None)
    return [], None
