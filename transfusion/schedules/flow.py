"""Rectified flow (Liu et al. 2022): ``objective: flow``, in place of DDPM.

The path is straight: x_s = (1 - s) x0 + s noise for s in [0, 1]; the network predicts its velocity
v = dx_s/ds = noise - x0; images are sampled by Euler steps from s = 1 (pure noise) to s = 0. Training draws s
logit-normal: s = sigmoid(z), z ~ N(0, 1) (Esser et al. 2024, SD3). The interface is
``transfusion.schedules.base.Schedule``.

Time is kept in DDPM units so that what reads timesteps (the timestep embedding, ``t > 0`` for noised images,
validation buckets, ``max_t`` limits) works unchanged: t = s T (float), T = num_timesteps, t = 0 clean data.
An integer DDPM limit ``max_t`` (image-first rows: 500) is the noise level s of the same signal-to-noise
ratio, (1 - s)^2 / s^2 = alpha_bar / (1 - alpha_bar) under the cosine schedule (``noise_level``), and the
draws are truncated to s <= that.

Shape legend: N images, ... trailing dims of one image, S inference steps.
"""

from __future__ import annotations

import math

import torch

from transfusion.schedules.base import Schedule, check_draw


class RectifiedFlow(Schedule):
    """Straight path from data (t = 0) to noise (t = T), velocity target, logit-normal training times, Euler sampler."""

    OBJECTIVE = "flow"
    SAMPLERS = ("euler",)
    FEW_STEP_SAMPLER = "euler"
    time_dtype = torch.float32

    def __init__(self, num_timesteps: int = 1000, cosine_s: float = 0.008):
        super().__init__(num_timesteps)
        if not (math.isfinite(cosine_s) and cosine_s >= 0):
            raise ValueError(f"cosine_s must be a finite number >= 0, got {cosine_s!r}")
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
    def sample_timesteps(self, n: int, max_t=None, generator=None, device=None) -> torch.Tensor:
        """n times t = s T (float32), s logit-normal truncated to s <= noise_level(max_t); ``max_t``: an int or (n,)
        integer tensor of DDPM timesteps in 1..T (None: T, no truncation). Exact by inverse CDF:
        z = Phi^-1(u Phi(logit s_max)), u ~ U(0, 1), s = sigmoid(z)."""
        T = self.num_timesteps
        max_t, device = check_draw(n, max_t, generator, device, T)
        # float64 where the device has it (not MPS); u at the midpoints of 2^53 cells: in (0, 1), so s > 0 (t = 0
        # would mean "entered clean, no loss")
        work = torch.device("cpu") if device.type == "mps" else device
        u = (torch.randint(0, 2**53, (n,), generator=generator, device=device).to(work, torch.float64) + 0.5) / 2**53
        s_max = self.noise_level(max_t.to(work) if isinstance(max_t, torch.Tensor) else max_t).to(work)
        z_max = s_max.log() - (-s_max).log1p()  # logit; +inf at s_max = 1
        s = torch.sigmoid(torch.special.ndtri(u * torch.special.ndtr(z_max)))
        return (torch.minimum(s, s_max) * T).to(device, torch.float32)  # minimum: float64 rounding of the inverse

    def draw_one(self, limit: int, generator: torch.Generator) -> torch.Tensor:
        return self.sample_timesteps(1, limit, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) x0 + s noise, s = t / T, in x0's dtype; t = 0 gives x0 back bit-for-bit."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must match x0 shape {tuple(x0.shape)}")
        s = self._s(t, x0)
        return (1 - s) * x0 + s * noise.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity v = dx_s/ds = noise - x0 (the same at every s)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must match x0 shape {tuple(x0.shape)}")
        return noise.to(x0.dtype) - x0

    def predict_x0(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a predicted velocity: x0 = x_s - s v."""
        if v.shape != x_t.shape:
            raise ValueError(f"v shape {tuple(v.shape)} must match x_t shape {tuple(x_t.shape)}")
        return x_t - self._s(t, x_t) * v.to(x_t.dtype)

    # ------------------------------------------------------------------ sampling
    def levels(self, num_steps: int) -> list[float]:
        """s_k = k / S for k = S..0: 1 = s_S > ... > s_0 = 0."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        return [k / num_steps for k in range(num_steps, -1, -1)]

    def time(self, level: float, n: int, device) -> torch.Tensor:
        return torch.full((n,), level * self.num_timesteps, dtype=torch.float32, device=device)

    def step(self, x, prediction, level, next_level, sampler: str = "euler", generator=None,
             clip_x0=None) -> torch.Tensor:
        """Euler from s to s' = ``next_level``: x <- x + (s' - s) v.

        ``clip_x0``: bound the implied clean latent x0 = x - s v and step on the straight line through it and the
        implied noise x + (1 - s) v, x <- (1 - s') x0 + s' noise (the Euler step when nothing is clipped; DDIM
        re-derives its eps the same way). Rarely active: unlike DDPM's at t = T, x0 = x - v is not amplified.
        """
        self.check_sampler(sampler)
        s, s_prev = level, next_level
        if prediction.shape != x.shape:
            raise ValueError(f"velocity shape {tuple(prediction.shape)} must match x shape {tuple(x.shape)}")
        v = prediction.to(x.dtype)
        if clip_x0 is None:
            return x + (s_prev - s) * v
        x0 = (x - s * v).clamp(-clip_x0, clip_x0)
        return (1 - s_prev) * x0 + s_prev * (x + (1 - s) * v)
