"""Rows from streamed shards: one consumer's records packed into training rows, sources mixed by weight.

A consumer (one data worker of one rank) reads its range of every pass (``stream.py``) and packs its pair
documents into rows of ``seq_len`` exactly as ``TransfusionRows`` builds them (``pair_document``, ``pair_row``);
a document that does not fit starts the next row, so no sample is dropped. Interleaved documents are packed the
same way by the rules of ``transfusion.data.rows.documents`` (``DocumentStream``). Text sources give windows of the
BOS...EOS token stream. Per record, the random choices (caption, caption-first or image-first, caption dropout)
are seeded by (seed, pass, set index of the record), and per row the source by (seed, consumer, row number):
a consumer's position (``Consumer.state()``: pass and offset per source, the token offset of a text stream,
counters) is all that a resume needs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from transfusion.data.preprocess import BadRecord, clean_caption, preprocess_image
from transfusion.data.rows.documents import FULL, pack, parse_segments, record_document
from transfusion.data.rows.sequences import SequenceLayout, collate_rows, pair_document, pair_row
from transfusion.data.shards.stream import (ShardSet, TruncatedRecord, consumer_slices, partition, read_records,
                                            record_captions, record_image, record_pictures, record_segments,
                                            record_text)
from transfusion.data.sources.pairs import BadDataError, BadDataWarning
from transfusion.errors import UserError

MAX_WARNINGS = 10  # per consumer; every skip is counted


@dataclass
class RowContext:
    """What every consumer shares: the model's layout and the row options."""

    layout: SequenceLayout
    seq_len: int
    image_shape: tuple
    image_dtype: torch.dtype = torch.float32
    p_caption_first: float = 0.8
    image_first_max_t: int | None = 500
    caption_dropout: float = 0.1
    seed: int = 0
    strict: bool = False


class Skips:
    """Skipped records of one consumer, by reason; the first few are warned about by shard URL and key."""

    def __init__(self, counts: dict | None, strict: bool):
        self.counts, self.strict, self.warned = Counter(counts or {}), strict, 0
        self.streak = 0  # records skipped since the last usable one

    def check(self, span: int, name: str) -> None:
        """Fail, instead of looping for ever, once a consumer's whole range (``span`` records) has been skipped."""
        if self.streak >= span:
            raise BadDataError(f"shard set {name!r}: the last {self.streak} records read by this consumer (its whole "
                             f"range of a pass) were all skipped ({dict(self.counts)}): no usable record")

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise BadDataError(f"bad record {where}: {reason} (strict=True)")
        self.streak += 1
        self.counts[reason.split(" (")[0].split(": ")[0]] += 1  # the reason without its details
        if self.warned < MAX_WARNINGS:
            warnings.warn(f"skipping {where}: {reason}", BadDataWarning)
        self.warned += 1


def records(shard_set: ShardSet, ctx: RowContext, consumer: int, consumers: int, state: dict, skips: Skips):
    """Yield ((pass, offset), set index, raw record, where) of a consumer's range, pass after pass, from ``state``."""
    lo, hi = partition(shard_set.total, consumers, consumer)
    if hi == lo:
        raise UserError(f"shard set {shard_set.name!r} has {shard_set.total} samples, fewer than the "
                         f"{consumers} consumers (processes x data workers) reading it")
    p, offset = state["pass"], state["offset"]
    while True:
        for shard, first, end, position in consumer_slices(shard_set, ctx.seed, p, lo + offset, hi):
            base = shard_set.first_index(shard)
            for number, raw in read_records(shard_set, shard, first, end):
                where = f"{shard_set.shards[shard]} record {number}"
                where += f" (key {raw['key']})" if isinstance(raw, dict) else ""
                skips.check(hi - lo, shard_set.name)
                if isinstance(raw, TruncatedRecord):
                    skips.skip(where, str(raw))
                    continue
                yield (p, position - lo + number - first), base + number, raw, where
        p, offset = p + 1, 0


