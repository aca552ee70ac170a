"""The mixed-modal sampling loop shared by both models (paper section 3, Inference).

LM mode samples one token at a time (greedy, temperature, top-p) until EOS or the token budget. When BOI
is sampled (or the prompt asks for an image with ``IMAGE``), the subclass generates the image (``_generate_images``:
diffusion for Transfusion, code by code for Chameleon) and commits it with EOI; LM mode then resumes,
conditioned on the image. A prompt's text after an ``IMAGE`` (an interleaved prompt: "caption" IMAGE "then ..."
IMAGE) is fed token by token after that image, in place of sampled tokens, and outside the token budget.

Rows advance in lock step. A row with nothing to do in a step gets padding positions that belong to no
document (doc id -1): no real position attends them, and RoPE positions are tracked per row, so padding
never shifts a row's positions. Prompts are left-padded the same way.

Classifier-free guidance pairs each prompt with an unconditional row (the caption dropped, as in
training: ``BOS BOI <image>``) in the same batch, and for editing guidance (``image_cfg_scale``) with an
image-only row (the prompt's input images, its text dropped). After each generated image a guidance row
retires what it added from view, so every image sees the same guidance context.

With ``use_cache`` (default) every committed position is kept in a KV cache; ``use_cache=False``
recomputes the whole sequence at every step (the reference).

Legend: B prompts, R rows (prompts, then their unconditional rows), S committed length, Lq new positions,
n positions per image, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from transfusion.generation.options import SamplingOptions, sample_tokens
from transfusion.images import IMAGE, to_tensor
from transfusion.models.attention import RowGroups, dense_mask
from transfusion.models.kv_cache import MIN_CAPACITY, make_caches, set_commit

PAD_DOC = -1  # the document of padding positions: no real position attends them
IMAGE_POSITION = -1  # in a row's token ids: one of an image's n positions (its patches, or its codes once sampled)
NO_IMAGE = -1  # the image id of a position that is not an image's
PROMPT, UNCONDITIONAL, IMAGE_ONLY = 0, 1, 2  # row groups: B rows each, in this order (guidance adds the later ones)
MIN_SKIPPED_KEYS = 32  # attention per row group (RowGroups) when it spares a group at least this many padding keys
_KEYS = ("tokens", "doc_ids", "image_ids", "pos")


class Stream:
    """Committed positions of all rows: ids, documents, images and RoPE positions, each (R, S).

    Kept in buffers with room to grow (doubling), as the KV cache: ``stage`` writes a block after the S committed
    positions and returns views of all S + Lq, ``commit`` keeps it; an uncommitted block is overwritten by the next.
    """

    def __init__(self, rows: int, device):
        self.buffers = {key: torch.zeros(rows, MIN_CAPACITY, dtype=torch.long, device=device) for key in _KEYS}
        self.length = 0  # S
        self.latents: dict[int, torch.Tensor] = {}  # committed clean latents by image id (Transfusion)

    tokens = property(lambda self: self.buffers["tokens"][:, :self.length])
    doc_ids = property(lambda self: self.buffers["doc_ids"][:, :self.length])
    image_ids = property(lambda self: self.buffers["image_ids"][:, :self.length])
    pos = property(lambda self: self.buffers["pos"][:, :self.length])

    def stage(self, block: dict) -> dict:
        """The committed positions followed by ``block``'s, (R, S + Lq) each; the block is not committed."""
        start, end = self.length, self.length + block["tokens"].shape[1]
        if end > self.buffers["tokens"].shape[1]:
            for key, old in self.buffers.items():
                self.buffers[key] = old.new_zeros(old.shape[0], max(end, 2 * old.shape[1]))
                self.buffers[key][:, :start] = old[:, :start]
        for key in _KEYS:
            self.buffers[key][:, start:end] = block[key]
        return {key: buffer[:, :end] for key, buffer in self.buffers.items()}

    def commit(self, Lq: int) -> None:
        self.length += Lq


