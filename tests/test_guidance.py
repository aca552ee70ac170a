"""Transfusion's classifier-free guidance, through the module's public surfaces (``generate_images``, ``sampling``,
``model.schedule``): the guided noise is eps_u + s (eps_c - eps_u), with eps_u the prediction from the caption
dropped (``BOS BOI``, as in training) and eps_c the unguided conditional one; scale 0 gives the unconditional
image, and the scale changes the image.

The denoiser a generation passes to ``model.schedule.sample`` is a function of (x_t, t): it is probed at fixed
points, the same for every run, so runs at different scales compare prediction for prediction. A randomly
initialised debug model in float64 stands in for a trained one, its patch decoder redrawn (zero-initialised, it
would predict eps = 0 whatever the caption).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CAPTIONS = ["a large red circle in the top left", "a small blue square"]
SEEDS = [3, 4]
PROBE_T = [1000, 600, 37, 1]


@pytest.fixture(scope="module")
def module(make_debug_transfusion):
    return make_debug_transfusion()


@contextlib.contextmanager
def sampling(module, **options):
    """The module's sampling settings with ``options`` replaced, for the block."""
    before = module.sampling
    module.sampling = replace(before, max_new_tokens=0, **options)
    try:
        yield
    finally:
        module.sampling = before


def generate(module, captions, monkeypatch, **options) -> dict:
    """Images for ``captions`` (seeds SEEDS), the latents the sampler returned, and the guided noise predictions at
    the probe points (x fixed, t in PROBE_T), each (N, C, h, w)."""
    schedule, record = module.model.schedule, {}
    sample = type(schedule).sample

    def probing_sample(eps_fn, shape, *args, **kwargs):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        record["probes"] = [eps_fn(x, torch.full((shape[0],), t, dtype=torch.long)) for t in PROBE_T]
        record["latents"] = sample(schedule, eps_fn, shape, *args, **kwargs)
        return record["latents"]

    monkeypatch.setattr(schedule, "sample", probing_sample)
    try:
        with sampling(module, **options):
            record["images"] = module.generate_images(captions, SEEDS[: len(captions)])
    finally:
        monkeypatch.undo()
    assert len(record["probes"]) == len(PROBE_T), "the sampler was not called once"
    return record


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rtol * scale, float((actual - expected).abs().max()) / scale


OPTIONS = dict(num_steps=3, sampler="ddpm", clip_x0=5.0)


def test_guided_noise_is_the_cfg_formula(module, monkeypatch):
    conditional = generate(module, CAPTIONS, monkeypatch, cfg_scale=1.0, **OPTIONS)["probes"]  # no guidance
    unconditional = generate(module, ["", ""], monkeypatch, cfg_scale=1.0, **OPTIONS)["probes"]  # BOS BOI alone
    for eps_c, eps_u in zip(conditional, unconditional):  # the caption matters: the test can tell them apart
        assert float((eps_c - eps_u).abs().max()) > 1e-3 * float(eps_u.abs().max())
    for scale in (0.0, 0.5, 3.0, 5.0):
        guided = generate(module, CAPTIONS, monkeypatch, cfg_scale=scale, **OPTIONS)["probes"]
        for eps, eps_c, eps_u in zip(guided, conditional, unconditional):
            assert_close(eps, eps_u + scale * (eps_c - eps_u))


def test_scale_zero_gives_the_unconditional_image_and_the_scale_changes_it(module, monkeypatch):
    unconditional = generate(module, ["", ""], monkeypatch, cfg_scale=1.0, **OPTIONS)
    zero = generate(module, CAPTIONS, monkeypatch, cfg_scale=0.0, **OPTIONS)
    assert_close(zero["latents"], unconditional["latents"])  # the whole chain, not one prediction
    assert_close(zero["images"], unconditional["images"])
    one = generate(module, CAPTIONS, monkeypatch, cfg_scale=1.0, **OPTIONS)
    three = generate(module, CAPTIONS, monkeypatch, cfg_scale=3.0, **OPTIONS)
    # each scale its own image: differences ~1e6 times the float64 rounding that the equalities above tolerate
    # (small in pixels: an untrained model's caption barely moves its noise, the 5-step autoencoder blurs)
    for a, b in ((one, three), (one, zero), (zero, three)):
        assert float((a["latents"] - b["latents"]).abs().max()) > 1e-3 * float(a["latents"].abs().max())
        assert float((a["images"] - b["images"]).abs().max()) > 1e-5
    assert one["images"].shape == (2, 3, 16, 16) and bool((one["images"].abs() <= 1).all())