class PairStream:
    """A consumer's pair documents packed into rows; ``state`` is the position of the next unused record."""

    def __init__(self, shard_set: ShardSet, ctx: RowContext, consumer: int, consumers: int, state: dict | None,
                 skips: Skips):
        self.set, self.ctx, self.skips = shard_set, ctx, skips
        self.state = dict(state or {"pass": 0, "offset": 0})
        self.items = self._documents(records(shard_set, ctx, consumer, consumers, self.state, skips))
        self.pending = None

    def _documents(self, raws):
        ctx, tok = self.ctx, self.ctx.layout.tokenizer
        n = ctx.layout.patches_per_image
        room = ctx.seq_len - n - 4  # caption tokens one document can hold
        for position, index, raw, where in raws:
            try:
                captions = [c for c in (clean_caption(c, 10_000)[0] for c in record_captions(raw)) if c]
            except (ValueError, TypeError) as error:  # a .json that is not JSON, or not a dict
                self.skips.skip(where, f"unreadable caption json ({error})")
                continue
            if not captions:
                self.skips.skip(where, "no caption")
                continue
            try:
                value = record_image(raw, self.set.image)
                if value is None:
                    self.skips.skip(where, "no image")
                    continue
                if self.set.image == "pixels":
                    image = preprocess_image(value, ctx.layout.image_size)
                else:
                    image = torch.from_numpy(np.array(value))
                    image = image.long() if self.set.image == "codes" else image.float()
            except BadRecord as error:
                self.skips.skip(where, str(error))
                continue
            except ValueError as error:  # an unreadable .npy
                self.skips.skip(where, f"unreadable array ({error})")
                continue
            rng = np.random.default_rng([ctx.seed, position[0], index])
            image_first = bool(rng.random() >= ctx.p_caption_first)
            caption = captions[int(rng.integers(len(captions)))]
            if not image_first and rng.random() < ctx.caption_dropout:
                caption = ""
            ids = tok.encode(caption)[:room] if caption else []
            limit = ctx.image_first_max_t if image_first else None
            self.skips.streak = 0
            yield position, pair_document(tok, n, ids, image_first), image, limit if limit is not None else FULL

    def next_row(self) -> dict:
        L, n = self.ctx.seq_len, self.ctx.layout.patches_per_image
        tokens, doc_ids, images, max_t = [], [], [], []
        while True:
            item = self.pending if self.pending is not None else next(self.items)
            self.pending = None
            _, doc, image, limit = item
            if len(tokens) + len(doc) > L:
                if not tokens:
                    raise ValueError(f"seq_len={L} is too short for one image-caption document of {len(doc)} tokens "
                                     f"({n} patches + caption + 4 specials); raise seq_len")
                self.pending = item  # starts the next row: no sample is dropped
                break
            doc_ids += [len(images)] * len(doc)
            tokens += doc
            images.append(image)
            max_t.append(limit)
        position = self.pending[0]
        self.state = {"pass": position[0], "offset": position[1]}
        return pair_row(tokens, doc_ids, images, max_t, L, n, self.ctx.layout.tokenizer.pad_id)


