"""DDPM (Ho et al. 2020) with the cosine schedule (Nichol & Dhariwal 2021): ``objective: ddpm``, the paper's.

The network predicts the noise eps; training draws integer t uniformly from 1..max_t; images are sampled by
ancestral DDPM steps or deterministic DDIM steps over respaced timesteps. t = 0 is clean data (alpha_bar[0] == 1
exactly). The interface is ``transfusion.schedules.base.Schedule``.

Shape legend: N images, ... trailing dims of one image, T num_timesteps, S inference steps.
"""

from __future__ import annotations

import math

import torch

from transfusion.schedules.base import Schedule, check_draw, randn

_MAX_BETA = 0.999  # keeps 1 - beta > 0 so alpha_bar stays strictly decreasing and invertible


class DDPM(Schedule):
    """Cosine DDPM schedule over integer timesteps 0..T with DDPM and DDIM samplers."""

    OBJECTIVE = "ddpm"
    SAMPLERS = ("ddpm", "ddim")
    FEW_STEP_SAMPLER = "ddim"
    MIN_SNR = True

    def __init__(self, num_timesteps: int = 1000, cosine_s: float = 0.008):
        super().__init__(num_timesteps)
        if not (math.isfinite(cosine_s) and cosine_s >= 0):
            raise ValueError(f"cosine_s must be a finite number >= 0, got {cosine_s!r}")
        T = self.num_timesteps
        self.cosine_s = float(cosine_s)
        # alpha_bar(t) = f(t) / f(0), betas clipped, then alpha_bar rebuilt from them so the two always agree
        t = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((t / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        ab = f / f[0]
        betas = (1 - ab[1:] / ab[:-1]).clamp(min=0.0, max=_MAX_BETA)
        one = torch.ones(1, dtype=torch.float64)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # (T+1,), betas[0] = 0
        self.alpha_bar = torch.cat([one, torch.cumprod(1 - betas, dim=0)])  # (T+1,), float64
        # Per-t coefficients, computed once in float64; cast to the data's dtype on use.
        self._tables = {
            "sqrt_ab": self.alpha_bar.sqrt(),
            "sqrt_1m_ab": (1 - self.alpha_bar).sqrt(),
            "sqrt_recip_ab": self.alpha_bar.rsqrt(),
            "sqrt_recipm1_ab": (1 / self.alpha_bar - 1).sqrt(),
        }
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"DDPM(num_timesteps={self.num_timesteps}, cosine_s={self.cosine_s})"

    # ------------------------------------------------------------------ helpers
    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather table[name][t] in like's dtype/device, shaped (N, 1, ..., 1) to broadcast over like."""
        key = (name, like.device, like.dtype)
        table = self._cache.get(key)
        if table is None:
            # Cast on the CPU first: some devices (e.g. MPS) have no float64.
            table = self._cache[key] = self._tables[name].to(like.dtype).to(like.device)
        return table[t.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: torch.Tensor, x: torch.Tensor, name: str = "t") -> None:
        """Validate a per-image timestep tensor against a batch x."""
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer (N,) tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must have shape ({x.shape[0]},), got {tuple(t.shape)}")

    def _check_pair(self, t: int, t_prev: int) -> tuple[int, int]:
        """Validate one step t -> t_prev of a (possibly respaced) chain."""
        t, t_prev = int(t), int(t_prev)
        if not 0 <= t_prev < t <= self.num_timesteps:
            raise ValueError(f"need 0 <= t_prev < t <= {self.num_timesteps}, got t={t}, t_prev={t_prev}")
        return t, t_prev

    def _predict_x0_scalar(self, x_t, eps, t: int, clip_x0: float | None) -> torch.Tensor:
        """predict_x0 for one integer t shared by the whole batch, optionally clipped."""
        ab = float(self.alpha_bar[t])
        x0 = math.sqrt(1 / ab) * x_t - math.sqrt(1 / ab - 1) * eps
        if clip_x0 is not None:
            if clip_x0 <= 0:
                raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0!r}")
            x0 = x0.clamp(-clip_x0, clip_x0)
        return x0

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, n: int, max_t=None, generator=None, device=None) -> torch.Tensor:
        """Draw n timesteps uniformly from 1..max_t (max_t may be a per-element (n,) tensor)."""
        T = self.num_timesteps
        max_t, device = check_draw(n, max_t, generator, device, T)
        if isinstance(max_t, torch.Tensor):
            max_t = max_t.to(device=device, dtype=torch.long)
        # Integer draw then modulo: exact per-element ranges, bias ~ max_t / 2**62 (negligible).
        r = torch.randint(0, 2**62, (n,), generator=generator, device=device)
        return 1 + r % max_t

    def draw_one(self, limit: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(1, limit + 1, (1,), generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, in x0's dtype."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must match x0 shape {tuple(x0.shape)}")
        self._check_t(t, x0)
        # At t = 0 the coefficients are exactly 1 and 0, so x0 comes back bit-for-bit.
        return self._coef("sqrt_ab", t, x0) * x0 + self._coef("sqrt_1m_ab", t, x0) * noise.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise itself (epsilon prediction)."""
        return noise

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR_t, gamma) / SNR_t, (N,)
        float32 on t's device, with SNR_t = alpha_bar / (1 - alpha_bar).

        1 at the noisy timesteps (SNR <= gamma), where the picture's layout is decided and the epsilon MSE is
        small; below 1 at the clean ones, whose large epsilon MSE is about fine detail; 0 at t = 0 (SNR infinite).
        """
        name = f"min_snr_{gamma!r}"
        if name not in self._tables:  # one float64 table per gamma, gathered like the other coefficients
            snr = self.alpha_bar / (1 - self.alpha_bar)
            self._tables[name] = snr.clamp(max=gamma) / snr
        return self._coef(name, t, torch.empty(0, device=t.device))

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Invert add_noise given predicted noise: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
        if eps.shape != x_t.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} must match x_t shape {tuple(x_t.shape)}")
        self._check_t(t, x_t)
        eps = eps.to(x_t.dtype)
        return self._coef("sqrt_recip_ab", t, x_t) * x_t - self._coef("sqrt_recipm1_ab", t, x_t) * eps

    def bucket(self, t: torch.Tensor, buckets: int) -> torch.Tensor:
        return (t - 1) * buckets // self.num_timesteps

    # ------------------------------------------------------------------ sampling
    def timesteps_for_inference(self, num_steps: int = 250) -> torch.Tensor:
        """Evenly respaced timesteps (S,) long, strictly decreasing from T down to >= 1."""
        T = self.num_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an int in 1..{T} (num_timesteps), got {num_steps!r}")
        # t_k = floor(k T / S) for k = S..1: consecutive values differ by T/S >= 1, so all distinct.
        k = torch.arange(num_steps, 0, -1, dtype=torch.long)
        return (k * T) // num_steps

    def levels(self, num_steps: int) -> list[int]:
        return self.timesteps_for_inference(num_steps).tolist() + [0]

    def time(self, level: int, n: int, device) -> torch.Tensor:
        return torch.full((n,), level, dtype=torch.long, device=device)

    def step(self, x, prediction, level, next_level, sampler: str, generator=None, clip_x0=None) -> torch.Tensor:
        self.check_sampler(sampler)
        step = self.ddpm_step if sampler == "ddpm" else self.ddim_step
        return step(x, prediction, level, next_level, generator=generator, clip_x0=clip_x0)

    def posterior_variance(self, t: int, t_prev: int) -> float:
        """Variance of q(x_prev | x_t, x0) for the respaced step t -> t_prev (the DDPM step's noise)."""
        t, t_prev = self._check_pair(t, t_prev)
        ab_t, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
        beta = 1 - ab_t / ab_prev  # effective beta of the jump t_prev -> t
        return beta * (1 - ab_prev) / (1 - ab_t)

    def ddpm_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
                  generator: torch.Generator | None = None, clip_x0: float | None = None) -> torch.Tensor:
        """Ancestral step t -> t_prev: sample q(x_prev | x_t, x0_pred); no noise when t_prev == 0."""
        t, t_prev = self._check_pair(t, t_prev)
        if eps.shape != x_t.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} must match x_t shape {tuple(x_t.shape)}")
        eps = eps.to(x_t.dtype)
        x0 = self._predict_x0_scalar(x_t, eps, t, clip_x0)

        ab_t, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
        beta = 1 - ab_t / ab_prev
        # Posterior mean coefficients (Ho et al. eq. 7) with alpha_t -> ab_t / ab_prev for the jump.
        c_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
        c_xt = math.sqrt(ab_t / ab_prev) * (1 - ab_prev) / (1 - ab_t)
        mean = c_x0 * x0 + c_xt * x_t
        if t_prev == 0:
            return mean
        z = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return mean + math.sqrt(self.posterior_variance(t, t_prev)) * z

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
                  generator: torch.Generator | None = None, clip_x0: float | None = None) -> torch.Tensor:
        """DDIM step t -> t_prev (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM."""
        t, t_prev = self._check_pair(t, t_prev)
        if eps.shape != x_t.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} must match x_t shape {tuple(x_t.shape)}")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        eps = eps.to(x_t.dtype)
        x0 = self._predict_x0_scalar(x_t, eps, t, clip_x0)

        ab_t, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
        if clip_x0 is not None:
            # Re-derive eps from the clipped x0 so the update stays on a consistent trajectory.
            eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        # max(0, .) guards eta > 1, where sigma^2 can exceed 1 - ab_prev.
        x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
        if sigma > 0:
            z = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            x_prev = x_prev + sigma * z
        return x_prev

