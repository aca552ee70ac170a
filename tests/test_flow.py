"""The rectified-flow objective (``objective: flow``, ``transfusion.schedules.flow``): the velocity loss, the Euler sampler, the
truncated logit-normal times and their DDPM-equivalent noise limit, then a debug model trained through
``transfusion fit`` and sampled through the generator (guidance, KV cache), and the errors for mismatched options.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from transfusion.data.embedded.shape_edits import ShapeEdits
from transfusion.generation import IMAGE, TransfusionGenerator
from transfusion.models.transformer import TransformerConfig
from transfusion.models.transfusion import Transfusion, TransfusionConfig
from transfusion.schedules import DDPM, RectifiedFlow

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

T = 1000


# ---------------------------------------------------------------- the loss at a perfect predictor

def _tiny(objective: str) -> Transfusion:
    torch.manual_seed(0)
    return Transfusion(TransfusionConfig(transformer=TransformerConfig.from_name("debug"), vocab_size=64,
                                         latent_channels=4, latent_size=4, patch_size=2, objective=objective)).double()


def _two_images():
    """One row: BOS c BOI [4 patches] EOI BOI [4 patches] EOI EOS, and two clean latents (2, 4, 4, 4)."""
    P = -1
    row = [1, 20, 4, P, P, P, P, 5, 4, P, P, P, P, 5, 2]
    tokens = torch.tensor([row])
    image_ids = torch.full_like(tokens, -1)
    image_ids[tokens == P] = torch.arange(2).repeat_interleave(4)
    tokens[tokens == P] = 3
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return tokens, torch.zeros_like(tokens), image_ids, latents


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_loss_is_zero_at_the_objectives_perfect_predictor(objective, monkeypatch):
    model = _tiny(objective)
    tokens, doc_ids, image_ids, x0 = _two_images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    perfect = noise - x0 if objective == "flow" else noise  # v = noise - x0 (flow), eps (DDPM)
    t = torch.tensor([250.5, 0.0]) if objective == "flow" else torch.tensor([250, 0])  # image 1 enters clean
    out = model.loss(tokens, doc_ids, image_ids, x0, t=t, noise=noise)
    assert out["images"] == 1 and out["ddpm_loss"] > 0  # the zero-initialised decoder is no perfect predictor
    if objective == "flow":  # ... and its loss is the velocity's power
        assert out["ddpm_loss"].item() == pytest.approx(float(((noise[0] - x0[0]) ** 2).mean()), rel=1e-6)
    monkeypatch.setattr(model.patch_decoder, "forward", lambda hidden, t, context: perfect)
    assert model.loss(tokens, doc_ids, image_ids, x0, t=t, noise=noise)["ddpm_loss"] == 0
    drawn = model.loss(tokens, doc_ids, image_ids, x0, max_t=torch.tensor([100, 1000]), noise=noise,
                       generator=torch.Generator().manual_seed(3))  # times drawn in the loss
    assert drawn["ddpm_loss"] == 0 and drawn["t"].shape == (2,) and bool((drawn["t"] > 0).all())
    assert drawn["t"].is_floating_point() == (objective == "flow")


def test_add_noise_is_the_straight_path():
    flow, x0 = RectifiedFlow(T), torch.randn(3, 2, 5, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.0, 500.0, 1000.0])
    x = flow.add_noise(x0, noise, t)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], noise[2])
    assert torch.allclose(x[1], 0.5 * (x0[1] + noise[1]), rtol=0, atol=1e-15)
    assert torch.allclose(flow.predict_x0(x, flow.target(x0, noise), t), x0, rtol=0, atol=1e-14)
    assert flow.add_noise(x0.float(), noise.float(), t).dtype == torch.float32
    with pytest.raises(ValueError, match="t must be"):
        flow.add_noise(x0, noise, t[:2])


# ---------------------------------------------------------------- Euler with the exact velocity

@pytest.mark.parametrize("clip_x0", [None, 10.0])
def test_euler_with_the_exact_velocity_recovers_x0(clip_x0):
    flow = RectifiedFlow(T)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    times = []

    def velocity(x, t):  # the exact velocity toward the single known x0: v = (x_s - x0) / s
        times.append(t)
        return (x - x0) / (t / T).view(-1, 1, 1, 1)

    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    out = flow.sample(velocity, x0.shape, num_steps=7, generator=generators, clip_x0=clip_x0)
    assert float((out - x0).abs().max()) <= 1e-5
    assert len(times) == 7 and all(t.dtype == torch.float32 and t.shape == (3,) for t in times)
    assert [float(t[0]) for t in times] == pytest.approx([T * k / 7 for k in range(7, 0, -1)], rel=1e-6)
    # a clip below the data's range bounds the result
    assert float(flow.sample(velocity, x0.shape, num_steps=3, generator=generators, clip_x0=0.5).abs().max()) <= 0.5


def test_sampler_validation():
    flow = RectifiedFlow(T)
    with pytest.raises(ValueError, match="euler"):
        flow.sample(lambda x, t: x, (1, 2), num_steps=2, sampler="ddpm")
    with pytest.raises(ValueError, match="num_steps"):
        flow.sample(lambda x, t: x, (1, 2), num_steps=0)
    with pytest.raises(ValueError, match="clip_x0"):
        flow.sample(lambda x, t: x, (1, 2), num_steps=2, clip_x0=0.0)
    with pytest.raises(ValueError, match="velocity shape"):
        flow.sample(lambda x, t: x[:, :1], (1, 2), num_steps=2)
    with pytest.raises(ValueError, match="num_timesteps"):
        RectifiedFlow(0)


# ---------------------------------------------------------------- truncated logit-normal times

def _ks(s: torch.Tensor, s_max: float) -> float:
    """Kolmogorov-Smirnov distance between draws s and the logit-normal truncated to s <= s_max."""
    s = s.double().sort().values
    logit = lambda p: math.log(p) - math.log1p(-p) if p < 1 else math.inf  # noqa: E731
    cdf = torch.special.ndtr(s.log() - (-s).log1p()) / torch.special.ndtr(torch.tensor(logit(s_max), dtype=torch.float64))
    n = len(s)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(upper - cdf, cdf - (upper - 1 / n)).max())


@pytest.mark.parametrize("max_t", [None, 500, 100])
def test_logit_normal_times_are_the_truncated_distribution(max_t):
    flow, n = RectifiedFlow(T), 20_000
    t = flow.sample_timesteps(n, max_t, generator=torch.Generator().manual_seed(0))
    s_max = 1.0 if max_t is None else float(flow.noise_level(max_t))
    assert t.dtype == torch.float32 and t.shape == (n,)
    assert bool((t > 0).all()) and bool((t <= torch.tensor(s_max * T, dtype=torch.float32)).all())
    assert _ks(t / T, s_max) < 1.63 / math.sqrt(n)  # 1% level of the KS test
    if max_t is not None:  # the untruncated law is far off: the check can tell
        assert _ks(t / T, 1.0) > 0.1


def test_per_image_limits_and_validation():
    flow = RectifiedFlow(T)
    max_t = torch.tensor([1, 100, 500, 1000] * 500)
    t = flow.sample_timesteps(len(max_t), max_t, generator=torch.Generator().manual_seed(1))
    bound = (flow.noise_level(max_t) * T).float()
    assert bool((t > 0).all()) and bool((t <= bound).all())
    assert float(t[max_t == 1000].max()) > float(bound[max_t == 500][0])  # each image its own limit
    again = flow.sample_timesteps(len(max_t), max_t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again)
    for bad in (0, T + 1, torch.tensor([1.0, 2.0]), torch.tensor([0, 5])):
        with pytest.raises(ValueError, match="max_t"):
            flow.sample_timesteps(2, bad)


def test_noise_level_has_the_ddpm_signal_to_noise_ratio():
    flow, alpha_bar = RectifiedFlow(T), DDPM(T).alpha_bar  # float64, cosine schedule
    for t in (500, 100):
        s = flow.noise_level(t)
        assert s.dtype == torch.float64
        snr_flow, snr_ddpm = (1 - s) ** 2 / s**2, alpha_bar[t] / (1 - alpha_bar[t])
        assert float(snr_flow / snr_ddpm) == pytest.approx(1.0, abs=1e-12), t
    assert float(flow.noise_level(0)) == 0.0 and float(flow.noise_level(T)) == 1.0  # clean; pure noise
    levels = flow.noise_level(torch.arange(T + 1))
    assert bool((levels[1:] > levels[:-1]).all())


# ---------------------------------------------------------------- a flow model trained and sampled

def _fit(root, tokenizer_path, autoencoder_ckpt, *overrides):
    from transfusion.cli import cli_main

    configs = Path(__file__).resolve().parents[1] / "lightning_configs"
    return cli_main(["fit", "--config", str(configs / "transfusion_embedded.yaml"),
                     "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
                     "--model.init_args.preset", "debug", "--model.init_args.objective", "flow",
                     "--model.init_args.min_snr_gamma", "null", "--model.init_args.sampling.sampler", "euler",
                     "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "8",
                     "--data.init_args.num_workers", "0", "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                     "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "4",
                     "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                     "--trainer.logger.init_args.save_dir", str(root), *overrides])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    """A debug flow model trained 4 steps (image-first rows limited to max_t 100), validated once."""
    return _fit(tmp_path_factory.mktemp("flow"), tokenizer_path, autoencoder_ckpt)


@pytest.fixture(scope="module")
def module(fitted):
    """The trained flow module in float64 (cache and batch comparisons to 1e-9)."""
    return copy.deepcopy(fitted.model).double().eval()


def test_fit_trains_validates_and_checkpoints_the_objective(fitted):
    metrics, module = fitted.trainer.callback_metrics, fitted.model
    assert fitted.trainer.global_step == 4 and isinstance(module.model.schedule, RectifiedFlow)
    assert all(math.isfinite(float(metrics[k])) for k in ("train/loss", "train/ddpm_loss", "val/loss", "val/ddpm_loss"))
    assert any(k.startswith("val/ddpm_loss_t") for k in metrics)  # float times fall into the buckets
    assert module.model.schedule.bucket(torch.tensor([1e-3, 250.0, 250.5, 999.9, 1000.0]), 4).tolist() == [0, 0, 1, 3, 3]
    ckpt = torch.load(fitted.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert ckpt["transfusion_config"]["objective"] == "flow"
    # a DDPM checkpoint, or one from before the option (DDPM), does not load into a flow model
    for stored in ({**ckpt["transfusion_config"], "objective": "ddpm"},
                   {k: v for k, v in ckpt["transfusion_config"].items() if k != "objective"}):
        with pytest.raises(ValueError, match="objective"):
            module.on_load_checkpoint({**ckpt, "transfusion_config": stored})
    module.on_load_checkpoint(ckpt)


def _draws(module, batch, latents, step):
    """Times and noise drawn as a training step draws them for rows with a ``row_index``: a generator per image."""
    generators, schedule = module.image_generators(batch, step), module.model.schedule
    return schedule.draw_times(len(generators), batch["max_t"], generators), schedule.draw_noise(latents, generators)


def test_draws_per_image_respect_the_limits_and_repeat(fitted):
    module = fitted.model
    n, codes = module.config.patches_per_image, torch.tensor([0, -1, 100, 500, 0, -1])  # 0: T, -1: clean
    batch = {"max_t": codes, "row_index": torch.arange(6) + 10,
             "image_ids": torch.arange(6).repeat_interleave(n).view(6, n)}
    latents = torch.zeros(6, module.config.latent_channels, module.config.latent_size, module.config.latent_size)
    t, noise = _draws(module, batch, latents, step=3)
    assert t.dtype == torch.float32 and bool((t[codes == -1] == 0).all()) and bool((t[codes != -1] > 0).all())
    for k, limit in ((2, 100), (3, 500)):
        assert float(t[k]) <= float(module.model.schedule.noise_level(limit)) * 1000
    again = _draws(module, batch, latents, step=3)
    assert torch.equal(t, again[0]) and torch.equal(noise, again[1])  # resumable: the same draws
    other = _draws(module, batch, latents, step=4)[0]
    assert not torch.equal(t, other)
    empty = _draws(module, {**batch, "image_ids": torch.full((6, n), -1), "max_t": codes[:0]}, latents[:0], step=3)
    assert empty[0].dtype == torch.float32 and empty[0].shape == (0,)


def _generator(module, **options):
    return module.generator(**{"max_new_tokens": 0, "num_steps": 3, **options})


def _probe(generator, prompts, monkeypatch) -> list[torch.Tensor]:
    """The guided velocity at fixed (x, t) for the prompts' images (t a float s T), then the sampled latents."""
    from test_edits import _probe as probe

    return probe(generator, prompts, monkeypatch, times=(1000.0, 512.25, 3.5))


