"""Invariants of the DDPM schedule, forward process and samplers in transfusion.diffusion."""

import math

import pytest
import torch

from transfusion.diffusion import Diffusion

T = 1000


@pytest.fixture(scope="module")
def diff():
    return Diffusion(num_timesteps=T, schedule="cosine")


def perfect_eps_fn(diff, x0):
    """Noise predictor that knows x0: eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)."""
    calls = []

    def eps_fn(x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
        calls.append(int(t[0]))
        ab = diff.alpha_bar[t].to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    eps_fn.calls = calls
    return eps_fn


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_alpha_bar_shape_endpoints_monotone(schedule):
    d = Diffusion(num_timesteps=T, schedule=schedule)
    ab = d.alpha_bar
    assert d.num_timesteps == T
    assert ab.dtype == torch.float64 and ab.shape == (T + 1,)
    assert ab[0].item() == 1.0
    assert bool((ab[1:] < ab[:-1]).all())
    assert bool((ab[1:] > 0).all())
    assert ab[T].item() < 1e-3
    # alpha_bar is exactly the cumprod of the (clipped) betas.
    assert torch.allclose(ab[1:], torch.cumprod(1 - d.betas[1:], 0), rtol=0, atol=0)
    assert float(d.betas.max()) <= 0.999


def test_cosine_matches_closed_form(diff):
    t = torch.arange(T + 1, dtype=torch.float64)
    s = 0.008
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    # Away from the clipped last step, alpha_bar is exactly f(t)/f(0).
    assert torch.allclose(diff.alpha_bar[:T], (f / f[0])[:T], rtol=1e-9, atol=1e-12)
    # And sqrt(alpha_bar) is close to the s=0 quarter cosine.
    assert torch.allclose(diff.alpha_bar.sqrt(), torch.cos(t / T * math.pi / 2), atol=0.02)


def test_linear_schedule_betas():
    d = Diffusion(num_timesteps=T, schedule="linear")
    assert d.betas[1].item() == pytest.approx(1e-4)
    assert d.betas[T].item() == pytest.approx(0.02)
    # Rescaled for smaller T so the total noise stays comparable.
    d100 = Diffusion(num_timesteps=100, schedule="linear")
    assert d100.betas[1].item() == pytest.approx(1e-3)
    assert d100.alpha_bar[-1].item() < 1e-3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"num_timesteps": 10.0}, "num_timesteps"),
        ({"schedule": "sigmoid"}, "schedule"),
        ({"cosine_s": -0.1}, "cosine_s"),
    ],
)
def test_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Diffusion(**kwargs)


# ---------------------------------------------------------------- training side


