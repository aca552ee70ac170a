"""Sampling settings and token sampling shared by both generators."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch


@dataclass
class SamplingOptions:
    """How ``TransfusionGenerator`` samples text and images (``ChameleonSamplingOptions`` adds image codes).

    Guidance: with ``cfg_scale`` s != 1 each prompt gets an unconditional row (``BOS BOI``) and the noise is
    eps_u + s (eps_c - eps_u). With ``image_cfg_scale`` s_I set (editing, as InstructPix2Pix), a third row keeps
    the prompt's images without its text, and eps = eps_u + s_I (eps_i - eps_u) + s (eps_c - eps_i).
    """

    max_new_tokens: int = 32  # text tokens per prompt
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    cfg_scale: float = 5.0  # 1: no guidance (no unconditional rows)
    image_cfg_scale: float | None = None  # editing: guidance by the prompt's images apart from its text (below)
    num_steps: int = 250  # denoising steps (respaced from the training schedule's T)
    sampler: str = "ddpm"  # or "ddim"; "euler" for a rectified-flow model (objective: flow)
    clip_x0: float | None = 5.0  # bound on predicted clean latents (unit variance); see TransfusionGenerator
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
        if self.image_cfg_scale is not None and self.image_cfg_scale < 0:
            raise ValueError(f"image_cfg_scale must be >= 0 or None, got {self.image_cfg_scale}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.sampler not in ("ddpm", "ddim", "euler"):
            raise ValueError(f"sampler must be 'ddpm', 'ddim' or 'euler' (objective flow), got {self.sampler!r}")
        if self.clip_x0 is not None and self.clip_x0 <= 0:
            raise ValueError(f"clip_x0 must be > 0 or None, got {self.clip_x0}")


@dataclass
class ChameleonSamplingOptions(SamplingOptions):
    """``SamplingOptions`` (its diffusion fields unused) plus the sampling of image codes."""

    image_temperature: float = 1.0  # 0: greedy codes
    image_top_p: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.image_temperature < 0:
            raise ValueError(f"image_temperature must be >= 0, got {self.image_temperature}")
        if not 0.0 < self.image_top_p <= 1.0:
            raise ValueError(f"image_top_p must be in (0, 1], got {self.image_top_p}")
        if self.image_cfg_scale is not None:
            raise ValueError("image_cfg_scale (guidance by input images apart from text) is Transfusion's; "
                             "Chameleon guides with cfg_scale only")


def sampling_options(options_class: type, sampling, legacy: dict, owner: str) -> SamplingOptions:
    """The module's ``options_class`` from its ``sampling`` argument (an options object, a dict as saved in
    checkpoints, or None: the defaults) and the flat arguments of earlier versions (``legacy``: name -> value; not given: ``UNSET``, or None
    where None is no setting), which are mapped into the group with a deprecation warning."""
    if sampling is None:
        sampling = options_class()
    elif isinstance(sampling, dict):
        unknown = set(sampling) - {f.name for f in fields(options_class)}
        if unknown:
            raise ValueError(f"{owner}: unknown sampling option(s) {sorted(unknown)}; "
                             f"valid: {sorted(f.name for f in fields(options_class))}")
        sampling = options_class(**sampling)
    elif type(sampling) is not options_class:
        sampling = options_class(**asdict(sampling))  # e.g. the base class's fields into ChameleonSamplingOptions
    given = {k: v for k, v in legacy.items() if v != UNSET and (v is not None or k in _NULLABLE)}
    if given:  # a FutureWarning: a deprecation that users see by default
        group = ", ".join(f"{k}: {'null' if v is None else v}" for k, v in given.items())
        warnings.warn(f"{owner}: flat sampling arguments {sorted(given)} are deprecated; set them in the group "
                      f"`sampling: {{{group}}}` (command line: --model.init_args.sampling.NAME VALUE)",
                      FutureWarning, stacklevel=3)
        sampling = replace(sampling, **given)
    return sampling


UNSET = "unset"  # default of the deprecated flat arguments whose None is a setting (clip_x0, image_cfg_scale)


def legacy_fields(options_class: type) -> tuple[str, ...]:
    """Names of ``options_class``'s fields that earlier versions took as flat module arguments."""
    return tuple(f.name for f in fields(options_class) if f.name != "use_cache")


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


_NULLABLE = {f.name for f in fields(ChameleonSamplingOptions) if "None" in str(f.type)}  # None: a setting
