"""The Chameleon baseline: vocabulary layout, loss masks, z-loss, training through the CLI, and generation
(image codes only, exactly n of them, CFG from the caption-dropped stream, KV cache == recomputation)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.cli import cli_main
from transfusion.generation import IMAGE, ChameleonGenerator, ChameleonSamplingOptions
from transfusion.models.chameleon import Chameleon, ChameleonConfig, insert_codes, z_loss
from transfusion.models.transformer import TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
PAD, BOI, EOI, TEXT_V, K, N_CODES = 3, 4, 5, 50, 20, 4


def _model(**overrides) -> Chameleon:
    torch.manual_seed(0)
    cfg = ChameleonConfig(transformer=TransformerConfig.from_name("debug", qk_norm=True, norm_reorder=True),
                          text_vocab_size=TEXT_V, codebook_size=K, patches_per_image=N_CODES, **overrides)
    return Chameleon(cfg).double()


def _row():
    """Two documents and padding: [BOS t t BOI c c c c EOI EOS] [BOS t BOI c c c c] PAD PAD."""
    tokens = torch.tensor([[1, 10, 11, BOI, 0, 0, 0, 0, EOI, 2, 1, 12, BOI, 0, 0, 0, 0, PAD, PAD]])
    doc_ids = torch.tensor([[0] * 10 + [1] * 7 + [19, 19]])
    image_ids = torch.full_like(tokens, -1)
    image_ids[0, 4:8], image_ids[0, 13:17] = 0, 1
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 19]])
    return insert_codes(tokens, image_ids, codes, TEXT_V), doc_ids, image_ids


def test_vocabulary_and_insert_codes():
    tokens, _, image_ids = _row()
    assert tokens[0, 4:8].tolist() == [51, 52, 53, 54] and tokens[0, 13:17].tolist() == [55, 56, 57, 69]
    assert _model().cfg.vocab_size == TEXT_V + K
    with pytest.raises(ValueError, match="8 image positions but 1 images"):
        insert_codes(tokens, image_ids, torch.zeros(1, 4, dtype=torch.long), TEXT_V)


def test_loss_is_next_token_cross_entropy_on_text_and_codes_within_documents():
    model = _model(z_loss_weight=0.0)
    tokens, doc_ids, image_ids = _row()
    out = model.loss(tokens, doc_ids, image_ids, pad_id=PAD)
    logits = model.lm_head(model(tokens, doc_ids))[0]  # (L, V)
    # trained: every input whose target is in the same document and not padding
    trained = [i for i in range(tokens.shape[1] - 1) if doc_ids[0, i] == doc_ids[0, i + 1] and tokens[0, i + 1] != PAD]
    assert trained == list(range(9)) + list(range(10, 16))  # not EOS->BOS (new document), not into padding
    ce = F.cross_entropy(logits[trained], tokens[0, [i + 1 for i in trained]], reduction="none")
    assert torch.allclose(out["loss"], ce.mean())
    image = [k for k, i in enumerate(trained) if image_ids[0, i + 1] >= 0]  # targets that are codes (BOI -> c1 too)
    assert len(image) == 8 and out["image_tokens"].item() == 8 and out["text_tokens"].item() == 7
    assert torch.allclose(out["image_loss"], ce[image].mean())
    text = [k for k in range(len(trained)) if k not in image]
    assert torch.allclose(out["lm_loss"], ce[text].mean())
    # padding and the next document cannot change the first document's loss terms
    other = tokens.clone()
    other[0, 10:] = torch.tensor([1, 30, BOI, 60, 61, 62, 63, 7, 7])
    logits2 = model.lm_head(model(other, doc_ids))[0]
    assert torch.allclose(logits2[:10], logits[:10])


def test_z_loss_value_and_weight():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    lse = torch.log(torch.exp(logits).sum(-1))
    assert z_loss(logits).item() == pytest.approx(float((lse**2).mean()))
    assert z_loss(logits[:1]).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    tokens, doc_ids, image_ids = _row()
    base = _model(z_loss_weight=0.0).loss(tokens, doc_ids, image_ids, pad_id=PAD)
    with_z = _model().loss(tokens, doc_ids, image_ids, pad_id=PAD)  # default weight 1e-5, same weights (seed)
    assert with_z["loss"].item() == pytest.approx(base["loss"].item() + 1e-5 * with_z["z_loss"].item(), abs=1e-12)
    assert with_z["z_loss"].item() > 0


def test_chameleon_switches_reach_the_transformer():
    block = _model().transformer.layers[0]
    assert block.norm_reorder and isinstance(block.attention.q_norm, nn.LayerNorm)


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def module(tokenizer_path, vq_ckpt):
    from transfusion.lightning.chameleon import ChameleonModule

    torch.manual_seed(0)
    m = ChameleonModule(tokenizer_path, vq_ckpt, preset="debug")
    with torch.no_grad():  # an untrained head would make every logit ~equal
        m.model.lm_head.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    return m.double().eval()


def _generate(module, prompts, **options):
    """The call's state (``Run``: its stream and caches) and the outputs."""
    gen, runs = _generator(module, options), []
    start = gen._start
    gen._start = lambda *args: runs.append(start(*args)) or runs[-1]
    outputs = gen.generate(prompts, decode=False)
    return runs[-1], outputs


