"""Mixed-modal generation (paper section 3, Inference): LM mode, BOI -> diffusion mode, EOI -> LM mode.

LM mode samples one token at a time (greedy, temperature, top-p) until EOS or the token budget. When
BOI is sampled (or a prompt ends with ``IMAGE``), n pure-noise patches are appended and denoised by the
respaced sampler, each step's prediction replacing the patches; then the clean latent (t = 0) and EOI
are run once and committed, and LM mode resumes conditioned on the clean image.

With ``use_cache`` (default) every committed position is kept in a KV cache: a text step runs one token,
a denoising step runs only the n patches against the cached prefix and never writes the noisy states
into the cache. ``use_cache=False`` recomputes the whole sequence at every step (the reference).

The cosine schedule's alpha_bar at t = T is about 2e-9, so the clean latent implied by the first noise
predictions multiplies their errors by ~2e4; bounding it (``clip_x0``, as pixel-space DDPM clips to
[-1, 1]) keeps an imperfect model's chain from diverging. Latents have unit variance; 5 is loose.

Classifier-free guidance pairs each prompt with an unconditional row (the caption dropped, as in
training: ``BOS BOI <patches>``) in the same batch; eps = eps_u + s (eps_c - eps_u). The unconditional
row's BOI and image are retired from view after each image, so every image sees ``BOS BOI`` alone.

Rows advance in lock step. A row with nothing to do in a step gets padding positions that belong to no
document (doc id -1): no real position attends them, and RoPE positions are tracked per row, so padding
never shifts a row's positions. Prompts are left-padded the same way.

Legend: R rows (prompts, then their unconditional rows), S committed length, Lq new positions,
n patches per image, C latent channels, h x w latent size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from transfusion.data.shapes import to_pil, to_tensor
from transfusion.models.attention import dense_mask
from transfusion.models.kv_cache import make_caches, set_commit

IMAGE = object()  # end a prompt with IMAGE to force BOI: the prompt's image is generated next
PAD_DOC = -1


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64  # text tokens per prompt
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    cfg_scale: float = 5.0  # 1: no guidance (no unconditional rows)
    num_steps: int = 250
    sampler: str = "ddpm"  # or "ddim"
    clip_x0: float | None = 5.0  # bound on predicted clean latents (unit variance); see below
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if self.clip_x0 is not None and self.clip_x0 <= 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {self.clip_x0}")


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generators) -> torch.Tensor:
    """Token ids (R,) from logits (R, V): greedy at temperature 0, else nucleus sampling with row r's generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]).squeeze(-1)


class _Stream:
    """Committed positions of all rows: ids, documents, images and RoPE positions, each (R, S)."""

    def __init__(self, rows: int, device):
        empty = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self.tokens, self.doc, self.img, self.pos = empty, empty.clone(), empty.clone(), empty.clone()
        self.latents: dict[int, torch.Tensor] = {}  # committed clean latents by image id

    def append(self, block: dict) -> None:
        for key in ("tokens", "doc", "img", "pos"):
            setattr(self, key, torch.cat([getattr(self, key), block[key]], dim=1))


