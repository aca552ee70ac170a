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

from transfusion.generation.base import (IMAGE_ONLY, IMAGE_POSITION, NO_IMAGE, PROMPT, UNCONDITIONAL,
                                         MixedModalGenerator, Run)


class TransfusionGenerator(MixedModalGenerator):
    """Generates from a ``Transfusion`` model, a ``KLAutoencoder`` (its latent scale included) and a ``Tokenizer``."""

    def __init__(self, model, autoencoder, tokenizer, options=None, seed: int = 0):
        super().__init__(model, autoencoder, tokenizer, options, seed)
        self.patches_per_image, self.bidirectional = model.cfg.patches_per_image, model.cfg.bidirectional_images
        model.schedule.check_sampler(self.options.sampler)

    def _image_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_latents(pixels[None])[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_latents(latents)

    def _run_model(self, inputs: dict, ids: list[int], images: dict, mask, caches):
        x_t = torch.stack([images[i][0] for i in ids]) if ids else None
        t = torch.tensor([images[i][1] for i in ids], device=self.device) if ids else None
        return self.model(inputs["tokens"], inputs["doc_ids"], inputs["image_ids"], x_t, t, mask=mask,
                          pos=inputs["pos"], caches=caches)

    def _generate_images(self, run: Run, image_rows: list[int]) -> dict[int, torch.Tensor]:
        """Denoise one latent per prompt row in ``image_rows`` (its guidance rows alongside), then commit it (t = 0)
        and EOI."""
        rows = run.rows(image_rows)  # group by group: the prompts', then their guidance rows
        active = torch.zeros(run.R, dtype=torch.bool)
        active[rows] = True
        ids = {r: run.next_image_id + k for k, r in enumerate(rows)}  # each row's image id
        run.next_image_id += len(rows)
        start = run.next_pos.clone()
        image_ids = [ids.get(r, NO_IMAGE) for r in range(run.R)]
        n = self.patches_per_image
        noisy = self._block(run, [[IMAGE_POSITION] * n] * run.R, active, image_ids)  # the same positions each step
        run.next_pos.copy_(start)  # noisy patches are never committed: positions do not advance

        def images(x: torch.Tensor, t) -> dict:
            """id -> (x_t, t) of every row's image: prompt k's latent x[k] in each of its row groups."""
            return {ids[run.row(r, g)]: (x[k], t) for g in range(run.groups) for k, r in enumerate(image_rows)}

        def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _, predicted = self._forward(run, noisy, images(x, t[0].item()), commit=False)  # t: DDPM int, flow s T
            return self._guide([torch.stack([predicted[ids[run.row(r, g)]] for r in image_rows])
                                for g in range(run.groups)])

        o, cfg = self.options, self.model.cfg
        shape = (len(image_rows), cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        x0 = self.model.schedule.sample(denoiser, shape, num_steps=o.num_steps, sampler=o.sampler, clip_x0=o.clip_x0,
                                        generator=[run.generators[r] for r in image_rows],
                                        device=self.device, dtype=self.model.embedding.weight.dtype)
        block = self._block(run, [[IMAGE_POSITION] * n + [self.tok.eoi_id]] * run.R, active, image_ids)
        hidden, _ = self._forward(run, block, images(x0, 0), commit=True)
        for r in image_rows:
            run.logits[r] = self.model.lm_head(hidden[r, -1])
        if run.guided:
            self._retire(run, run.guidance_rows(image_rows))
        return {r: x0[k] for k, r in enumerate(image_rows)}

    def _guide(self, predicted: list[torch.Tensor]) -> torch.Tensor:
        """Guided prediction from the row groups' (I, C, h, w) each: conditional c, unconditional u, image-only i."""
        o = self.options
        if len(predicted) == 1:
            return predicted[0]
        c, u = predicted[PROMPT], predicted[UNCONDITIONAL]
        if len(predicted) == 2:
            return u + o.cfg_scale * (c - u)
        i = predicted[IMAGE_ONLY]
        return u + o.image_cfg_scale * (i - u) + o.cfg_scale * (c - i)
