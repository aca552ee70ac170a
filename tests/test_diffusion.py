"""Invariants of the DDPM schedule, forward process and samplers in transfusion.schedules.ddpm."""

import math

import pytest
import torch

from transfusion.schedules import DDPM

T = 1000


@pytest.fixture(scope="module")
def diff():
    return DDPM(num_timesteps=T)


def reference_alpha_bar(schedule: str, t: int, T: int = T) -> float:  # schedule: "cosine", the only one
    """alpha_bar_t from the paper's formula, written out here in float64 (not taken from DDPM)."""
    # Nichol & Dhariwal (2021) eq. 17, s = 0.008, betas clipped to 0.999 (only beta_T is)
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
    if t == T:
        return f(T - 1) / f(0) * (1 - 0.999)
    return f(t) / f(0)


def posterior(x_t, x0, t: int, s: int):
    """Mean and variance of q(x_s | x_t, x0) for the jump t -> s (Ho et al. eq. 6-7 with alpha_t -> ab_t / ab_s)."""
    ab_t, ab_s = reference_alpha_bar("cosine", t), reference_alpha_bar("cosine", s)
    beta = 1 - ab_t / ab_s
    mean = math.sqrt(ab_s) * beta / (1 - ab_t) * x0 + math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t) * x_t
    return mean, beta * (1 - ab_s) / (1 - ab_t)


def x0_from_eps(x_t, eps, t: int):
    ab = reference_alpha_bar("cosine", t)
    return (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


# ---------------------------------------------------------------- schedule


def test_alpha_bar_shape_endpoints_monotone():
    d, schedule = DDPM(num_timesteps=T), "cosine"
    ab = d.alpha_bar
    assert d.num_timesteps == T
    assert ab.dtype == torch.float64 and ab.shape == (T + 1,)
    assert ab[0].item() == 1.0
    assert bool((ab[1:] < ab[:-1]).all())
    assert bool((ab[1:] > 0).all())
    assert ab[T].item() < 1e-3
    assert float(d.betas.max()) <= 0.999
    # alpha_bar against the papers' formulas (cosine's last beta clipped to 0.999), written out independently
    for t in (1, 2, 10, 250, 500, 900, 999, T):
        assert ab[t].item() == pytest.approx(reference_alpha_bar(schedule, t), rel=1e-9), t
    # and the betas are the per-step ratios of that alpha_bar
    for t in (1, 500, T):
        beta = 1 - reference_alpha_bar(schedule, t) / reference_alpha_bar(schedule, t - 1)
        assert d.betas[t].item() == pytest.approx(beta, rel=1e-9, abs=1e-15), t


def test_cosine_matches_closed_form(diff):
    t = torch.arange(T + 1, dtype=torch.float64)
    s = 0.008
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    # Away from the clipped last step, alpha_bar is exactly f(t)/f(0).
    assert torch.allclose(diff.alpha_bar[:T], (f / f[0])[:T], rtol=1e-9, atol=1e-12)
    # And sqrt(alpha_bar) is close to the s=0 quarter cosine.
    assert torch.allclose(diff.alpha_bar.sqrt(), torch.cos(t / T * math.pi / 2), atol=0.02)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"num_timesteps": 10.0}, "num_timesteps"),
        ({"cosine_s": -0.1}, "cosine_s"),
    ],
)
def test_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DDPM(**kwargs)


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


# One step at a time against the closed-form posterior, with a noise prediction that is not the true noise
# (an oracle predictor would make every step land on x0 whatever the update rule): (t, t_prev) pairs of the
# 1000-, 250- and 10-step chains, the clipped last step and the final jump to 0.
STEPS = [(T, 996), (T, 900), (900, 800), (500, 496), (250, 100), (10, 9), (4, 0), (1, 0)]


def _non_oracle(t: int):
    """x_t and a predicted noise drawn independently: no x0 makes this eps the true noise of this x_t."""
    g = torch.Generator().manual_seed(t)
    return torch.randn(2, 3, 2, 5, generator=g, dtype=torch.float64).unbind(0)


@pytest.mark.parametrize("t, t_prev", STEPS)
def test_ddpm_step_is_the_closed_form_posterior(diff, t, t_prev):
    x_t, eps = _non_oracle(t)
    mean, var = posterior(x_t, x0_from_eps(x_t, eps, t), t, t_prev)
    assert diff.posterior_variance(t, t_prev) == pytest.approx(var, rel=1e-9)
    out = diff.ddpm_step(x_t, eps, t, t_prev, generator=torch.Generator().manual_seed(11))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = mean if t_prev == 0 else mean + math.sqrt(var) * z  # no noise on the last step
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t, t_prev", STEPS)
def test_ddim_step_is_the_closed_form_update(diff, t, t_prev, eta):
    # Song et al. (2021) eq. 12: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    # sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s); sigma^2 is the DDPM posterior variance at eta 1.
    x_t, eps = _non_oracle(t)
    ab_t, ab_s = reference_alpha_bar("cosine", t), reference_alpha_bar("cosine", t_prev)
    sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = math.sqrt(ab_s) * x0_from_eps(x_t, eps, t) + math.sqrt(1 - ab_s - sigma**2) * eps + sigma * z
    out = diff.ddim_step(x_t, eps, t, t_prev, eta=eta, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if eta == 1.0:
        mean, var = posterior(x_t, x0_from_eps(x_t, eps, t), t, t_prev)
        assert sigma**2 == pytest.approx(var, rel=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("num_steps", [250, 10, 1])
def test_sample_chains_its_steps_over_the_respaced_timesteps(diff, sampler, num_steps):
    """sample() is the composition of the (closed-form-checked) steps: T -> ... -> t_1 -> 0, the predictor called
    once per step on the current x_t, the generator shared by the steps."""
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps_fn = lambda x, t: torch.tanh(x) * (t.view(-1, 1, 1) / T) + 0.1  # not an oracle
    calls = []

    def recording(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and bool((t == t[0]).all())
        calls.append(int(t[0]))
        return eps_fn(x, t)

    out = diff.sample(recording, x_T.shape, num_steps=num_steps, sampler=sampler, x_T=x_T, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(3))
    timesteps = diff.timesteps_for_inference(num_steps).tolist()
    assert calls == timesteps
    g, x = torch.Generator().manual_seed(3), x_T
    step = diff.ddpm_step if sampler == "ddpm" else diff.ddim_step
    for t, t_prev in zip(timesteps, timesteps[1:] + [0]):
        x = step(x, eps_fn(x, torch.full((2,), t)), t, t_prev, generator=g)
    assert out.dtype == torch.float64 and torch.equal(out, x)


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


def test_ddpm_posterior_variance_hand_computed(diff):
    d, ab1, ab2 = diff, reference_alpha_bar("cosine", 1), reference_alpha_bar("cosine", 2)
    b2 = 1 - ab2 / ab1
    expected = b2 * (1 - ab1) / (1 - ab2)  # the DDPM step's noise variance from t = 2 to 1
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