class Generator:
    """Generates from a ``TransfusionModule``; ``generate(prompts)`` returns text and images per prompt.

    A prompt is a list of segments: ``str`` (text), an image (PIL RGB or a (3, H, W) tensor in [-1, 1]),
    and optionally ``IMAGE`` last (generate an image right away).
    """

    options_class = SamplingOptions

    def __init__(self, module, options: SamplingOptions | None = None, seed: int = 0):
        self.module, self.model, self.tok = module, module.model, module.tokenizer
        self.options = options or SamplingOptions()
        self.seed = seed
        layout = module.sequence_layout()
        self.n, self.image_size = layout.patches_per_image, layout.image_size  # n: positions per image
        self.max_len = module.config.transformer.max_seq_len
        self.device = module.device
        banned = [self.tok.pad_id, self.tok.eoi_id, self.tok.bos_id]  # never sampled as text
        self.banned = torch.tensor(banned, device=self.device)

    # ------------------------------------------------------------------ prompts
    def _image_latent(self, image, where: str) -> torch.Tensor:
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
        dtype = self.module.autoencoder.latent_std.dtype  # PIL images arrive as float32
        return self.module.encode_images(image[None].to(self.device, dtype))[0]

    def _encode_prompt(self, prompt, index: int) -> tuple[list[int], list[torch.Tensor], bool]:
        """Token ids (-1 at patch positions), the clean latents of its images, and whether it forces BOI."""
        if isinstance(prompt, (str, Image.Image, torch.Tensor)):
            prompt = [prompt]
        ids, latents, force = [self.tok.bos_id], [], False
        for j, segment in enumerate(prompt):
            if segment is IMAGE:
                if j != len(prompt) - 1:
                    raise ValueError(f"prompt {index}: IMAGE may only end a prompt")
                ids.append(self.tok.boi_id)
                force = True
            elif isinstance(segment, str):
                ids += self.tok.encode(segment)
            else:
                latents.append(self._image_latent(segment, f"prompt {index}, segment {j}"))
                ids += [self.tok.boi_id] + [-1] * self.n + [self.tok.eoi_id]
        if len(ids) + (self.n + 1 if force else 1) > self.max_len:
            raise ValueError(f"prompt {index} has {len(ids)} positions; with what it asks to generate it exceeds "
                             f"the model's context max_seq_len={self.max_len}")
        return ids, latents, force

    # ------------------------------------------------------------------ the model on a block of new positions
    def _run(self, block: dict, images: dict[int, tuple[torch.Tensor, int]], commit: bool):
        """Run new positions ``block`` (each (R, Lq)); ``images``: id -> (x_t, t) for images in the block.

        Returns hidden states of the block (R, Lq, D) and predicted noise by image id.
        """
        st, Lq = self.stream, block["tokens"].shape[1]
        if self.options.use_cache:
            tokens, doc, img, pos = block["tokens"], block["doc"], block["img"], block["pos"]
            mask = dense_mask(torch.cat([st.doc, doc], 1), torch.cat([st.img, img], 1),
                              self.model.cfg.bidirectional_images, num_queries=Lq)
            set_commit(self.caches, commit)
            caches = self.caches
        else:
            tokens, doc, img, pos = (torch.cat([getattr(st, k), block[k]], 1) for k in ("tokens", "doc", "img", "pos"))
            mask, caches = dense_mask(doc, img, self.model.cfg.bidirectional_images), None
        ids = [int(i) for i in img[img >= 0].view(-1, self.n)[:, 0]]  # images in row-major order
        lookup = {i: (x, 0) for i, x in st.latents.items()} | images
        x_t = torch.stack([lookup[i][0] for i in ids]) if ids else None
        t = torch.tensor([lookup[i][1] for i in ids], device=self.device) if ids else None
        hidden, eps = self.model(tokens, doc, img, x_t, t, mask=mask, pos=pos, caches=caches)
        if commit:
            st.append(block)
            st.latents.update({i: x for i, (x, t_i) in images.items()})
        return hidden[:, -Lq:], ({i: eps[j] for j, i in enumerate(ids) if i in images} if ids else {})

    def _block(self, rows: list[list[int]], real: torch.Tensor, img_ids: list[list[int]] | None = None) -> dict:
        """A block of new positions: ``rows[r]`` token ids (-1 = patch) for rows where ``real[r]``, else padding."""
        Lq = len(rows[0])
        block = {k: torch.zeros(self.R, Lq, dtype=torch.long) for k in ("tokens", "doc", "img", "pos")}
        block["doc"][:], block["img"][:], block["tokens"][:] = PAD_DOC, -1, self.tok.pad_id
        for r in range(self.R):
            if not real[r]:
                continue
            ids = torch.tensor(rows[r])
            block["tokens"][r] = torch.where(ids >= 0, ids, self.tok.pad_id)
            block["doc"][r] = 0
            block["pos"][r] = self.next_pos[r] + torch.arange(Lq)
            if img_ids is not None:
                block["img"][r, ids == -1] = torch.tensor(img_ids[r]).repeat_interleave(self.n)[: int((ids == -1).sum())]
            self.next_pos[r] += Lq
        return {k: v.to(self.device) for k, v in block.items()}

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids (R,) from logits (R, V)."""
        logits = logits.float().index_fill(-1, self.banned, float("-inf"))
        return sample_tokens(logits, self.options.temperature, self.options.top_p, self.generators)

    def _denoise(self, image_rows: list[int]) -> dict[int, torch.Tensor]:
        """Generate one image for each prompt row in ``image_rows`` (BOI already committed); commit it + EOI."""
        guided = self.R > self.B
        rows = image_rows + ([r + self.B for r in image_rows] if guided else [])
        active = torch.zeros(self.R, dtype=torch.bool)
        active[rows] = True
        ids = {r: self.next_image_id + k for k, r in enumerate(rows)}
        self.next_image_id += len(rows)
        start = self.next_pos.clone()
        patch_rows = [[-1] * self.n] * self.R
        img_ids = [[ids.get(r, -1)] for r in range(self.R)]

        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.next_pos.copy_(start)  # noisy patches are never committed: positions do not advance
            block = self._block(patch_rows, active, img_ids)
            images = {ids[r]: (x[k % len(image_rows)], int(t[0])) for k, r in enumerate(rows)}
            _, eps = self._run(block, images, commit=False)
            eps_c = torch.stack([eps[ids[r]] for r in image_rows])
            if not guided:
                return eps_c
            eps_u = torch.stack([eps[ids[r + self.B]] for r in image_rows])
            return eps_u + self.options.cfg_scale * (eps_c - eps_u)

        o, cfg = self.options, self.module.config
        shape = (len(image_rows), cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        x0 = self.model.diffusion.sample(eps_fn, shape, num_steps=o.num_steps,
                                         sampler=o.sampler, clip_x0=o.clip_x0,
                                         generator=[self.generators[r] for r in image_rows],
                                         device=self.device, dtype=self.model.embedding.weight.dtype)
        self.next_pos.copy_(start)
        block = self._block([[-1] * self.n + [self.tok.eoi_id]] * self.R, active, img_ids)
        hidden, _ = self._run(block, {ids[r]: (x0[k % len(image_rows)], 0) for k, r in enumerate(rows)}, commit=True)
        for r in image_rows:
            self.logits[r] = self.model.lm_head(hidden[r, -1])
        if guided:
            self._retire_unconditional(rows[len(image_rows):])
        return {r: x0[k] for k, r in enumerate(image_rows)}

    def _retire_unconditional(self, rows: list[int]) -> None:
        """The unconditional rows see BOS alone again: retire their BOI and image."""
        st = self.stream
        for r in rows:
            st.doc[r] = torch.where(st.pos[r] >= 1, PAD_DOC, st.doc[r])
            self.next_pos[r] = 1

    @torch.no_grad()
    def generate(self, prompts: list, seeds: list[int] | None = None, decode: bool = True,
                 max_new_tokens: list[int | None] | None = None) -> list[list]:
        """Per prompt, the generated segments in order: ``str`` text and (3, H, W) image tensors in [-1, 1].

        Prompt i draws its noise from its own generator seeded ``seeds[i]`` (default: seed + i), so its
        output does not depend on the batch. ``decode=False`` returns image latents (C, h, w) instead.
        ``max_new_tokens`` overrides the options' text budget per prompt (None entries keep it).
        """
        if not prompts:
            return []
        seeds = [self.seed + i for i in range(len(prompts))] if seeds is None else seeds
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        o, tok = self.options, self.tok
        encoded = [self._encode_prompt(p, i) for i, p in enumerate(prompts)]
        self.B = len(prompts)
        guided = o.cfg_scale != 1.0
        self.R = 2 * self.B if guided else self.B
        rows = [ids for ids, _, _ in encoded]
        if guided:  # unconditional rows: BOS, and BOI where the prompt forces an image
            rows += [[tok.bos_id] + ([tok.boi_id] if force else []) for _, _, force in encoded]
        self.stream, self.caches = _Stream(self.R, self.device), make_caches(len(self.model.transformer.layers))
        self.next_pos = torch.zeros(self.R, dtype=torch.long)
        self.next_image_id = 0

        # prefill, left-padded so every row's last prompt token is in the last column
        width = max(len(r) for r in rows)
        images, prompt_img_ids = {}, []
        for r in range(self.R):
            latents = encoded[r][1] if r < self.B else []
            prompt_img_ids.append(list(range(self.next_image_id, self.next_image_id + len(latents))))
            images.update({self.next_image_id + k: (x, 0) for k, x in enumerate(latents)})
            self.next_image_id += len(latents)
        block = {k: torch.zeros(self.R, width, dtype=torch.long) for k in ("tokens", "doc", "img", "pos")}
        block["doc"][:], block["img"][:], block["tokens"][:] = PAD_DOC, -1, tok.pad_id
        for r, ids in enumerate(rows):
            ids_t, cols = torch.tensor(ids), slice(width - len(ids), width)
            block["tokens"][r, cols] = torch.where(ids_t >= 0, ids_t, tok.pad_id)
            block["doc"][r, cols] = 0
            block["pos"][r, cols] = torch.arange(len(ids))
            if prompt_img_ids[r]:
                block["img"][r, cols][ids_t == -1] = torch.tensor(prompt_img_ids[r]).repeat_interleave(self.n)
            self.next_pos[r] = len(ids)
        hidden, _ = self._run({k: v.to(self.device) for k, v in block.items()}, images, commit=True)
        self.logits = self.model.lm_head(hidden[:, -1])  # (R, V)

        outputs: list[list] = [[] for _ in range(self.B)]
        text: list[list[int]] = [[] for _ in range(self.B)]
        budget = [o.max_new_tokens if b is None else b for b in (max_new_tokens or [None] * self.B)]
        done = [False] * self.B
        pending = [force for _, _, force in encoded]
        while True:
            image_rows = [r for r in range(self.B) if pending[r] and not done[r]]
            if image_rows:
                for r in image_rows:
                    if text[r]:
                        outputs[r].append(tok.decode(text[r]))
                        text[r] = []
                    if self.next_pos[r] + self.n + 1 > self.max_len:  # no room for n patches + EOI: stop
                        done[r] = True
                image_rows = [r for r in image_rows if not done[r]]
                for r, x0 in (self._denoise(image_rows) if image_rows else {}).items():
                    outputs[r].append(x0)
                for r in image_rows:
                    pending[r] = False
            active = [not done[r] and budget[r] > 0 and self.next_pos[r] < self.max_len for r in range(self.B)]
            if not any(active):
                break
            next_tokens = self._sample(self.logits[: self.B])
            step_rows, real = [], torch.zeros(self.R, dtype=torch.bool)
            for r in range(self.B):
                token = int(next_tokens[r])
                if not active[r] or token == tok.eos_id:
                    done[r] = True
                    step_rows.append([tok.pad_id])
                    continue
                budget[r] -= 1
                real[r] = True
                step_rows.append([token])
                if token == tok.boi_id:
                    pending[r] = True
                    if guided:
                        real[r + self.B] = True
                else:
                    text[r].append(token)
            if guided:
                step_rows += [[tok.boi_id]] * self.B
            if not real.any():
                break
            hidden, _ = self._run(self._block(step_rows, real), {}, commit=True)
            self.logits[real.to(self.device)] = self.model.lm_head(hidden[real.to(self.device), -1])
        for r in range(self.B):
            if text[r]:
                outputs[r].append(tok.decode(text[r]))
        return self._decode_images(outputs) if decode else outputs

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] for generated images (N, ...)."""
        return self.module.decode_latents(latents)

    def _decode_images(self, outputs: list[list]) -> list[list]:
        latents = [seg for out in outputs for seg in out if isinstance(seg, torch.Tensor)]
        if not latents:
            return outputs
        pixels = iter(self.decode(torch.stack(latents)))
        return [[next(pixels) if isinstance(seg, torch.Tensor) else seg for seg in out] for out in outputs]


