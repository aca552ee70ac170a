"""The mixed-modal sampling loop shared by both models (paper section 3, Inference).

LM mode samples one token at a time (greedy, temperature, top-p) until EOS or the token budget. When BOI
is sampled (or a prompt ends with ``IMAGE``), the subclass generates the image (``_generate_images``:
diffusion for Transfusion, code by code for Chameleon) and commits it with EOI; LM mode then resumes,
conditioned on the image.

Rows advance in lock step. A row with nothing to do in a step gets padding positions that belong to no
document (doc id -1): no real position attends them, and RoPE positions are tracked per row, so padding
never shifts a row's positions. Prompts are left-padded the same way.

Classifier-free guidance pairs each prompt with an unconditional row (the caption dropped, as in
training: ``BOS BOI <image>``) in the same batch. The unconditional row's BOI and image are retired from
view after each image, so every image sees ``BOS BOI`` alone.

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
from transfusion.models.kv_cache import make_caches

PAD_DOC = -1
_KEYS = ("tokens", "doc", "img", "pos")


class Stream:
    """Committed positions of all rows: ids, documents, images and RoPE positions, each (R, S)."""

    def __init__(self, rows: int, device):
        empty = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self.tokens, self.doc, self.img, self.pos = empty, empty.clone(), empty.clone(), empty.clone()
        self.latents: dict[int, torch.Tensor] = {}  # committed clean latents by image id (Transfusion)

    def append(self, block: dict) -> None:
        for key in _KEYS:
            setattr(self, key, torch.cat([getattr(self, key), block[key]], dim=1))


@dataclass
class Run:
    """Everything one ``generate`` call changes: the stream and caches, positions, and per-prompt progress."""

    B: int  # prompts
    R: int  # rows: B, or 2B with guidance
    generators: list[torch.Generator]  # one per prompt
    stream: Stream
    caches: list
    next_pos: torch.Tensor  # (R,) RoPE position of each row's next position
    budget: list[int]  # text tokens each prompt may still sample
    pending: list[bool]  # the prompt's BOI is committed and its image not yet generated
    done: list[bool] = field(default_factory=list)
    outputs: list[list] = field(default_factory=list)  # per prompt: str and image segments so far
    text: list[list[int]] = field(default_factory=list)  # per prompt: text ids not yet decoded into outputs
    next_image_id: int = 0
    logits: torch.Tensor | None = None  # (R, V) next-token logits of every row

    @property
    def guided(self) -> bool:
        return self.R > self.B

    def flush_text(self, r: int, decode) -> None:
        if self.text[r]:
            self.outputs[r].append(decode(self.text[r]))
            self.text[r] = []


class MixedModalGenerator:
    """Generates text and images for prompts: ``generate``, or the ``generate_images`` / ``generate_captions``
    shortcuts. Subclasses say how images enter (``_image_input``), are generated and are decoded.

    A prompt is a list of segments: ``str`` (text), an image (PIL RGB or a (3, H, W) tensor in [-1, 1]),
    and optionally ``IMAGE`` last (generate an image right away). The generator holds only the networks
    and settings; each call keeps its state in a ``Run``.
    """

    options_class = SamplingOptions
    n: int  # positions per image (set by subclasses)

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

    def _forward(self, run: Run, block: dict, images: dict, commit: bool):
        """Run the new positions ``block``; hidden states (R, Lq, D) and the subclass's per-image outputs."""
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
        overrides = {"cfg_scale": 1.0} | ({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})
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

    def _encode_prompt(self, prompt, index: int) -> tuple[list[int], list[torch.Tensor], bool]:
        """Token ids (-1 at image positions), what the model reads for its images, and whether it forces BOI."""
        if isinstance(prompt, (str, Image.Image, torch.Tensor)):
            prompt = [prompt]
        ids, images, force = [self.tok.bos_id], [], False
        for j, segment in enumerate(prompt):
            if segment is IMAGE:
                if j != len(prompt) - 1:
                    raise ValueError(f"prompt {index}: IMAGE may only end a prompt")
                ids.append(self.tok.boi_id)
                force = True
            elif isinstance(segment, str):
                ids += self.tok.encode(segment)
            else:
                images.append(self._image_input(self._pixels(segment, f"prompt {index}, segment {j}")))
                ids += [self.tok.boi_id] + [-1] * self.n + [self.tok.eoi_id]
        if len(ids) + (self.n + 1 if force else 1) > self.max_len:
            raise ValueError(f"prompt {index} has {len(ids)} positions; with what it asks to generate it exceeds "
                             f"the model's context max_seq_len={self.max_len}")
        return ids, images, force

    # ------------------------------------------------------------------ the phases: prefill, then image and text steps
    def _start(self, encoded: list, seeds: list[int], max_new_tokens: list[int | None] | None) -> Run:
        """The state of a new call: rows (with guidance, an unconditional row per prompt), empty caches."""
        B = len(encoded)
        R = 2 * B if self.options.cfg_scale != 1.0 else B
        budget = [self.options.max_new_tokens if b is None else b for b in (max_new_tokens or [None] * B)]
        return Run(B=B, R=R, generators=[torch.Generator(self.device).manual_seed(int(s)) for s in seeds],
                   stream=Stream(R, self.device), caches=make_caches(len(self.model.transformer.layers)),
                   next_pos=torch.zeros(R, dtype=torch.long), budget=budget,
                   pending=[force for _, _, force in encoded], done=[False] * B,
                   outputs=[[] for _ in range(B)], text=[[] for _ in range(B)])

    def _prefill(self, run: Run, encoded: list) -> None:
        """Commit every prompt, left-padded so each row's last token is in the last column."""
        B, R, tok = run.B, run.R, self.tok
        rows = [ids for ids, _, _ in encoded]
        if run.guided:  # unconditional rows: BOS, and BOI where the prompt forces an image
            rows += [[tok.bos_id] + ([tok.boi_id] if force else []) for _, _, force in encoded]
        width = max(len(r) for r in rows)
        images, prompt_img_ids = {}, []
        for r in range(R):
            inputs = encoded[r][1] if r < B else []
            prompt_img_ids.append(list(range(run.next_image_id, run.next_image_id + len(inputs))))
            images.update({run.next_image_id + k: (x, 0) for k, x in enumerate(inputs)})
            run.next_image_id += len(inputs)
        block = self._empty_block(R, width)
        for r, ids in enumerate(rows):
            ids_t, cols = torch.tensor(ids), slice(width - len(ids), width)
            block["tokens"][r, cols] = torch.where(ids_t >= 0, ids_t, tok.pad_id)
            block["doc"][r, cols] = 0
            block["pos"][r, cols] = torch.arange(len(ids))
            if prompt_img_ids[r]:
                block["img"][r, cols][ids_t == -1] = torch.tensor(prompt_img_ids[r]).repeat_interleave(self.n)
            run.next_pos[r] = len(ids)
        hidden, _ = self._forward(run, {k: v.to(self.device) for k, v in block.items()}, images, commit=True)
        run.logits = self.model.lm_head(hidden[:, -1])  # (R, V)

    def _images_due(self, run: Run) -> None:
        """Generate the image of every prompt whose BOI is committed (a row without room for it stops)."""
        image_rows = [r for r in range(run.B) if run.pending[r] and not run.done[r]]
        if not image_rows:
            return
        for r in image_rows:
            run.flush_text(r, self.tok.decode)
            if run.next_pos[r] + self.n + 1 > self.max_len:  # no room for n positions + EOI: stop
                run.done[r] = True
        image_rows = [r for r in image_rows if not run.done[r]]
        for r, image in (self._generate_images(run, image_rows) if image_rows else {}).items():
            run.outputs[r].append(image)
        for r in image_rows:
            run.pending[r] = False

    def _text_step(self, run: Run) -> bool:
        """Sample and commit one token for every active prompt; False when no prompt has anything left to do."""
        tok = self.tok
        active = [not run.done[r] and run.budget[r] > 0 and run.next_pos[r] < self.max_len for r in range(run.B)]
        if not any(active):
            return False
        next_tokens = self._sample(run, run.logits[: run.B])
        step_rows, real = [], torch.zeros(run.R, dtype=torch.bool)
        for r in range(run.B):
            token = int(next_tokens[r])
            if not active[r] or token == tok.eos_id:
                run.done[r] = True
                step_rows.append([tok.pad_id])
                continue
            run.budget[r] -= 1
            real[r] = True
            step_rows.append([token])
            if token == tok.boi_id:
                run.pending[r] = True
                if run.guided:
                    real[r + run.B] = True
            else:
                run.text[r].append(token)
        if run.guided:
            step_rows += [[tok.boi_id]] * run.B
        if not real.any():
            return False
        hidden, _ = self._forward(run, self._block(run, step_rows, real), {}, commit=True)
        real = real.to(self.device)
        run.logits[real] = self.model.lm_head(hidden[real, -1])
        return True

    # ------------------------------------------------------------------ helpers
    def _sample(self, run: Run, logits: torch.Tensor) -> torch.Tensor:
        """Next text token ids (B,) from logits (B, V)."""
        logits = logits.float().index_fill(-1, self.banned, float("-inf"))
        return sample_tokens(logits, self.options.temperature, self.options.top_p, run.generators)

    def _empty_block(self, R: int, Lq: int) -> dict:
        block = {k: torch.zeros(R, Lq, dtype=torch.long) for k in _KEYS}
        block["doc"][:], block["img"][:], block["tokens"][:] = PAD_DOC, -1, self.tok.pad_id
        return block

    def _block(self, run: Run, rows: list[list[int]], real: torch.Tensor, img_ids: list[list[int]] | None = None) -> dict:
        """New positions: ``rows[r]`` token ids (-1 = image position) for rows where ``real[r]``, else padding."""
        Lq = len(rows[0])
        block = self._empty_block(run.R, Lq)
        for r in range(run.R):
            if not real[r]:
                continue
            ids = torch.tensor(rows[r])
            block["tokens"][r] = torch.where(ids >= 0, ids, self.tok.pad_id)
            block["doc"][r] = 0
            block["pos"][r] = run.next_pos[r] + torch.arange(Lq)
            if img_ids is not None:
                block["img"][r, ids == -1] = torch.tensor(img_ids[r]).repeat_interleave(self.n)[: int((ids == -1).sum())]
            run.next_pos[r] += Lq
        return {k: v.to(self.device) for k, v in block.items()}

    def _retire_unconditional(self, run: Run, rows: list[int]) -> None:
        """The unconditional rows see BOS alone again: retire their BOI and image."""
        st = run.stream
        for r in rows:
            st.doc[r] = torch.where(st.pos[r] >= 1, PAD_DOC, st.doc[r])
            run.next_pos[r] = 1

    def _decode_images(self, outputs: list[list]) -> list[list]:
        images = [seg for out in outputs for seg in out if isinstance(seg, torch.Tensor)]
        if not images:
            return outputs
        pixels = iter(self.decode(torch.stack(images)))
        return [[next(pixels) if isinstance(seg, torch.Tensor) else seg for seg in out] for out in outputs]