@dataclass
class Run:
    """Everything one ``generate`` call changes: the stream and caches, positions, and per-prompt progress."""

    B: int  # prompts
    R: int  # rows: B prompts, then B unconditional rows with guidance, then B image-only rows with image guidance
    generators: list[torch.Generator]  # one per prompt
    stream: Stream
    caches: list
    next_pos: torch.Tensor  # (R,) RoPE position of each row's next position
    budget: list[int]  # text tokens each prompt may still sample
    keep: list[int]  # per row: positions a guidance row keeps when it retires an image (its prompt part)
    first: list[int]  # per row: its first column in the stream (prompts are left-padded to a common width)
    pending: list[bool]  # the prompt's BOI is committed and its image not yet generated
    forced: list[list[int]] = field(default_factory=list)  # per prompt: its tokens after its first IMAGE, to feed
    done: list[bool] = field(default_factory=list)
    outputs: list[list] = field(default_factory=list)  # per prompt: str and image segments so far
    text: list[list[int]] = field(default_factory=list)  # per prompt: text ids not yet decoded into outputs
    next_image_id: int = 0
    logits: torch.Tensor | None = None  # (R, V) next-token logits of every row

    @property
    def guided(self) -> bool:
        return self.R > self.B

    @property
    def image_guided(self) -> bool:
        return self.R == 3 * self.B

    @property
    def groups(self) -> int:
        """Row groups: prompts; with guidance, unconditional rows; with image guidance, image-only rows."""
        return self.R // self.B

    def row(self, prompt: int, group: int) -> int:
        """The row of ``prompt`` in a row group."""
        return prompt + group * self.B

    def rows(self, prompts: list[int], groups=None) -> list[int]:
        """The rows of ``prompts`` in ``groups`` (default: all), group by group."""
        return [self.row(r, g) for g in (range(self.groups) if groups is None else groups) for r in prompts]

    def guidance_rows(self, prompts: list[int]) -> list[int]:
        """The rows that guide ``prompts``' images (unconditional, then image-only), group by group."""
        return self.rows(prompts, range(UNCONDITIONAL, self.groups))

    def prompt(self, row: int) -> int:
        return row % self.B

    def group(self, row: int) -> int:
        return row // self.B

    def flush_text(self, r: int, decode) -> None:
        if self.text[r]:
            self.outputs[r].append(decode(self.text[r]))
            self.text[r] = []


