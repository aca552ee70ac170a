"""The schedule interface (``transfusion.schedules``): DDPM and rectified flow behind one set of methods, and
figures pinned from the code before the interface, so that moving the objectives behind it changed nothing.

The pinned figures were computed on main at 7a332c2 (``transfusion.diffusion`` / ``transfusion.flow``): losses of
a tiny float64 module drawn both ways (per-image generators from ``row_index``, or one generator for the batch)
and latents sampled with guidance by the generator. On that machine the new code gives them bit for bit; the
tolerance (1e-10 relative, float64) only allows for another machine's float kernels.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from transfusion.generation import IMAGE
from transfusion.images import to_tensor
from transfusion.schedules import CLEAN, DDPM, FULL, OBJECTIVES, RectifiedFlow, schedule_class

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

AUTOENCODER = {"preset": "debug", "image_size": 16}  # untrained (seeded): the same weights on every machine
SCHEDULES = [DDPM(1000), RectifiedFlow(1000)]


# ---------------------------------------------------------------- the interface


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["ddpm", "flow"])
def test_max_t_codes_mean_the_same_both_ways_of_drawing(schedule):
    max_t = torch.tensor([FULL, CLEAN, 100, 1] * 50)
    per_image = [torch.Generator().manual_seed(i) for i in range(len(max_t))]
    for generator in (torch.Generator().manual_seed(0), per_image):
        t = schedule.draw_times(len(max_t), max_t, generator)
        assert t.dtype == schedule.time_dtype and t.shape == max_t.shape
        assert bool((t[max_t == CLEAN] == 0).all()) and bool((t[max_t != CLEAN] > 0).all())  # CLEAN: t = 0 exactly
        bound = {FULL: 1000, 100: 100, 1: 1} if schedule is SCHEDULES[0] else \
            {m: float(schedule.noise_level(1000 if m == FULL else m)) * 1000 for m in (FULL, 100, 1)}
        for m, limit in bound.items():
            assert float(t[max_t == m].max()) <= limit + 1e-3
        assert float(t[max_t == FULL].max()) > 100  # the full schedule reaches past the limits
    # per image: an image's time and noise do not depend on the other images of the batch
    alone = [torch.Generator().manual_seed(2)]
    t, noise = schedule.draw_times(1, max_t[2:3], alone), schedule.draw_noise(torch.zeros(1, 3), alone)
    both = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(2)]
    t2, noise2 = schedule.draw_times(2, max_t[1:3], both), schedule.draw_noise(torch.zeros(2, 3), both)
    assert torch.equal(t2[1:], t) and torch.equal(noise2[1:], noise)
    for bad in (torch.tensor([-2]), torch.tensor([1001]), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="max_t"):
            schedule.draw_times(1, bad)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["ddpm", "flow"])
def test_the_chain_is_its_steps_and_the_target_is_what_the_loss_regresses(schedule):
    x0, noise = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    t = schedule.draw_times(2, torch.tensor([FULL, 300]), torch.Generator().manual_seed(0))
    x_t = schedule.add_noise(x0, noise, t)
    assert torch.allclose(schedule.predict_x0(x_t, schedule.target(x0, noise), t), x0, atol=1e-6)
    assert torch.equal(schedule.add_noise(x0, noise, torch.zeros_like(t)), x0)  # t = 0: clean, bit for bit
    denoiser = lambda x, t: torch.tanh(x) * (t.view(-1, 1, 1) / 1000) + 0.1  # noqa: E731  (not an oracle)
    for sampler in type(schedule).SAMPLERS:
        generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
        out = schedule.sample(denoiser, (2, 3, 4), num_steps=4, sampler=sampler, generator=generators,
                              dtype=torch.float64, clip_x0=5.0)
        generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
        x = torch.stack([torch.randn(3, 4, generator=g, dtype=torch.float64) for g in generators])
        levels = schedule.levels(4)
        for level, next_level in zip(levels[:-1], levels[1:]):
            x = schedule.step(x, denoiser(x, schedule.time(level, 2, x.device)), level, next_level, sampler,
                              generator=generators, clip_x0=5.0)
        assert torch.equal(out, x)
    other = next(name for name in OBJECTIVES if name != type(schedule).OBJECTIVE)
    with pytest.raises(ValueError, match=f"--model.init_args.sampling.sampler {type(schedule).SAMPLERS[0]}"):
        schedule.sample(denoiser, (2, 3, 4), num_steps=2, sampler=schedule_class(other).SAMPLERS[0])
    with pytest.raises(ValueError, match="objective"):
        schedule_class("edm")


def test_clean_passed_to_the_model_enters_clean():
    from transfusion.models.transfusion import Transfusion, TransfusionConfig
    from transfusion.models.transformer import TransformerConfig

    model = Transfusion(TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=64,
                                          latent_channels=4, latent_size=4, patch_size=2))
    tokens = torch.tensor([[1, 4, 3, 3, 3, 3, 5, 4, 3, 3, 3, 3, 5, 2]])
    image_ids = torch.full_like(tokens, -1)
    image_ids[0, [2, 3, 4, 5, 8, 9, 10, 11]] = torch.arange(2).repeat_interleave(4)
    out = model.loss(tokens, torch.zeros_like(tokens), image_ids, torch.randn(2, 4, 4, 4), torch.tensor([CLEAN, FULL]),
                     generator=torch.Generator().manual_seed(0))
    assert int(out["images"]) == 1 and out["t"].shape == (1,) and int(out["t"]) > 0  # the first image: context only


def _module(tokenizer_path, objective: str):
    from transfusion.lightning.transfusion import TransfusionModule

    torch.manual_seed(0)
    module = TransfusionModule(tokenizer_path, AUTOENCODER, preset="debug", objective=objective,
                               sampler="euler" if objective == "flow" else "ddpm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a zero-initialised decoder predicts 0 whatever it reads: redraw it, and the LM head
        module.model.lm_head.weight.copy_(torch.randn(module.model.lm_head.weight.shape, generator=g))
        proj = module.model.patch_decoder.proj.weight
        proj.copy_(0.2 * torch.randn(proj.shape, generator=g))
    return module.double().eval()


def _batch(module, row_index: bool) -> dict:
    """Two rows of four images (one per document): full schedule, clean, and limits 100 and 1."""
    tok, n, c, s = module.tokenizer, module.config.patches_per_image, module.config.latent_channels, \
        module.config.latent_size
    doc = [tok.bos_id, *tok.encode("a red circle"), tok.boi_id, *[-1] * n, tok.eoi_id, tok.eos_id]
    tokens = torch.tensor([doc * 2, doc * 2])
    image_ids = torch.full_like(tokens, -1)
    image_ids[tokens == -1] = torch.arange(4).repeat_interleave(n)
    tokens[tokens == -1] = tok.pad_id
    doc_ids = torch.arange(2).repeat_interleave(len(doc)).repeat(2, 1)
    latents = torch.randn(4, c, s, s, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = {"tokens": tokens, "doc_ids": doc_ids, "image_ids": image_ids, "images": latents,
             "max_t": torch.tensor([0, -1, 100, 1])}
    return {**batch, "row_index": torch.tensor([7, 3])} if row_index else batch


def _figures(module, samplers: tuple[str, ...]) -> dict[str, float]:
    """Losses both ways and the sums of sampled latents (and of their squares) for each sampler."""
    figures = {}
    for row_index in (True, False):
        figures[f"loss_row_index_{row_index}"] = float(module.validation_step(_batch(module, row_index), 3).detach())
    latents = _batch(module, False)["images"]
    drawn = module.model.loss(*(_batch(module, False)[k] for k in ("tokens", "doc_ids", "image_ids")), latents,
                              generator=torch.Generator().manual_seed(5))  # max_t None: the full schedule
    figures["loss_full_schedule"] = float(drawn["loss"].detach())
    picture = to_tensor(Image.new("RGB", (16, 16), (200, 30, 30))).double()
    prompts = [["a red circle", IMAGE], [picture, "make it blue", IMAGE], [picture]]
    for sampler in samplers:
        for image_cfg_scale in (None, 1.5):
            out = module.generator(sampler=sampler, num_steps=3, cfg_scale=3.0, image_cfg_scale=image_cfg_scale,
                                   max_new_tokens=3).generate(prompts, seeds=[0, 1, 2], decode=False)
            x = torch.stack([segment for row in out for segment in row if isinstance(segment, torch.Tensor)])
            key = f"{sampler}_{image_cfg_scale}"
            figures[f"{key}_sum"], figures[f"{key}_sq"] = float(x.sum()), float(x.pow(2).sum())
            figures[f"{key}_text"] = "|".join(segment for row in out for segment in row if isinstance(segment, str))
    return figures


PINNED = {  # computed on main at 7a332c2
    "ddpm": {
        'loss_row_index_True': 40.34247589111328,
        'loss_row_index_False': 41.39927673339844,
        'loss_full_schedule': 42.64828872680664,
        'ddpm_None_sum': 5.976223004925837,
        'ddpm_None_sq': 2562.0686766725876,
        'ddpm_None_text': 'or St the|\t firefighters Gaza|or gree?',
        'ddpm_1.5_sum': 5.982574168135413,
        'ddpm_1.5_sq': 2562.1329857959895,
        'ddpm_1.5_text': 'or St the|\t firefighters Gaza|or gree?',
        'ddim_None_sum': -4.290668561031019,
        'ddim_None_sq': 3063.0443618437976,
        'ddim_None_text': 'or St the|\t firefighters Gaza|or gree?',
        'ddim_1.5_sum': -4.307462264307169,
        'ddim_1.5_sq': 3062.9085063559314,
        'ddim_1.5_text': 'or St the|\t firefighters Gaza|or gree?',
    },
    "flow": {
        'loss_row_index_True': 45.461143493652344,
        'loss_row_index_False': 44.52861022949219,
        'loss_full_schedule': 46.820533752441406,
        'euler_None_sum': -10.74865784052097,
        'euler_None_sq': 558.0030475032753,
        'euler_None_text': '\t firefighters Gaza|or gree yacht|or gree?',
        'euler_1.5_sum': -10.757645471179302,
        'euler_1.5_sq': 557.2494700260863,
        'euler_1.5_text': '\t firefighters Gaza|or gree yacht|or gree?',
    },
}


@pytest.mark.parametrize("objective, samplers", [("ddpm", ("ddpm", "ddim")), ("flow", ("euler",))])
def test_losses_and_samples_equal_those_of_the_previous_code(tokenizer_path, objective, samplers):
    figures = _figures(_module(tokenizer_path, objective), samplers)
    assert figures.keys() == PINNED[objective].keys()
    for key, value in PINNED[objective].items():
        if isinstance(value, str):
            assert figures[key] == value, key
        else:  # losses are float32 (cross-entropy and MSE in float32), latents float64
            assert figures[key] == pytest.approx(value, rel=1e-6 if key.startswith("loss") else 1e-10, abs=0), key