def test_guidance_combines_the_predicted_velocities(module, monkeypatch):
    source = ShapeEdits(1, 16)[0]["source"].double()
    edit, image_only, nothing = [source, "make it red", IMAGE], [source, IMAGE], ["", IMAGE]
    v_c, v_i, v_u = (_probe(_generator(module, cfg_scale=1.0), [p], monkeypatch) for p in (edit, image_only, nothing))
    for c, i, u in zip(v_c[:3], v_i[:3], v_u[:3]):
        assert (c - i).abs().max() > 1e-6 * c.abs().max() and (i - u).abs().max() > 1e-6 * i.abs().max()
    for s_t, s_i in ((3.0, None), (3.0, 1.5)):
        guided = _probe(_generator(module, cfg_scale=s_t, image_cfg_scale=s_i), [edit], monkeypatch)
        for g, c, i, u in zip(guided[:3], v_c[:3], v_i[:3], v_u[:3]):
            expected = u + s_t * (c - u) if s_i is None else u + s_i * (i - u) + s_t * (c - i)
            assert (g - expected).abs().max() <= 1e-9 * expected.abs().max()
        assert bool(torch.isfinite(guided[-1]).all()) and guided[-1].shape == v_c[-1].shape


@pytest.mark.parametrize("image_cfg_scale", [None, 1.5])
def test_cache_and_batch_change_nothing(module, image_cfg_scale):
    data = ShapeEdits(2, 16)
    prompts = [["a large blue square", IMAGE], [data[0]["source"].double(), "make it red", IMAGE],
               [data[1]["source"].double()]]
    options = dict(cfg_scale=3.0, image_cfg_scale=image_cfg_scale, max_new_tokens=4)
    cached = _generator(module, **options).generate(prompts, seeds=[0, 1, 2], decode=False)
    recomputed = _generator(module, use_cache=False, **options).generate(prompts, seeds=[0, 1, 2], decode=False)
    alone = [_generator(module, **options).generate([p], seeds=[i], decode=False)[0] for i, p in enumerate(prompts)]
    assert isinstance(cached[0][0], torch.Tensor) and isinstance(cached[1][0], torch.Tensor)
    for a, b, c in zip(cached, recomputed, alone):
        assert [type(s) for s in a] == [type(s) for s in b] == [type(s) for s in c]
        for x, y, z in zip(a, b, c):
            if isinstance(x, str):
                assert x == y == z
            else:
                assert bool(torch.isfinite(x).all())
                for other in (y, z):
                    assert (x - other).abs().max() <= 1e-9 * x.abs().max()
    images = module.generator(num_steps=3, max_new_tokens=0).generate_images(["a red circle"], [0])
    assert images.shape == (1, 3, 16, 16) and bool((images.abs() <= 1).all())


