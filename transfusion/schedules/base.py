"""What the model, the LightningModule and the generator ask of a noise schedule, whatever the objective.

A ``Schedule`` draws training times (within each image's ``max_t`` limit), noises clean latents, names the
network's regression target, and samples by chaining one ``step`` at a time. Plain PyTorch: no parameters,
no Lightning. ``DDPM`` (``ddpm.py``) and ``RectifiedFlow`` (``flow.py``) implement it.

Time is in DDPM units for both: t in 0..T (T = num_timesteps), t = 0 clean data. ``max_t`` gives each image's
limit as a code: ``CLEAN`` (the image enters clean, t = 0: seen, never denoised, no image loss; an edit's source),
``FULL`` (the whole schedule) or a limit in 1..T (image-first rows: 500). Data and model use the same codes.

Training draws come two ways: from one generator for the batch (``sample_timesteps``, then the noise), or from one
generator per image (its time, then its noise: the same draws however rows are split over processes).

Shape legend: N images, ... trailing dims of one image, S inference steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

CLEAN = -1  # max_t of an image that enters clean (t = 0, no image loss)
FULL = 0  # max_t of an image that draws from the whole schedule


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


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_limit(n: int, max_t, T: int):
    """``max_t`` of ``sample_timesteps``: an int in 1..T, a 0-d or (n,) integer tensor of such, checked."""
    if isinstance(max_t, torch.Tensor):
        if max_t.is_floating_point() or max_t.is_complex() or max_t.dtype == torch.bool:
            raise ValueError(f"max_t must be an integer tensor, got dtype {max_t.dtype}")
        if max_t.dim() > 1 or (max_t.dim() == 1 and max_t.shape[0] != n):
            raise ValueError(f"max_t must be an int, a 0-d tensor or shape ({n},), got {tuple(max_t.shape)}")
        if max_t.numel() and not (1 <= int(max_t.min()) and int(max_t.max()) <= T):
            raise ValueError(f"max_t values must lie in 1..{T}, got range {int(max_t.min())}..{int(max_t.max())}")
    elif isinstance(max_t, bool) or not isinstance(max_t, int) or not 1 <= max_t <= T:
        raise ValueError(f"max_t must be an int in 1..{T}, got {max_t!r}")
    return max_t


def check_draw(n: int, max_t, generator, device, T: int):
    """``(max_t, device)`` of a draw of n training times: n checked, the limits checked (None: T), the device from
    the argument, else the limits', else the generator's, else the CPU."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if device is None:
        device = max_t.device if isinstance(max_t, torch.Tensor) else getattr(generator, "device", None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return check_limit(n, T if max_t is None else max_t, T), device


class Schedule:
    """The interface; subclasses give the path (``add_noise``, ``target``, ``predict_x0``), the draws and the steps."""

    OBJECTIVE: str  # the model option ``objective`` that selects it
    SAMPLERS: tuple[str, ...]  # the first is the default
    FEW_STEP_SAMPLER: str  # the sampler for cheap evaluations (deterministic)
    MIN_SNR = False  # whether Min-SNR loss weights (``min_snr_weights``) apply to its target
    time_dtype = torch.long

    def __init__(self, num_timesteps: int = 1000):
        self.num_timesteps = check_positive_int(num_timesteps, "num_timesteps")

    # ------------------------------------------------------------------ training
    def limits(self, max_t: torch.Tensor) -> torch.Tensor:
        """Each image's largest time (N,) long from its ``max_t`` code: FULL -> T, CLEAN -> 0, a limit as it is."""
        T = self.num_timesteps
        if not isinstance(max_t, torch.Tensor) or max_t.is_floating_point() or max_t.is_complex() or max_t.dim() != 1:
            raise ValueError(f"max_t must be an integer (N,) tensor, got {type(max_t).__name__} "
                             f"{getattr(max_t, 'dtype', '')} {tuple(getattr(max_t, 'shape', ()))}")
        if max_t.numel() and not (CLEAN <= int(max_t.min()) and int(max_t.max()) <= T):
            raise ValueError(f"max_t values must be CLEAN ({CLEAN}), FULL ({FULL}) or a limit in 1..{T}, got range "
                             f"{int(max_t.min())}..{int(max_t.max())}")
        return torch.where(max_t > 0, max_t, torch.where(max_t < 0, 0, T)).long()

    def draw_times(self, n: int, max_t: torch.Tensor | None = None, generator=None, device=None) -> torch.Tensor:
        """Training times (n,) in ``time_dtype``, 0 for CLEAN images; ``max_t`` (n,) codes (None: all FULL).
        ``generator``: one for the batch (``sample_timesteps``), or a list of one per image."""
        if isinstance(generator, (list, tuple)):
            limit = self.limits(torch.full((n,), FULL) if max_t is None else max_t).tolist()
            if len(generator) != n or len(limit) != n:
                raise ValueError(f"got {len(generator)} generators and {len(limit)} max_t for {n} images")
            if not n:
                return torch.zeros(0, dtype=self.time_dtype, device=device)
            return torch.cat([self.draw_one(max(m, 1), g) * (m > 0) for m, g in zip(limit, generator)]).to(device)
        if max_t is None:
            return self.sample_timesteps(n, None, generator, device)
        limit = self.limits(torch.as_tensor(max_t, device=device))
        return self.sample_timesteps(n, limit.clamp(min=1), generator, device).masked_fill(limit == 0, 0)

    def draw_noise(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Training noise like ``latents`` (N, ...): from one generator on their device in their dtype, or from one
        generator per image (CPU, float32, then moved: the same values on every device), each after its time."""
        if isinstance(generator, (list, tuple)):
            if not generator:
                return torch.zeros_like(latents)
            return randn(latents.shape, generator).to(device=latents.device, dtype=latents.dtype)
        return torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)

    def sample_timesteps(self, n: int, max_t=None, generator=None, device=None) -> torch.Tensor:
        """n times from one generator, each at most its limit (an int or (n,) tensor in 1..T; None: T)."""
        raise NotImplementedError

    def draw_one(self, limit: int, generator: torch.Generator) -> torch.Tensor:
        """One image's time (1,) at most ``limit`` (1..T), drawn from its own generator."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from clean latents and noise at times t (N,); t = 0 gives x0 back bit for bit."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict from x_t (the regression target of the image loss)."""
        raise NotImplementedError

    def predict_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a prediction at x_t."""
        raise NotImplementedError

    def bucket(self, t: torch.Tensor, buckets: int) -> torch.Tensor:
        """Index k of each time's bucket: t in (k T / K, (k + 1) T / K] for K = ``buckets``."""
        return (t * buckets / self.num_timesteps).ceil().long().clamp(1) - 1

    # ------------------------------------------------------------------ sampling
    @classmethod
    def check_sampler(cls, sampler: str) -> None:
        """A sampler of this objective, or a ValueError naming the option to set."""
        if sampler not in cls.SAMPLERS:
            fix = cls.SAMPLERS[0] + "".join(f" (or {s})" for s in cls.SAMPLERS[1:])
            raise ValueError(f"sampler {sampler!r} cannot sample a model trained with objective {cls.OBJECTIVE!r}: "
                             f"use sampler {fix} (--model.init_args.sampling.sampler {cls.SAMPLERS[0]})")

    def levels(self, num_steps: int) -> list:
        """The chain's noise levels, from pure noise down to clean data, in the schedule's own units."""
        raise NotImplementedError

    def time(self, level, n: int, device) -> torch.Tensor:
        """The network's time input (n,) at a noise level."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, prediction: torch.Tensor, level, next_level, sampler: str,
             generator=None, clip_x0: float | None = None) -> torch.Tensor:
        """One sampling step from ``level`` to ``next_level`` given the network's prediction at x."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: Sequence[int],
               num_steps: int = 250, sampler: str | None = None, generator=None, device=None,
               dtype: torch.dtype = torch.float32, x_T: torch.Tensor | None = None, progress: bool = False,
               clip_x0: float | None = None) -> torch.Tensor:
        """Run the chain from x_T ~ N(0, I) (or the given x_T) to clean latents, calling denoiser(x, t) per step: its
        prediction may be any linear combination of the network's (classifier-free guidance)."""
        sampler = sampler or self.SAMPLERS[0]
        self.check_sampler(sampler)
        levels = self.levels(num_steps)
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0!r}")
        x, shape = start_noise(shape, x_T, generator, device, dtype)
        for level, next_level in steps(levels, progress, f"{sampler} sampling"):
            prediction = denoiser(x, self.time(level, shape[0], x.device))
            x = self.step(x, prediction, level, next_level, sampler, generator=generator, clip_x0=clip_x0)
        return x
