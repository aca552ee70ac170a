"""Transfusion's images: BOI switches to diffusion mode, EOI back to LM mode (paper section 3, Inference).

n pure-noise patches are appended and denoised by the respaced sampler, each step's prediction
replacing the patches; then the clean latent (t = 0) and EOI are run once and committed. With the KV
cache a denoising step runs only the n patches against the cached prefix and never writes the noisy
states into the cache.

The cosine schedule's alpha_bar at t = T is about 2e-9, so the clean latent implied by the first noise
predictions multiplies their errors by ~2e4; bounding it (``clip_x0``, as pixel-space DDPM clips to
[-1, 1]) keeps an imperfect model's chain from diverging. Latents have unit variance; 5 is loose.
The model's schedule (``transfusion.schedules``) runs the chain: a rectified-flow model (``objective: flow``) predicts
velocities instead, sampled by Euler steps (``sampler: euler``; ``clip_x0`` bounds its implied x0 = x_s - s v), with
the same guidance formulas on velocities.

Classifier-free guidance: eps = eps_u + s (eps_c - eps_u), eps_u from the prompt's unconditional row; for
editing (``image_cfg_scale`` s_I) eps = eps_u + s_I (eps_i - eps_u) + s (eps_c - eps_i), eps_i from the row
that keeps the prompt's images without its text (InstructPix2Pix).

Legend: R rows, Lq new positions, n patches per image, C latent channels, h x w latent size.
"""

from __future__ import annotations

import torch

from transfusion.generation.base import MixedModalGenerator, Run
from transfusion.models.attention import dense_mask
from transfusion.models.kv_cache import set_commit


class TransfusionGenerator(MixedModalGenerator):
    """Generates from a ``Transfusion`` model, a ``KLAutoencoder`` (its latent scale included) and a ``Tokenizer``."""

    def __init__(self, model, autoencoder, tokenizer, options=None, seed: int = 0):
        super().__init__(model, autoencoder, tokenizer, options, seed)
        self.n = model.cfg.patches_per_image
        model.schedule.check_sampler(self.options.sampler)

    def _image_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_latents(pixels[None])[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_latents(latents)

    def _forward(self, run: Run, block: dict, images: dict[int, tuple[torch.Tensor, int]], commit: bool):
        """Hidden states (R, Lq, D) of the new positions and predicted noise by image id; ``images``: id -> (x_t, t)
        for the images in the block (committed clean latents are looked up by id)."""
        st, Lq = run.stream, block["tokens"].shape[1]
        full = st.stage(block)  # committed positions, then the block's: (R, S + Lq) each
        if self.options.use_cache:
            tokens, doc, img, pos = block["tokens"], block["doc"], block["img"], block["pos"]
            mask = self._attention_mask(run, dense_mask(full["doc"], full["img"], self.model.cfg.bidirectional_images,
                                                        num_queries=Lq))
            set_commit(run.caches, commit)
            caches = run.caches
        else:
            tokens, doc, img, pos = full["tokens"], full["doc"], full["img"], full["pos"]
            mask, caches = dense_mask(doc, img, self.model.cfg.bidirectional_images), None
        if self.options.use_cache:
            ids = block["ids"]  # images in the block, row-major (known on the host: no sync)
        else:
            ids = [int(i) for i in img[img >= 0].view(-1, self.n)[:, 0]]
        lookup = {i: (x, 0) for i, x in st.latents.items()} | images
        x_t = torch.stack([lookup[i][0] for i in ids]) if ids else None
        t = torch.tensor([lookup[i][1] for i in ids], device=self.device) if ids else None
        hidden, eps = self.model(tokens, doc, img, x_t, t, mask=mask, pos=pos, caches=caches)
        if commit:
            st.commit(Lq)
            st.latents.update({i: x for i, (x, t_i) in images.items()})
        return hidden[:, -Lq:], ({i: eps[j] for j, i in enumerate(ids) if i in images} if ids else {})

    def _generate_images(self, run: Run, image_rows: list[int]) -> dict[int, torch.Tensor]:
        """Denoise one latent per prompt row in ``image_rows``, then commit it (t = 0) and EOI."""
        groups = run.R // run.B  # prompt rows, then unconditional and image-only rows
        rows = [r + g * run.B for g in range(groups) for r in image_rows]
        active = torch.zeros(run.R, dtype=torch.bool)
        active[rows] = True
        ids = {r: run.next_image_id + k for k, r in enumerate(rows)}
        run.next_image_id += len(rows)
        start = run.next_pos.clone()
        img_ids = [ids.get(r, -1) for r in range(run.R)]
        noisy = self._block(run, [[-1] * self.n] * run.R, active, img_ids)  # the same positions at every step
        run.next_pos.copy_(start)  # noisy patches are never committed: positions do not advance

        def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t_now = t[0].item()  # an int for DDPM, a float s T for flow
            images = {ids[r]: (x[k % len(image_rows)], t_now) for k, r in enumerate(rows)}
            _, eps = self._forward(run, noisy, images, commit=False)
            eps_c, eps_u, eps_i = (torch.stack([eps[ids[r + g * run.B]] for r in image_rows]) if g < groups else None
                                   for g in range(3))
            if groups == 1:
                return eps_c
            if groups == 2:
                return eps_u + self.options.cfg_scale * (eps_c - eps_u)
            return eps_u + self.options.image_cfg_scale * (eps_i - eps_u) + self.options.cfg_scale * (eps_c - eps_i)

        o, cfg = self.options, self.model.cfg
        shape = (len(image_rows), cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        x0 = self.model.schedule.sample(denoiser, shape, num_steps=o.num_steps, sampler=o.sampler, clip_x0=o.clip_x0,
                                         generator=[run.generators[r] for r in image_rows],
                                         device=self.device, dtype=self.model.embedding.weight.dtype)
        block = self._block(run, [[-1] * self.n + [self.tok.eoi_id]] * run.R, active, img_ids)
        hidden, _ = self._forward(run, block, {ids[r]: (x0[k % len(image_rows)], 0) for k, r in enumerate(rows)},
                                  commit=True)
        for r in image_rows:
            run.logits[r] = self.model.lm_head(hidden[r, -1])
        if run.guided:
            self._retire(run, rows[len(image_rows):])
        return {r: x0[k] for k, r in enumerate(image_rows)}