def _generator(module, options):
    return ChameleonGenerator(module.model, module.autoencoder.model, module.tokenizer,
                              ChameleonSamplingOptions(**options))


def test_images_are_exactly_n_codes_even_when_text_is_far_likelier(module, logit_bias):
    tok, V = module.tokenizer, module.config.text_vocab_size
    n = module.config.patches_per_image
    with logit_bias(module, {tok.eos_id: 50.0, EOI: 50.0, 7: 40.0}):
        run, outputs = _generate(module, [["a red circle", IMAGE]], max_new_tokens=0, cfg_scale=3.0)
    (codes,) = outputs[0]
    assert codes.shape == (n,) and codes.min() >= 0 and codes.max() < module.config.codebook_size
    row = run.stream.tokens[0].tolist()
    start = row.index(tok.boi_id)
    assert all(t >= V for t in row[start + 1:start + 1 + n]) and row[start + 1 + n] == tok.eoi_id
    assert sum(t >= V for t in row) == n


def test_text_mode_never_samples_image_codes(module, logit_bias):
    V = module.config.text_vocab_size
    tok = module.tokenizer
    bias = {V + c: 50.0 for c in range(module.config.codebook_size)} | {tok.boi_id: -100.0, tok.eos_id: -100.0}
    with logit_bias(module, bias):
        run, outputs = _generate(module, ["a"], max_new_tokens=5, cfg_scale=1.0, temperature=1.0)
    assert [type(s) for s in outputs[0]] == [str]
    assert (run.stream.tokens[0] < V).all()


def test_cache_equals_recomputation_and_batch_equals_alone(module, images_16):
    prompts = [["a large red circle", IMAGE], [images_16[0]], "the", [images_16[1], "a", IMAGE]]
    opts = dict(max_new_tokens=6, cfg_scale=3.0, image_temperature=1.0)
    _, cached = _generate(module, prompts, **opts)
    _, recomputed = _generate(module, prompts, use_cache=False, **opts)
    alone = [_generate_one(module, p, i, opts) for i, p in enumerate(prompts)]
    for a, b, c in zip(cached, recomputed, alone):
        assert [type(s) for s in a] == [type(s) for s in b] == [type(s) for s in c]
        for x, y, z in zip(a, b, c):
            assert (x == y == z) if isinstance(x, str) else (torch.equal(x, y) and torch.equal(x, z))
    assert any(isinstance(s, torch.Tensor) for s in cached[0])


def _generate_one(module, prompt, index, opts):
    return _generator(module, opts).generate([prompt], seeds=[index], decode=False)[0]


def test_cfg_guides_with_the_caption_dropped_stream(module):
    """cfg_scale 0 keeps only the unconditional logits: the image must equal an unguided image from BOS BOI."""
    opts = dict(max_new_tokens=0, image_temperature=1.0)
    _, guided = _generate(module, [["a small blue square", IMAGE]], cfg_scale=0.0, **opts)
    _, uncond = _generate(module, [[IMAGE]], cfg_scale=1.0, **opts)
    _, cond = _generate(module, [["a small blue square", IMAGE]], cfg_scale=1.0, **opts)
    assert torch.equal(guided[0][0], uncond[0][0])
    assert not torch.equal(cond[0][0], uncond[0][0])