def test_add_noise_t0_is_identity(diff):
    x0 = torch.randn(4, 3, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.zeros(4, dtype=torch.long)
    assert torch.equal(diff.add_noise(x0, noise, t), x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_add_noise_keeps_dtype_and_shape(diff, dtype):
    x0 = torch.randn(3, 7, 2).to(dtype)  # any trailing dims
    t = torch.tensor([0, 500, 1000])
    out = diff.add_noise(x0, torch.randn_like(x0), t)
    assert out.dtype == dtype and out.shape == x0.shape
    assert torch.equal(out[0], x0[0])


def test_add_noise_statistics(diff):
    g = torch.Generator().manual_seed(0)
    n, d = 8, 20000
    t = torch.tensor([1, 100, 250, 500, 750, 900, 990, 1000])
    ab = diff.alpha_bar[t].float()
    # x0 = 0: pure scaled noise, std sqrt(1 - ab).
    noise = torch.randn(n, d, generator=g)
    x_t = diff.add_noise(torch.zeros(n, d), noise, t)
    assert torch.allclose(x_t.std(dim=1), (1 - ab).sqrt(), rtol=0.03, atol=1e-3)
    # noise = 0: pure scaled signal.
    x0 = torch.randn(n, d, generator=g)
    assert torch.allclose(diff.add_noise(x0, torch.zeros_like(x0), t), ab.sqrt()[:, None] * x0, atol=1e-6)
    # Unit-variance data stays unit variance (variance preserving).
    x_t = diff.add_noise(x0, noise, t)
    assert torch.allclose(x_t.var(dim=1), torch.ones(n), atol=0.05)


def test_predict_x0_inverts_add_noise(diff):
    x0 = torch.randn(6, 4, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    x_t = diff.add_noise(x0, noise, t)
    assert torch.allclose(diff.predict_x0(x_t, noise, t), x0, atol=1e-8)


def test_sample_timesteps_range_and_coverage(diff):
    g = torch.Generator().manual_seed(0)
    t = diff.sample_timesteps(20000, generator=g)
    assert t.dtype == torch.long and t.shape == (20000,)
    assert int(t.min()) == 1 and int(t.max()) == T

    t = diff.sample_timesteps(20000, max_t=500, generator=g)
    assert int(t.min()) == 1 and int(t.max()) == 500


def test_sample_timesteps_per_element_max_t(diff):
    g = torch.Generator().manual_seed(0)
    n = 20000
    max_t = torch.where(torch.arange(n) % 2 == 0, torch.tensor(500), torch.tensor(3))
    t = diff.sample_timesteps(n, max_t=max_t, generator=g)
    assert bool((t >= 1).all()) and bool((t <= max_t).all())
    assert int(t[0::2].max()) == 500 and int(t[1::2].max()) == 3
    assert set(t[1::2].tolist()) == {1, 2, 3}
    # Roughly uniform: mean of U{1..500} is 250.5.
    assert abs(t[0::2].double().mean().item() - 250.5) < 5


@pytest.mark.parametrize("max_t", [0, T + 1, torch.tensor([1, 2]), torch.tensor([0, 5, 5]), torch.tensor([1.0, 2, 3])])
def test_sample_timesteps_validation(diff, max_t):
    with pytest.raises(ValueError, match="max_t"):
        diff.sample_timesteps(3, max_t=max_t)


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 250, 333, 999, 1000])
def test_timesteps_for_inference(diff, num_steps):
    ts = diff.timesteps_for_inference(num_steps)
    assert ts.dtype == torch.long and ts.shape == (num_steps,)
    assert int(ts[0]) == T and int(ts[-1]) >= 1
    assert bool((ts[1:] < ts[:-1]).all())
    gaps = (ts[:-1] - ts[1:]).tolist() + [int(ts[-1])]  # include the final jump to 0
    assert max(gaps) - min(gaps) <= 1  # evenly spaced


def test_timesteps_for_inference_250(diff):
    ts = diff.timesteps_for_inference(250)
    assert ts[:3].tolist() == [1000, 996, 992] and int(ts[-1]) == 4


@pytest.mark.parametrize("num_steps", [0, -5, T + 1])
def test_timesteps_for_inference_validation(diff, num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        diff.timesteps_for_inference(num_steps)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("num_steps", [250, 10])
def test_perfect_predictor_recovers_x0(diff, sampler, num_steps):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g).clamp(-2, 2)
    eps_fn = perfect_eps_fn(diff, x0)
    out = diff.sample(eps_fn, x0.shape, num_steps=num_steps, sampler=sampler, generator=g)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    assert torch.allclose(out, x0, atol=1e-4)
    assert eps_fn.calls == diff.timesteps_for_inference(num_steps).tolist()


def test_ddim_eta0_is_deterministic_and_stays_on_the_marginal(diff):
    x0 = torch.randn(2, 16, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t, t_prev = 600, 450
    x_t = diff.add_noise(x0, noise, torch.full((2,), t))
    a = diff.ddim_step(x_t, noise, t, t_prev, generator=torch.Generator().manual_seed(0))
    b = diff.ddim_step(x_t, noise, t, t_prev, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # With the true noise, deterministic DDIM maps x_t to x_{t_prev} with the same noise.
    assert torch.allclose(a, diff.add_noise(x0, noise, torch.full((2,), t_prev)), atol=1e-10)


def test_sample_with_given_x_T_is_reproducible_for_ddim(diff):
    x_T = torch.randn(2, 8)
    eps_fn = lambda x, t: 0.5 * x  # any deterministic predictor
    a = diff.sample(eps_fn, (2, 8), num_steps=20, sampler="ddim", x_T=x_T)
    b = diff.sample(eps_fn, (2, 8), num_steps=20, sampler="ddim", x_T=x_T.clone())
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_ddpm_step_to_zero_is_deterministic(diff):
    x_t, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    a = diff.ddpm_step(x_t, eps, 4, 0, generator=torch.Generator().manual_seed(0))
    b = diff.ddpm_step(x_t, eps, 4, 0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # At t_prev = 0 the posterior mean is exactly the x0 prediction.
    assert torch.allclose(a, diff.predict_x0(x_t, eps, torch.full((2,), 4)), atol=1e-6)


def test_ddpm_step_is_stochastic_before_zero(diff):
    x_t, eps = torch.randn(2, 8), torch.randn(2, 8)
    a = diff.ddpm_step(x_t, eps, 500, 496, generator=torch.Generator().manual_seed(0))
    b = diff.ddpm_step(x_t, eps, 500, 496, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_ddpm_posterior_variance_hand_computed():
    # Linear schedule, T = 1000: beta_1 = 1e-4, beta_2 = 1e-4 + (0.02 - 1e-4) / 999.
    d = Diffusion(num_timesteps=1000, schedule="linear")
    b1 = 1e-4
    b2 = 1e-4 + 0.0199 / 999
    ab1 = 1 - b1
    ab2 = ab1 * (1 - b2)
    expected = b2 * (1 - ab1) / (1 - ab2)  # ~1.0e-4 * 1.0e-4 / 2.2e-4
    assert d.posterior_variance(2, 1) == pytest.approx(expected, rel=1e-9)

    # The step itself: with x_t = eps = 0 the mean is 0, so the output is std * z.
    x = torch.zeros(4, 1000, dtype=torch.float64)
    out = d.ddpm_step(x, x, 2, 1, generator=torch.Generator().manual_seed(3))
    z = torch.randn(4, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, math.sqrt(expected) * z, rtol=1e-9, atol=0)


def test_ddim_eta1_equals_ddpm(diff):
    # DDIM with eta = 1 is the DDPM ancestral step (same mean, same variance, same noise draw).
    x_t, eps = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    for t, t_prev in [(1000, 996), (500, 480), (10, 1)]:
        a = diff.ddpm_step(x_t, eps, t, t_prev, generator=torch.Generator().manual_seed(7))
        b = diff.ddim_step(x_t, eps, t, t_prev, eta=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-7)


def test_clip_x0_bounds_the_final_sample(diff):
    x_t = torch.randn(2, 8) * 10
    eps = torch.zeros_like(x_t)
    out = diff.ddpm_step(x_t, eps, 4, 0, clip_x0=1.0)
    assert float(out.abs().max()) <= 1.0 + 1e-6
    out = diff.ddim_step(x_t, eps, 4, 0, clip_x0=1.0)
    assert float(out.abs().max()) <= 1.0 + 1e-6


def test_step_and_sample_validation(diff):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="t_prev"):
        diff.ddpm_step(x, x, 5, 5)
    with pytest.raises(ValueError, match="t_prev"):
        diff.ddim_step(x, x, T + 1, 0)
    with pytest.raises(ValueError, match="sampler"):
        diff.sample(lambda x, t: x, (1, 2), num_steps=2, sampler="euler")
    with pytest.raises(ValueError, match="num_steps"):
        diff.sample(lambda x, t: x, (1, 2), num_steps=0)
