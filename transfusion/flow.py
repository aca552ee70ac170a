"""Rectified flow (Liu et al. 2022) for Transfusion's image part: ``objective: flow``, in place of ``Diffusion``.

Plain PyTorch, no parameters, the interface of ``transfusion.diffusion.Diffusion`` that the model and the
generator use. The path is straight: x_s = (1 - s) x0 + s noise for s in [0, 1]; the network predicts its
velocity v = dx_s/ds = noise - x0; images are sampled by Euler steps from s = 1 (pure noise) to s = 0.
Training draws s logit-normal: s = sigmoid(z), z ~ N(0, 1) (Esser et al. 2024, SD3).

Time is kept in DDPM units so that what reads timesteps (the timestep embedding, ``t > 0`` for noised images,
validation buckets, ``max_t`` limits) works unchanged: t = s T (float), T = num_timesteps, t = 0 clean data.
An integer DDPM limit ``max_t`` (image-first rows: 500) is the noise level s of the same signal-to-noise
ratio, (1 - s)^2 / s^2 = alpha_bar / (1 - alpha_bar) under the cosine schedule (``noise_level``), and the
draws are truncated to s <= that.

Shape legend: N images, ... trailing dims of one image, S inference steps.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from transfusion.diffusion import start_noise, steps


class RectifiedFlow:
    """Straight path from data (t = 0) to noise (t = T), velocity target, logit-normal training times, Euler sampler."""

    SAMPLERS = ("euler",)

    def __init__(self, num_timesteps: int = 1000, cosine_s: float = 0.008):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        if not (math.isfinite(cosine_s) and cosine_s >= 0):
            raise ValueError(f"cosine_s must be a finite number >= 0, got {cosine_s!r}")
        self.num_timesteps = num_timesteps
        self.cosine_s = float(cosine_s)  # of the DDPM cosine schedule that ``noise_level`` matches

    def __repr__(self) -> str:
        return f"RectifiedFlow(num_timesteps={self.num_timesteps}, cosine_s={self.cosine_s})"

    # ------------------------------------------------------------------ helpers

    def _s(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """s = t / T in like's dtype (computed in at least float32), shaped (N, 1, ..., 1) to broadcast over like."""
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != like.shape[0] or t.is_complex():
            raise ValueError(f"t must be a (N,) = ({like.shape[0]},) tensor, got {type(t).__name__} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        s = t.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32)) / self.num_timesteps
        return s.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def noise_level(self, t: torch.Tensor | int) -> torch.Tensor:
        """The s whose SNR (1 - s)^2 / s^2 equals DDPM's alpha_bar_t / (1 - alpha_bar_t) (cosine schedule, Nichol &
        Dhariwal 2021), float64: s = sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab)). 0 at t = 0; 1 at t = T, where the
        unclipped cosine alpha_bar is 0 (DDPM clips its last beta to 0.999: alpha_bar_T ~ 2e-9, s ~ 1 - 5e-5)."""
        t = torch.as_tensor(t).to(torch.float64)
        T, c = self.num_timesteps, self.cosine_s
        f = lambda u: torch.cos((u / T + c) / (1 + c) * (math.pi / 2)) ** 2  # noqa: E731
        ab = (f(t) / f(torch.zeros((), dtype=torch.float64))).clamp(0, 1)
        return ((1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())).clamp(0, 1)

    # ------------------------------------------------------------------ training

    def sample_timesteps(
        self,
        n: int,
        max_t: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """n times t = s T (float32), s logit-normal truncated to s <= noise_level(max_t); ``max_t``: an int or (n,)
        integer tensor of DDPM timesteps in 1..T (None: T, no truncation). Exact by inverse CDF:
        z = Phi^-1(u Phi(logit s_max)), u ~ U(0, 1), s = sigmoid(z)."""
        T = self.num_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if device is None:
            device = max_t.device if isinstance(max_t, torch.Tensor) else getattr(generator, "device", None)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if max_t is None:
            max_t = T
        if isinstance(max_t, torch.Tensor):
            if max_t.is_floating_point() or max_t.is_complex() or max_t.dtype == torch.bool:
                raise ValueError(f"max_t must be an integer tensor, got dtype {max_t.dtype}")
            if max_t.dim() > 1 or (max_t.dim() == 1 and max_t.shape[0] != n):
                raise ValueError(f"max_t must be an int, a 0-d tensor or shape ({n},), got {tuple(max_t.shape)}")
            if max_t.numel() and not (1 <= int(max_t.min()) and int(max_t.max()) <= T):
                raise ValueError(f"max_t values must lie in 1..{T}, got range {int(max_t.min())}..{int(max_t.max())}")
        elif isinstance(max_t, bool) or not isinstance(max_t, int) or not 1 <= max_t <= T:
            raise ValueError(f"max_t must be an int in 1..{T}, got {max_t!r}")

        # float64 where the device has it (not MPS); u at the midpoints of 2^53 cells: in (0, 1), so s > 0 (t = 0
        # would mean "entered clean, no loss")
        work = torch.device("cpu") if device.type == "mps" else device
        u = (torch.randint(0, 2**53, (n,), generator=generator, device=device).to(work, torch.float64) + 0.5) / 2**53
        s_max = self.noise_level(max_t.to(work) if isinstance(max_t, torch.Tensor) else max_t).to(work)
        z_max = s_max.log() - (-s_max).log1p()  # logit; +inf at s_max = 1
        s = torch.sigmoid(torch.special.ndtri(u * torch.special.ndtr(z_max)))
        return (torch.minimum(s, s_max) * T).to(device, torch.float32)  # minimum: float64 rounding of the inverse

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) x0 + s noise, s = t / T, in x0's dtype; t = 0 gives x0 back bit-for-bit."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must match x0 shape {tuple(x0.shape)}")
        s = self._s(t, x0)
        return (1 - s) * x0 + s * noise.to(x0.dtype)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target v = dx_s/ds = noise - x0 (the same at every s)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must match x0 shape {tuple(x0.shape)}")
        return noise.to(x0.dtype) - x0

    def predict_x0(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a predicted velocity: x0 = x_s - s v."""
        if v.shape != x_t.shape:
            raise ValueError(f"v shape {tuple(v.shape)} must match x_t shape {tuple(x_t.shape)}")
        return x_t - self._s(t, x_t) * v.to(x_t.dtype)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: Sequence[int],
        num_steps: int = 250,
        sampler: str = "euler",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        x_T: torch.Tensor | None = None,
        progress: bool = False,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """Euler from x_1 ~ N(0, I) (or the given x_T) to x_0 over s_k = k / S, k = S..0, calling velocity_fn(x, t)
        with t = s_k T (N,) float32: x <- x + (s_{k-1} - s_k) v.

        ``clip_x0``: bound the implied clean latent x0 = x - s v and step on the straight line through it and the
        implied noise x + (1 - s) v, x <- (1 - s_{k-1}) x0 + s_{k-1} noise (the Euler step when nothing is clipped;
        DDIM re-derives its eps the same way). Rarely active: unlike DDPM's at t = T, x0 = x - v is not amplified.
        """
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler must be one of {self.SAMPLERS} for rectified flow, got {sampler!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0!r}")
        x, shape = start_noise(shape, x_T, generator, device, dtype)
        levels = [k / num_steps for k in range(num_steps, -1, -1)]  # 1 = s_S > ... > s_0 = 0
        for s, s_prev in steps(levels, progress, f"{sampler} sampling"):
            v = velocity_fn(x, torch.full((shape[0],), s * self.num_timesteps, dtype=torch.float32, device=x.device))
            if v.shape != x.shape:
                raise ValueError(f"velocity shape {tuple(v.shape)} must match x shape {tuple(x.shape)}")
            v = v.to(x.dtype)
            if clip_x0 is None:
                x = x + (s_prev - s) * v
            else:
                x0 = (x - s * v).clamp(-clip_x0, clip_x0)
                x = (1 - s_prev) * x0 + s_prev * (x + (1 - s) * v)
        return x