def test_module_shortcuts_use_the_chameleon_generator(module, images_16):
    assert isinstance(module.generator(), ChameleonGenerator)
    pixels = module.generator(cfg_scale=2.0).generate_images(["a red circle"])
    assert pixels.shape == (1, 3, 16, 16) and pixels.abs().max() <= 1
    captions = module.generate_captions(torch.stack(images_16[:2]), sampling=replace(module.sampling, max_new_tokens=3))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.fixture(scope="module")
def images_16():
    from transfusion.data.embedded.shapes import ShapesDataset

    ds = ShapesDataset(4, 16, seed=3)
    return [ds[i]["image"].double() for i in range(2)]


# ---------------------------------------------------------------- the CLI


def _fit_args(root: Path, tokenizer: str, vq: str, steps: int) -> list[str]:
    return ["--config", str(CONFIGS / "chameleon_embedded.yaml"),
            "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", vq,
            "--model.init_args.preset", "debug", "--model.init_args.lr", "3e-3", "--model.init_args.warmup_steps", "5",
            "--data.init_args.seq_len", "48", "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


@pytest.mark.slow
def test_fit_loss_falls_flops_counted_and_predict_writes_samples(tmp_path, tokenizer_path, vq_ckpt):
    cli = cli_main(["fit", *_fit_args(tmp_path, tokenizer_path, vq_ckpt, steps=40)])
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    for key in ("train/loss", "train/image_loss"):
        series = [float(r[key]) for r in rows if r.get(key)]
        assert sum(series[-5:]) / 5 < 0.8 * sum(series[:5]) / 5, key
    flops = [float(r["train/flops"]) for r in rows]
    assert all(b > a for a, b in zip(flops, flops[1:]))  # cumulative
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=False)
    module = cli.model
    assert ckpt["flops"]["flops"] == 6 * module.flop_counter.params * ckpt["flops"]["tokens"] == pytest.approx(flops[-1])
    assert ckpt["flops"]["params"] == sum(p.numel() for p in module.model.transformer.parameters())

    out, ckpt_path = tmp_path / "samples", cli.trainer.checkpoint_callback.last_model_path
    cli_main(["predict", *_fit_args(tmp_path, tokenizer_path, vq_ckpt, steps=40),
              "--config", str(CONFIGS / "chameleon_embedded_predict.yaml"),
              "--trainer.callbacks.init_args.output_dir", str(out), "--data.init_args.predict_examples", "2",
              "--ckpt_path", ckpt_path])
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["text-to-image", "image-to-text"] * 2
    assert all(len(r["images"]) == (r["kind"] == "text-to-image") for r in records)
    assert (out / "grid.png").is_file() and (out / records[0]["images"][0]).is_file()

    evaluation = tmp_path / "evaluation"  # the paper's metrics through the same command as Transfusion
    args = _fit_args(evaluation, tokenizer_path, vq_ckpt, steps=40)
    args[2:2] = ["--config", str(CONFIGS / "chameleon_evaluate_embedded.yaml")]  # the overlay, then the overrides
    cli_main(["test", *args, "--ckpt_path", ckpt_path,
              "--trainer.limit_test_batches", "1", "--trainer.callbacks.init_args.metrics", "[cider, ppl]",
              "--trainer.callbacks.init_args.num_samples", "4", "--trainer.callbacks.init_args.batch_size", "2",
              "--trainer.callbacks.init_args.max_text_windows", "4",
              "--trainer.callbacks.init_args.max_caption_tokens", "6",
              "--trainer.callbacks.init_args.output_dir", str(evaluation)])
    report = json.loads((evaluation / "evaluation.json").read_text())
    assert set(report["metrics"]) == {"cider_d", "ppl"} and report["metrics"]["ppl"] > 1
    assert report["training_steps"] == 40