class MixedModalGenerator:
    """Generates text and images for prompts: ``generate``, or the ``generate_images`` / ``generate_captions``
    shortcuts. Subclasses say how images enter (``_image_input``), are generated and are decoded.

    A prompt is a list of segments: ``str`` (text), an image (PIL RGB or a (3, H, W) tensor in [-1, 1]),
    and ``IMAGE`` (generate an image there); after the first ``IMAGE`` only text and ``IMAGE`` may follow. The
    generator holds only the networks and settings; each call keeps its state in a ``Run``.
    """

    options_class = SamplingOptions
    patches_per_image: int  # n: the positions an image takes (latent patches or VQ codes; set by subclasses)
    bidirectional: bool  # attention within an image (set by subclasses)

    def __init__(self, model, autoencoder, tokenizer, options: SamplingOptions | None = None, seed: int = 0):
        self.model, self.autoencoder, self.tok = model, autoencoder, tokenizer
        self.options = options or self.options_class()
        self.seed = seed
        self.image_size = autoencoder.config.image_size
        self.max_len = model.cfg.transformer.max_seq_len
        self.device = next(model.parameters()).device
        banned = [tokenizer.pad_id, tokenizer.eoi_id, tokenizer.bos_id]  # never sampled as text
        self.banned = torch.tensor(banned, device=self.device)

    # ------------------------------------------------------------------ what subclasses provide
    def _image_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A prompt image (3, H, W) in [-1, 1] -> what the model reads for it."""
        raise NotImplementedError

    def _run_model(self, inputs: dict, ids: list[int], images: dict, mask, caches):
        """The network on ``inputs`` (tokens, doc, img, pos; (R, L) each): hidden states (R, L, D) and, for the images
        ``ids`` among them (row-major), their predictions (Transfusion; None otherwise); ``images``: id -> (x_t, t)."""
        raise NotImplementedError

    def _generate_images(self, run: Run, image_rows: list[int]) -> dict[int, torch.Tensor]:
        """One image for each prompt row in ``image_rows`` (BOI committed); commits it and EOI."""
        raise NotImplementedError

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] for generated images (N, ...)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, prompts: list, seeds: list[int] | None = None, decode: bool = True,
                 max_new_tokens: list[int | None] | None = None) -> list[list]:
        """Per prompt, the generated segments in order: ``str`` text and (3, H, W) image tensors in [-1, 1].

        Prompt i draws its noise from its own generator seeded ``seeds[i]`` (default: seed + i), so its
        output does not depend on the batch. ``decode=False`` returns images as the model made them
        (latents or codes). ``max_new_tokens`` overrides the options' text budget per prompt (None: keep it).
        """
        if not prompts:
            return []
        seeds = [self.seed + i for i in range(len(prompts))] if seeds is None else seeds
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        encoded = [self._encode_prompt(p, i) for i, p in enumerate(prompts)]
        run = self._start(encoded, seeds, max_new_tokens)
        self._prefill(run, encoded)
        while True:
            self._images_due(run)
            if not self._text_step(run):
                break
        for r in range(run.B):
            run.flush_text(r, self.tok.decode)
        return self._decode_images(run.outputs) if decode else run.outputs

    def generate_images(self, captions: list[str], seeds: list[int] | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] for N captions (each prompt ``caption`` + ``IMAGE``; no text)."""
        generator = self.with_options(max_new_tokens=0)
        outputs = generator.generate([[c, IMAGE] for c in captions], seeds=seeds)
        return torch.stack([next(s for s in out if isinstance(s, torch.Tensor)) for out in outputs])

    def generate_captions(self, images, seeds: list[int] | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Text for each image ((N, 3, H, W) in [-1, 1] or PIL RGB), without guidance, stripped."""
        overrides = {"cfg_scale": 1.0, "image_cfg_scale": None} | ({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})
        outputs = self.with_options(**overrides).generate([[image] for image in images], seeds=seeds)
        return ["".join(s for s in out if isinstance(s, str)).strip() for out in outputs]

    def with_options(self, **overrides) -> MixedModalGenerator:
        """The same networks with some sampling options replaced."""
        return type(self)(self.model, self.autoencoder, self.tok, replace(self.options, **overrides), self.seed)

    # ------------------------------------------------------------------ prompts
    def _pixels(self, image, where: str) -> torch.Tensor:
        """A prompt image as a (3, H, W) tensor in [-1, 1] on the device, checked."""
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"{where}: image mode {image.mode!r}; convert it to 'RGB' first")
            image = to_tensor(image)
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where}: an image must be a PIL RGB image or a (3, H, W) tensor, got {type(image).__name__}"
                             + (f" of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""))
        if tuple(image.shape[1:]) != (self.image_size, self.image_size):
            raise ValueError(f"{where}: image of size {tuple(image.shape[1:])}, the autoencoder expects "
                             f"image_size={self.image_size}")
        return image.to(self.device)

    def _encode_prompt(self, prompt, index: int) -> tuple[list[int], list[torch.Tensor], bool, list[int]]:
        """Token ids up to the first ``IMAGE`` (IMAGE_POSITION at image positions), what the model reads for its
        images, whether it forces BOI, and the ids after that ``IMAGE`` (BOI for each later one), fed after it."""
        if isinstance(prompt, (str, Image.Image, torch.Tensor)):
            prompt = [prompt]
        n = self.patches_per_image
        ids, images, force, forced = [self.tok.bos_id], [], False, []
        for j, segment in enumerate(prompt):
            if segment is IMAGE:
                (forced if force else ids).append(self.tok.boi_id)
                force = True
            elif isinstance(segment, str):
                (forced if force else ids).extend(self.tok.encode(segment))
            elif force:
                raise ValueError(f"prompt {index}, segment {j}: after an IMAGE a prompt may hold only text and IMAGE")
            else:
                images.append(self._image_input(self._pixels(segment, f"prompt {index}, segment {j}")))
                ids += [self.tok.boi_id] + [IMAGE_POSITION] * n + [self.tok.eoi_id]
        later_images = forced.count(self.tok.boi_id)
        length = len(ids) + len(forced) + (n + 1) * (later_images + 1 if force else 0) + (0 if force else 1)
        if length > self.max_len:
            raise ValueError(f"prompt {index} has {len(ids) + len(forced)} positions; with what it asks to generate "
                             f"it exceeds the model's context max_seq_len={self.max_len}")
        return ids, images, force, forced

    def _images_of(self, ids: list[int]) -> list[int]:
        """A prompt's ids kept by its image-only row: BOS and each input image (BOI, its positions, EOI)."""
        P = IMAGE_POSITION
        return [i for k, i in enumerate(ids) if k == 0 or i == P or (i == self.tok.boi_id and k + 1 < len(ids)
                and ids[k + 1] == P) or (i == self.tok.eoi_id and ids[k - 1] == P)]

    # ------------------------------------------------------------------ the phases: prefill, then image and text steps
    def _start(self, encoded: list, seeds: list[int], max_new_tokens: list[int | None] | None) -> Run:
        """The state of a new call: rows (with guidance, an unconditional row per prompt), empty caches."""
        B, o = len(encoded), self.options
        R = 3 * B if o.image_cfg_scale is not None else 2 * B if o.cfg_scale != 1.0 else B
        budget = [o.max_new_tokens if b is None else b for b in (max_new_tokens or [None] * B)]
        return Run(B=B, R=R, generators=[torch.Generator(self.device).manual_seed(int(s)) for s in seeds],
                   stream=Stream(R, self.device), caches=make_caches(len(self.model.transformer.layers)),
                   next_pos=torch.zeros(R, dtype=torch.long), budget=budget, keep=[1] * R, first=[0] * R,
                   pending=[force for _, _, force, _ in encoded], forced=[list(f) for *_, f in encoded], done=[False] * B,
                   outputs=[[] for _ in range(B)], text=[[] for _ in range(B)])

    def _prefill(self, run: Run, encoded: list) -> None:
        """Commit every prompt, left-padded so each row's last token is in the last column."""
        B, R, tok, n = run.B, run.R, self.tok, self.patches_per_image
        rows = [ids for ids, *_ in encoded]
        if run.guided:  # unconditional rows: BOS, and BOI where the prompt forces an image
            rows += [[tok.bos_id] + ([tok.boi_id] if force else []) for _, _, force, _ in encoded]
        if run.image_guided:  # image-only rows: BOS and the prompt's images, then BOI where it forces one
            for r, (ids, _, force, _) in enumerate(encoded):
                kept = self._images_of(ids)
                run.keep[run.row(r, IMAGE_ONLY)] = len(kept)
                rows.append(kept + ([tok.boi_id] if force else []))
        width = max(len(r) for r in rows)
        images, prompt_image_ids = {}, []
        for r in range(R):  # unconditional rows read no image of the prompt
            inputs = [] if run.group(r) == UNCONDITIONAL else encoded[run.prompt(r)][1]
            prompt_image_ids.append(list(range(run.next_image_id, run.next_image_id + len(inputs))))
            images.update({run.next_image_id + k: (x, 0) for k, x in enumerate(inputs)})
            run.next_image_id += len(inputs)
        block = self._empty_block(R, width)
        block["ids"] = [i for r in range(R) for i in prompt_image_ids[r]]  # the prompts' images in row order
        for r, ids in enumerate(rows):
            ids_t, cols = torch.tensor(ids), slice(width - len(ids), width)
            block["tokens"][r, cols] = torch.where(ids_t >= 0, ids_t, tok.pad_id)
            block["doc_ids"][r, cols] = 0
            block["pos"][r, cols] = torch.arange(len(ids))
            if prompt_image_ids[r]:
                positions = ids_t == IMAGE_POSITION
                block["image_ids"][r, cols][positions] = torch.tensor(prompt_image_ids[r]).repeat_interleave(n)
            run.next_pos[r] = len(ids)
            run.first[r] = width - len(ids)
        hidden, _ = self._forward(run, {k: v if k == "ids" else v.to(self.device) for k, v in block.items()}, images,
                                  commit=True)
        run.logits = self.model.lm_head(hidden[:, -1])  # (R, V)

    def _images_due(self, run: Run) -> None:
        """Generate the image of every prompt whose BOI is committed (a row without room for it stops)."""
        image_rows = [r for r in range(run.B) if run.pending[r] and not run.done[r]]
        if not image_rows:
            return
        for r in image_rows:
            run.flush_text(r, self.tok.decode)
            if run.next_pos[r] + self.patches_per_image + 1 > self.max_len:  # no room for n positions + EOI: stop
                run.done[r] = True
        image_rows = [r for r in image_rows if not run.done[r]]
        for r, image in (self._generate_images(run, image_rows) if image_rows else {}).items():
            run.outputs[r].append(image)
        for r in image_rows:
            run.pending[r] = False

    def _text_step(self, run: Run) -> bool:
        """Sample and commit one token for every active prompt; False when no prompt has anything left to do."""
        tok, next_pos = self.tok, run.next_pos.tolist()
        active = [not run.done[r] and (run.budget[r] > 0 or bool(run.forced[r])) and next_pos[r] < self.max_len
                  for r in range(run.B)]
        if not any(active):
            return False
        next_tokens = self._sample(run, run.logits[: run.B]).tolist()  # one host sync for all rows
        step_rows, real = [], torch.zeros(run.R, dtype=torch.bool)
        for r in range(run.B):
            forced = active[r] and bool(run.forced[r])  # the prompt's own next token, not a sampled one
            token = run.forced[r].pop(0) if forced else next_tokens[r]
            if not active[r] or (token == tok.eos_id and not forced):
                run.done[r] = True
                step_rows.append([tok.pad_id])
                continue
            run.budget[r] -= not forced
            real[r] = True
            step_rows.append([token])
            if token == tok.boi_id:
                run.pending[r] = True
                real[run.guidance_rows([r])] = True  # its guidance rows start their image too
            elif not forced:  # the prompt's text is not output
                run.text[r].append(token)
        if run.guided:
            step_rows += [[tok.boi_id]] * (run.R - run.B)
        if not real.any():
            return False
        hidden, _ = self._forward(run, self._block(run, step_rows, real), {}, commit=True)
        if real.all():
            run.logits = self.model.lm_head(hidden[:, -1])
        else:
            rows = real.nonzero()[:, 0].to(self.device)
            run.logits[rows] = self.model.lm_head(hidden[rows, -1])
        return True

    # ------------------------------------------------------------------ helpers
    def _forward(self, run: Run, block: dict, images: dict[int, tuple[torch.Tensor, float]], commit: bool):
        """Run the new positions ``block``: hidden states (R, Lq, D) and the predictions of ``images`` by image id;
        ``images``: id -> (x_t, t) for the images being generated in the block (committed clean latents are looked
        up by id). With the cache only the block runs (its KV kept if ``commit``), else the whole stream."""
        st, Lq = run.stream, block["tokens"].shape[1]
        full = st.stage(block)  # committed positions, then the block's: (R, S + Lq) each
        if self.options.use_cache:
            inputs, ids, caches = block, block["ids"], run.caches  # ids: the block's images, row-major (no sync)
            mask = self._attention_mask(run, dense_mask(full["doc_ids"], full["image_ids"], self.bidirectional,
                                                        num_queries=Lq))
            set_commit(caches, commit)
        else:
            inputs, caches, img = full, None, full["image_ids"]
            ids = [int(i) for i in img[img >= 0].view(-1, self.patches_per_image)[:, 0]]
            mask = dense_mask(full["doc_ids"], img, self.bidirectional)
        lookup = {i: (x, 0) for i, x in st.latents.items()} | images
        hidden, predictions = self._run_model(inputs, ids, lookup, mask, caches)
        if commit:
            st.commit(Lq)
            st.latents.update({i: x for i, (x, _) in images.items()})
        return hidden[:, -Lq:], ({i: predictions[j] for j, i in enumerate(ids) if i in images} if ids else {})

    def _sample(self, run: Run, logits: torch.Tensor) -> torch.Tensor:
        """Next text token ids (B,) from logits (B, V)."""
        logits = logits.float().index_fill(-1, self.banned, float("-inf"))
        return sample_tokens(logits, self.options.temperature, self.options.top_p, run.generators)

    def _empty_block(self, R: int, Lq: int) -> dict:
        block = {k: torch.zeros(R, Lq, dtype=torch.long) for k in _KEYS}
        block["doc_ids"][:], block["image_ids"][:], block["tokens"][:] = PAD_DOC, NO_IMAGE, self.tok.pad_id
        return block

    def _block(self, run: Run, rows: list[list[int]], real: torch.Tensor, image_ids: list[int] | None = None) -> dict:
        """New positions: ``rows[r]`` token ids (IMAGE_POSITION: the positions of image ``image_ids[r]``) for rows where
        ``real[r]``, else padding; ``ids`` lists the images in the block in row order. Built in a few whole-batch
        ops: a decoding step's cost should not grow with the rows."""
        ids, live = torch.tensor(rows), real[:, None]  # (R, Lq), (R, 1)
        Lq = ids.shape[1]
        block = {"tokens": torch.where(live & (ids >= 0), ids, self.tok.pad_id),
                 "doc_ids": torch.where(live, 0, PAD_DOC).expand(-1, Lq),
                 "image_ids": torch.full_like(ids, NO_IMAGE),
                 "pos": torch.where(live, run.next_pos[:, None] + torch.arange(Lq), 0)}
        block["ids"] = []
        if image_ids is not None:
            patch = live & (ids == IMAGE_POSITION)
            block["image_ids"] = torch.where(patch, torch.tensor(image_ids)[:, None], NO_IMAGE)
            block["ids"] = [image_ids[r] for r in patch.any(1).nonzero()[:, 0].tolist()]
        run.next_pos += Lq * real
        return {k: v if k == "ids" else v.to(self.device) for k, v in block.items()}

    def _attention_mask(self, run: Run, mask: torch.Tensor) -> torch.Tensor | RowGroups:
        """The mask of a cached step; with guidance, each row group (prompts, unconditional rows, image-only rows)
        attends over its own columns only: a guidance row's context is short, but left-padded to the prompts'
        width (the first step after the prefill on: a padding query must see at least itself)."""
        if not run.guided or run.stream.length == 0:
            return mask
        groups = [(a, a + run.B, min(run.first[a:a + run.B])) for a in range(0, run.R, run.B)]
        starts = [s for *_, s in groups]
        return RowGroups(mask, groups) if max(starts) - min(starts) >= MIN_SKIPPED_KEYS else mask

    def _retire(self, run: Run, rows: list[int]) -> None:
        """Guidance rows see their prompt part alone again (BOS; an image-only row its input images too): retire
        the BOI and image they added."""
        st = run.stream
        for r in rows:
            st.doc_ids[r] = torch.where(st.pos[r] >= run.keep[r], PAD_DOC, st.doc_ids[r])
            run.next_pos[r] = run.keep[r]

    def _decode_images(self, outputs: list[list]) -> list[list]:
        images = [seg for out in outputs for seg in out if isinstance(seg, torch.Tensor)]
        if not images:
            return outputs
        pixels = iter(self.decode(torch.stack(images)))
        return [[next(pixels) if isinstance(seg, torch.Tensor) else seg for seg in out] for out in outputs]
