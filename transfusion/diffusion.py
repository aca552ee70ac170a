"""DDPM noise schedule, forward noising and samplers for Transfusion's image part.

Kept apart from the network: plain PyTorch, no parameters, no Lightning.

Timestep convention: integers t in 0..T (T = num_timesteps). t = 0 is clean data
(alpha_bar[0] == 1 exactly); training draws t uniformly from 1..max_t.

Shape legend:
    N   images in the batch
    ... trailing dims of one image (e.g. C channels, H, W, or L latent patches, D)
    T   num_timesteps
    S   number of inference steps
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

_MAX_BETA = 0.999  # keeps 1 - beta > 0 so alpha_bar stays strictly decreasing and invertible


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise; ``generator`` may be one generator or a list with one per sample (dim 0),
    so that a sample's noise does not depend on the batch it is generated in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def start_noise(shape, x_T=None, generator=None, device=None, dtype=torch.float32) -> tuple[torch.Tensor, tuple]:
    """(x_T, shape) where a sampler starts: ``x_T`` checked against ``shape``, or drawn N(0, I) (see ``randn``)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError(f"shape must start with the batch size N, got {shape}")
    if x_T is None:
        return randn(shape, generator, torch.device(device) if device is not None else torch.device("cpu"), dtype), shape
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T shape {tuple(x_T.shape)} must match shape {shape}")
    return x_T.to(device=device if device is not None else x_T.device, dtype=dtype), shape


def steps(levels: list, progress: bool = False, desc: str = "sampling") -> list:
    """Consecutive pairs (level, next level) of a sampler's chain, under a progress bar if asked."""
    pairs = list(zip(levels[:-1], levels[1:]))
    if progress:
        from tqdm.auto import tqdm

        return tqdm(pairs, desc=desc, total=len(pairs))
    return pairs


class Diffusion:
    """DDPM schedule over integer timesteps 0..T with DDPM and DDIM samplers."""

    SCHEDULES = ("cosine", "linear")
    SAMPLERS = ("ddpm", "ddim")

    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine", cosine_s: float = 0.008):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        if not (math.isfinite(cosine_s) and cosine_s >= 0):
            raise ValueError(f"cosine_s must be a finite number >= 0, got {cosine_s!r}")

        T = num_timesteps
        self.num_timesteps = T
        self.schedule = schedule
        self.cosine_s = float(cosine_s)

        if schedule == "cosine":
            # Nichol & Dhariwal (2021): alpha_bar(t) = f(t) / f(0).
            t = torch.arange(T + 1, dtype=torch.float64)
            f = torch.cos((t / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            ab = f / f[0]
            betas = 1 - ab[1:] / ab[:-1]
        else:
            # Ho et al. (2020), rescaled so any T spans the same noise range as T = 1000.
            scale = 1000 / T
            betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)

        # Clip, then rebuild alpha_bar from the clipped betas so the two always agree.
        betas = betas.clamp(min=0.0, max=_MAX_BETA)
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
        return f"Diffusion(num_timesteps={self.num_timesteps}, schedule={self.schedule!r}, cosine_s={self.cosine_s})"

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

    def sample_timesteps(
        self,
        n: int,
        max_t: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw n timesteps uniformly from 1..max_t (max_t may be a per-element (n,) tensor)."""
        T = self.num_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if device is None:
            if isinstance(max_t, torch.Tensor):
                device = max_t.device
            elif generator is not None:
                device = generator.device
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
            max_t = max_t.to(device=device, dtype=torch.long)
        else:
            if isinstance(max_t, bool) or not isinstance(max_t, int) or not 1 <= max_t <= T:
                raise ValueError(f"max_t must be an int in 1..{T}, got {max_t!r}")

        # Integer draw then modulo: exact per-element ranges, bias ~ max_t / 2**62 (negligible).
        r = torch.randint(0, 2**62, (n,), generator=generator, device=device)
        return 1 + r % max_t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, in x0's dtype."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must match x0 shape {tuple(x0.shape)}")
        self._check_t(t, x0)
        # At t = 0 the coefficients are exactly 1 and 0, so x0 comes back bit-for-bit.
        return self._coef("sqrt_ab", t, x0) * x0 + self._coef("sqrt_1m_ab", t, x0) * noise.to(x0.dtype)

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

    # ------------------------------------------------------------------ sampling

    def timesteps_for_inference(self, num_steps: int = 250) -> torch.Tensor:
        """Evenly respaced timesteps (S,) long, strictly decreasing from T down to >= 1."""
        T = self.num_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an int in 1..{T} (num_timesteps), got {num_steps!r}")
        # t_k = floor(k T / S) for k = S..1: consecutive values differ by T/S >= 1, so all distinct.
        k = torch.arange(num_steps, 0, -1, dtype=torch.long)
        return (k * T) // num_steps

    def posterior_variance(self, t: int, t_prev: int) -> float:
        """Variance of q(x_prev | x_t, x0) for the respaced step t -> t_prev."""
        t, t_prev = self._check_pair(t, t_prev)
        ab_t, ab_prev = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
        beta = 1 - ab_t / ab_prev  # effective beta of the jump t_prev -> t
        return beta * (1 - ab_prev) / (1 - ab_t)

    def ddpm_step(
        self,
        x_t: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        t_prev: int,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
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
        std = math.sqrt(beta * (1 - ab_prev) / (1 - ab_t))
        z = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        return mean + std * z

    def ddim_step(
        self,
        x_t: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        t_prev: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
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

    @torch.no_grad()
    def sample(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: Sequence[int],
        num_steps: int = 250,
        sampler: str = "ddpm",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        x_T: torch.Tensor | None = None,
        progress: bool = False,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """Run the reverse chain from x_T ~ N(0, I) (or the given x_T) to x_0, calling eps_fn(x_t, t) per step."""
        if sampler not in self.SAMPLERS:
            raise ValueError(f"sampler must be one of {self.SAMPLERS}, got {sampler!r}")
        timesteps = self.timesteps_for_inference(num_steps).tolist() + [0]
        x, shape = start_noise(shape, x_T, generator, device, dtype)
        step = self.ddpm_step if sampler == "ddpm" else self.ddim_step
        for t, t_prev in steps(timesteps, progress, f"{sampler} sampling"):
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=x.device)
            eps = eps_fn(x, t_batch)
            x = step(x, eps, t, t_prev, generator=generator, clip_x0=clip_x0)
        return x