class DocumentStream(PairStream):
    """A consumer's interleaved documents (``documents`` shards) packed into rows by the rules of
    ``transfusion.data.rows.documents`` (``record_document``, ``pack``); a document longer than ``seq_len`` is skipped
    and counted (reason "document longer than seq_len", warned with its shard and key). ``state`` is the position
    of the next unused record, as for pairs (whose constructor it shares)."""

    def _images(self, raw: dict) -> list[torch.Tensor]:
        values = record_pictures(raw, self.set.image)
        if self.set.image == "pixels":
            return [preprocess_image(v, self.ctx.layout.image_size) for v in values]
        return [torch.from_numpy(np.array(v)).long() if self.set.image == "codes" else
                torch.from_numpy(np.array(v)).float() for v in values]

    def _documents(self, raws):
        ctx, tok, n = self.ctx, self.ctx.layout.tokenizer, self.ctx.layout.patches_per_image
        for position, _, raw, where in raws:
            try:
                segments = record_segments(raw)
            except (ValueError, TypeError) as error:
                self.skips.skip(where, f"unreadable segments json ({error})")
                continue
            if segments is None:
                self.skips.skip(where, "no segments")
                continue
            try:
                images = self._images(raw)
                parse_segments(segments, len(images), "segments")
            except BadRecord as error:
                self.skips.skip(where, str(error))
                continue
            except ValueError as error:  # malformed segments, an image index out of range, an unreadable .npy
                self.skips.skip(where, f"bad segments ({error})")
                continue
            doc = record_document({"segments": segments, "images": images}, tok, n, ctx.image_first_max_t, where)
            if len(doc.tokens) > ctx.seq_len:
                self.skips.skip(where, f"document longer than seq_len ({len(doc.tokens)} positions > {ctx.seq_len})")
                continue
            self.skips.streak = 0
            yield position, doc

    def next_row(self) -> dict:
        documents, used = [], 0
        while True:
            item = self.pending if self.pending is not None else next(self.items)
            self.pending = None
            if used + len(item[1].tokens) > self.ctx.seq_len:
                self.pending = item  # starts the next row: no document is dropped
                break
            documents.append(item[1])
            used += len(item[1].tokens)
        self.state = {"pass": self.pending[0][0], "offset": self.pending[0][1]}
        return pack(documents, self.ctx.seq_len, self.ctx.layout.patches_per_image, self.ctx.layout.tokenizer.pad_id,
                    self.ctx.image_shape, self.ctx.image_dtype)


class TextStream:
    """A consumer's text windows from ``text`` shards; ``state`` adds the token offset in the current document."""

    def __init__(self, shard_set: ShardSet, ctx: RowContext, consumer: int, consumers: int, state: dict | None,
                 skips: Skips):
        self.ctx, self.skips = ctx, skips
        state = dict(state or {"pass": 0, "offset": 0, "token": 0})
        self.items = self._documents(records(shard_set, ctx, consumer, consumers, state, skips))
        self.current, self.token = next(self.items), state["token"]
        self.state = state

    def _documents(self, raws):
        tok = self.ctx.layout.tokenizer
        for position, _, raw, where in raws:
            text = record_text(raw)
            if not text:
                self.skips.skip(where, "no text")
                continue
            self.skips.streak = 0
            yield position, tok.encode(text, bos=True, eos=True)

    def next_row(self) -> dict:
        out: list[int] = []
        while len(out) < self.ctx.seq_len:
            ids = self.current[1]
            take = ids[self.token:self.token + self.ctx.seq_len - len(out)]
            out += take
            self.token += len(take)
            if self.token >= len(ids):
                self.current, self.token = next(self.items), 0  # one document ahead: its position is the state
        self.state = {"pass": self.current[0][0], "offset": self.current[0][1], "token": self.token}
        return text_row(torch.tensor(out), self.ctx)


class TokenStream:
    """A consumer's text windows from an in-memory (S,) token stream (a local text file): range ``c`` of ``C``,
    cut into windows from an offset drawn per pass (so passes over a small file do not repeat the same windows)."""

    def __init__(self, tokens: torch.Tensor, ctx: RowContext, consumer: int, consumers: int, state: dict | None):
        self.tokens, self.ctx = tokens, ctx
        self.lo, self.hi = partition(len(tokens), consumers, consumer)
        if self.hi - self.lo < 2 * ctx.seq_len:
            raise ValueError(f"the text stream of {len(tokens)} tokens is too short for {consumers} consumers "
                             f"(processes x data workers) of seq_len={ctx.seq_len}: each needs 2 x seq_len")
        self.state = dict(state or {"pass": 0, "offset": 0})

    def _shift(self, pass_: int) -> int:
        return int(np.random.default_rng([self.ctx.seed, 0x747874, pass_]).integers(self.ctx.seq_len))

    def next_row(self) -> dict:
        L = self.ctx.seq_len
        p, offset = self.state["pass"], self.state["offset"]
        if self.lo + self._shift(p) + offset + L > self.hi:
            p, offset = p + 1, 0  # the next pass: the range again, another window offset
        start = self.lo + self._shift(p) + offset
        self.state = {"pass": p, "offset": offset + L}
        return text_row(self.tokens[start:start + L].clone(), self.ctx)