def _generator(module, seed: int, **options) -> Generator:
    """The generator class the module names (``generator_class``; Transfusion's by default) with ``options``."""
    cls = getattr(module, "generator_class", Generator)
    return cls(module, cls.options_class(**options), seed)


def generate_images(module, captions: list[str], cfg_scale: float = 5.0, num_steps: int = 250, sampler: str = "ddpm",
                    seed: int = 0, use_cache: bool = True) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for N captions, each prompt ``caption`` + ``IMAGE``."""
    outputs = _generator(module, seed, max_new_tokens=0, cfg_scale=cfg_scale, num_steps=num_steps, sampler=sampler,
                         use_cache=use_cache).generate([[c, IMAGE] for c in captions])
    return torch.stack([next(s for s in out if isinstance(s, torch.Tensor)) for out in outputs])


def generate_captions(module, images, max_new_tokens: int = 32, use_cache: bool = True) -> list[str]:
    """Greedy captions for images ((N, 3, H, W) tensor in [-1, 1] or a list of PIL RGB images)."""
    outputs = _generator(module, 0, max_new_tokens=max_new_tokens, cfg_scale=1.0,
                         use_cache=use_cache).generate([[image] for image in images])
    return ["".join(s for s in out if isinstance(s, str)) for out in outputs]


def to_pil_images(segments: list) -> list:
    """Replace image tensors in a generated segment list by PIL images."""
    return [to_pil(s) if isinstance(s, torch.Tensor) else s for s in segments]