# ---------------------------------------------------------------- mismatched options

def test_mismatched_sampler_and_objective_are_refused(module, tmp_path, tokenizer_path, autoencoder_ckpt, capsys):
    for sampler in ("ddpm", "ddim"):
        with pytest.raises(ValueError, match="--model.init_args.sampling.sampler euler"):
            module.generator(sampler=sampler)
    ddpm = Transfusion(replace(module.config, objective="ddpm"))
    assert isinstance(ddpm.schedule, DDPM)
    with pytest.raises(ValueError, match="--model.init_args.sampling.sampler ddpm"):
        TransfusionGenerator(ddpm, module.autoencoder.model, module.tokenizer, replace(module.sampling, sampler="euler"))
    with pytest.raises(ValueError, match="sampler"):
        replace(module.sampling, sampler="heun")
    with pytest.raises(ValueError, match="objective"):
        TransfusionConfig(objective="edm")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        TransfusionConfig(objective="flow", min_snr_gamma=5.0)
    with pytest.raises(SystemExit):  # transfusion_embedded.yaml's Min-SNR, left on: refused before anything runs
        _fit(tmp_path, tokenizer_path, autoencoder_ckpt, "--model.init_args.min_snr_gamma", "5.0")
    assert "min_snr_gamma=5.0" in capsys.readouterr().err
    evaluation = {"class_path": "transfusion.lightning.evaluation.Evaluation",  # DDIM evaluations, refused at the start
                  "init_args": {"metrics": ["follow"], "every_n_train_steps": 100, "at_train_end": False,
                                "sampling": {"sampler": "ddim"}}}
    with pytest.raises(ValueError, match="--model.init_args.sampling.sampler euler"):
        _fit(tmp_path, tokenizer_path, autoencoder_ckpt, f"--trainer.callbacks+={json.dumps(evaluation)}")