def text_row(tokens: torch.Tensor, ctx: RowContext) -> dict:
    """A text-only row, as ``TransfusionRows`` makes them (no images, one document id per BOS)."""
    return {"tokens": tokens, "doc_ids": torch.cumsum((tokens == ctx.layout.tokenizer.bos_id).long(), 0),
            "image_ids": torch.full_like(tokens, -1), "images": torch.zeros(0, *ctx.image_shape, dtype=ctx.image_dtype),
            "max_t": torch.zeros(0, dtype=torch.long)}


@dataclass
class Source:
    """One training source: a shard set (pairs, documents or text) or a token stream, and its mixing weight."""

    name: str
    weight: float
    shards: ShardSet | None = None
    tokens: torch.Tensor | None = None


class Consumer:
    """Consumer ``c`` of ``C``: per row, a source drawn by (seed, c, row number), its realised shares counted."""

    def __init__(self, sources: list[Source], ctx: RowContext, consumer: int, consumers: int,
                 state: dict | None = None):
        state = state or {}
        self.sources, self.ctx, self.consumer, self.consumers = sources, ctx, consumer, consumers
        self.rows = state.get("rows", 0)
        self.source_rows = list(state.get("source_rows", [0] * len(sources)))
        self.source_tokens = list(state.get("source_tokens", [0] * len(sources)))
        self.skips = Skips(state.get("skipped"), ctx.strict)
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        saved = state.get("sources", [None] * len(sources))
        self.streams = [self._stream(s, saved[k]) for k, s in enumerate(sources)]

    def _stream(self, source: Source, state):
        if source.tokens is not None:
            return TokenStream(source.tokens, self.ctx, self.consumer, self.consumers, state)
        kind = {"text": TextStream, "documents": DocumentStream}.get(source.shards.content, PairStream)
        return kind(source.shards, self.ctx, self.consumer, self.consumers, state, self.skips)

    def next_row(self) -> dict:
        k = 0
        if len(self.sources) > 1:
            rng = np.random.default_rng([self.ctx.seed, 0x6D6978, self.consumer, self.rows])
            k = int(rng.choice(len(self.sources), p=self.weights))
        row = self.streams[k].next_row()
        index = self.rows * self.consumers + self.consumer  # unique over consumers: seeds the row's diffusion noise
        self.rows += 1
        self.source_rows[k] += 1
        self.source_tokens[k] += int((row["doc_ids"] < self.ctx.seq_len).sum())
        return {**row, "index": index}

    def state(self) -> dict:
        return {"rows": self.rows, "sources": [s.state for s in self.streams], "source_rows": list(self.source_rows),
                "source_tokens": list(self.source_tokens), "skipped": dict(self.skips.counts)}


class StreamingRows(IterableDataset):
    """Batches of one rank: batch ``g`` (counted over epochs) comes from slot ``g % W`` (consumer ``rank W + slot``).

    ``position`` (``{"batch": next g, "slots": {slot: consumer state}}``) is where training stands; it is read
    when an iterator starts (each epoch), so workers started then begin exactly after the last trained batch.
    Every batch carries ``"stream": {"slot", "batch", "state"}``, the position after it.
    """

    def __init__(self, sources: list[Source], ctx: RowContext, batch_size: int, batches_per_epoch: int,
                 rank: int = 0, world_size: int = 1, workers: int = 1, position: dict | None = None):
        self.sources, self.ctx, self.batch_size = sources, ctx, batch_size
        self.batches_per_epoch, self.rank, self.world_size = batches_per_epoch, rank, world_size
        self.workers = max(workers, 1)
        self.position = position if position is not None else {"batch": 0, "slots": {}}

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        W, B = self.workers, self.batches_per_epoch
        start = self.position["batch"]
        end = (start // B + 1) * B  # the end of the epoch ``start`` is in
        first = start + worker
        if first >= end:
            return
        slot = first % W
        consumer = Consumer(self.sources, self.ctx, self.rank * W + slot, self.world_size * W,
                            self.position["slots"].get(str(slot)))
        for g in range(first, end, W):
            batch = collate_rows([consumer.next_row() for _ in range(self.batch_size)])
            batch["stream"] = {"slot": slot, "batch": g, "state": consumer.state()}
            yield batch
