"""The sweep: parity FLOP ratios against hand computations, and tiny Transfusion and Chameleon models trained
and evaluated through `transfusion sweep`, giving a well-formed Table 3, ablation table, plot, CSV and JSON."""

import csv
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from transfusion.cli import main
from transfusion.sweep.parity import metric_info, parity_flops, parity_ratio_text, running_best
from transfusion.sweep.runner import Sweep

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


# ---------------------------------------------------------------- parity FLOP ratio
def test_parity_is_interpolated_in_log_flops():
    # FID (lower is better) 100, 60, 30 at 1e10, 1e11, 1e12 FLOPs; Chameleon's 45 lies half-way between 60 and 30,
    # so in log FLOPs half-way between 1e11 and 1e12: 10^11.5
    p = parity_flops([1e10, 1e11, 1e12], [100.0, 60.0, 30.0], 45.0, higher_is_better=False)
    assert p.status == "interpolated" and p.flops == pytest.approx(10 ** 11.5, rel=1e-12)
    assert parity_ratio_text(p, 1e12) == "0.316"
    # CIDEr (higher is better) 1, 5, 9 at 1e9, 1e10, 1e11: 7 is reached at 10^10.5
    p = parity_flops([1e11, 1e9, 1e10], [9.0, 1.0, 5.0], 7.0, higher_is_better=True)  # any order
    assert p.flops == pytest.approx(10 ** 10.5, rel=1e-12)


def test_parity_uses_the_running_best_and_reports_bounds():
    flops, fid = [1e9, 1e10, 1e11, 1e12], [100.0, 60.0, 70.0, 30.0]  # a worse later evaluation does not count
    assert running_best(flops, fid, higher_is_better=False) == (flops, [100.0, 60.0, 60.0, 30.0])
    p = parity_flops(flops, fid, 50.0, higher_is_better=False)  # between (1e11, 60) and (1e12, 30): 1/3 of the way
    assert p.flops == pytest.approx(1e11 * 10 ** (1 / 3), rel=1e-12)
    first = parity_flops(flops, fid, 120.0, higher_is_better=False)
    assert first.status == "at_first" and first.flops == 1e9 and parity_ratio_text(first, 1e10) == "<= 0.1"
    never = parity_flops(flops, fid, 10.0, higher_is_better=False)
    assert never.flops is None and never.best == 30.0 and never.best_flops == 1e12
    assert parity_ratio_text(never, 1e12) == "not reached (best 30 at 1.00e+12 FLOPs)"
    clip = parity_flops(flops, [0.0, 0.0, 3.0, 5.0], 0.0, higher_is_better=True)  # any model reaches a CLIP score of 0
    assert clip.status == "at_floor" and clip.flops is None and clip.best == 5.0
    assert parity_ratio_text(clip, 1e12) == "n/a (Chameleon at 0, the metric's floor)"
    exact = parity_flops(flops, fid, 60.0, higher_is_better=False)  # reached exactly at an evaluation
    assert exact.flops == pytest.approx(1e10)


def test_metric_directions():
    assert [metric_info(k)[1] for k in ("fid", "ppl", "cider_d", "clip_score@shapes-clip")] == [False, False, True, True]
    assert metric_info("clip_score@shapes-clip")[0] == "CLIP score (shapes-clip)"
    assert metric_info("follow@shapes") == ("prompt following (shapes)", True)
    assert metric_info("follow@shapes/one_object") == ("prompt following: one object (shapes)", True)
    with pytest.raises(KeyError, match="unknown metric"):
        metric_info("bleu")


# ---------------------------------------------------------------- the sweep command
def _common(seq_len: int) -> dict:
    return {"model.init_args.lr": 3e-3, "model.init_args.warmup_steps": 2, "data.init_args.seq_len": seq_len,
            "data.init_args.batch_size": 4, "data.init_args.num_workers": 0, "trainer.limit_val_batches": 1,
            "trainer.log_every_n_steps": 1, "trainer.enable_progress_bar": False}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tokenizer_path, autoencoder_ckpt, vq_ckpt, fid_weights, clip_dir):
    out = tmp_path_factory.mktemp("sweep")
    config = {
        "output": str(out / "sweep"),
        "transfusion": {"config": "lightning_configs/transfusion_embedded.yaml",
                        "overrides": {**_common(64), "model.init_args.sampling.num_steps": 3}},
        "chameleon": {"config": "lightning_configs/chameleon_embedded.yaml", "overrides": _common(48)},
        "sizes": {"XS": {"model.init_args.preset": "debug", "model.init_args.transformer": {"dim": 32, "n_heads": 2}},
                  "S": {"model.init_args.preset": "debug"}},
        "budgets": [3],
        "eval_every_n_steps": 2,
        "evaluation": {"num_samples": 4, "batch_size": 4, "metrics": ["fid", "clip", "cider", "ppl", "follow"],
                       "fid_weights": fid_weights, "fid_features": 64, "max_text_windows": 2, "max_caption_tokens": 4, "log_samples": 2},
        "tokenizer": {"path": tokenizer_path}, "autoencoder": {"path": autoencoder_ckpt},
        "vqvae": {"path": vq_ckpt}, "clip": {"path": clip_dir},
        "ablations": [{"name": "intra-image attention", "size": "XS",
                       "settings": {"bidirectional": {}, "causal": {"model.init_args.bidirectional_images": False}}}],
        "lr_grid": {"values": [1e-3, 3e-3], "metrics": ["ppl", "cider_d"], "size": "XS", "budget": 2},
        # a variant in Table 3, and a text model pretrained here (Hugging Face Llama layout) that an ablation names
        "variants": {"transfusion_mot": {"config": "lightning_configs/transfusion_embedded.yaml", "overrides": {
            **_common(64), "model.init_args.sampling.num_steps": 3, "model.init_args.modality_experts": True}}},
        "text_model": {"config": "lightning_configs/text_model_embedded.yaml", "overrides": {
            **_common(64), "model.init_args.preset": "debug", "trainer.max_steps": 2, "trainer.val_check_interval": 2}},
    }
    config["ablations"].append({"name": "text weights", "model": "transfusion_mot", "size": "S", "settings": {
        "scratch": {}, "LMFusion": {"model.init_args.text_model": "{text_model}", "model.init_args.freeze_text": True}}})
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # sizes in order, small to large
    main(["sweep", "--config", str(path)])
    return out


@pytest.mark.slow
def test_sweep_writes_table3_csv_json_and_plot(sweep_dir):
    out = sweep_dir / "sweep"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    metrics = ["ppl", "cider_d", "fid@64", "clip_score@test-clip", "follow@shapes", "captions@shapes"]
    parts = [f"follow@shapes/{k}" for k in ("blank", "colour", "one_image", "one_object", "position", "shape", "size")]
    assert list(rows[0])[-len(metrics) - len(parts) - 4:] == metrics[:5] + parts + metrics[5:] + [
        f"captions@shapes/{k}" for k in ("colour", "position", "shape", "size")]  # the CSV has every rate
    main_runs = {(r["model"], r["size"]) for r in rows if not r["ablation"]}
    assert main_runs == {(m, s) for m in ("transfusion", "chameleon", "transfusion_mot") for s in ("XS", "S")}
    for run in {r["run"] for r in rows}:
        mine = [r for r in rows if r["run"] == run and r["setting"] not in ("bidirectional", "scratch")]  # reused runs once
        budget = int(mine[0]["budget"])
        assert [int(r["step"]) for r in mine] == [2, 3][:budget - 1], run  # every 2 steps, and at the last step
        flops = [float(r["flops"]) for r in mine]
        assert flops[0] > 0 and all(b > a for a, b in zip(flops, flops[1:]))
        assert all(float(r["flops"]) == 6 * int(r["params"]) * int(r["tokens"]) for r in mine)
        assert all(float(r["flops_exact"]) > float(r["flops"]) for r in mine)  # attention on top
        assert all(math.isfinite(float(r[m])) for r in mine for m in metrics)
    xs, s = ({int(r["params"]) for r in rows if r["model"] == "transfusion" and r["size"] == size} for size in ("XS", "S"))
    assert max(xs) < min(s)

    # Table 3: one row per metric, in the paper's format, and the ratio the CSV implies
    table = (out / "table3.md").read_text().splitlines()
    assert table[2] == ("| metric | better | Transfusion | Chameleon | parity FLOP ratio | transfusion_mot | "
                        "transfusion_mot vs Chameleon | transfusion_mot vs Transfusion |")
    body = [line.split(" | ") for line in table[4:]]
    assert [b[0].strip("| ") for b in body] == ["perplexity", "CIDEr-D", "FID (64)", "CLIP score (test-clip)",
                                                "prompt following (shapes)", "caption attributes (shapes)"]
    assert [b[1] for b in body] == ["lower", "higher", "lower", "higher", "higher", "higher"]
    result = json.loads((out / "results.json").read_text())
    t3 = result["table3"]
    assert t3["size"] == "S" and t3["budget"] == 3
    chameleon = [r for r in rows if r["model"] == "chameleon" and r["size"] == "S" and r["step"] == "3"][0]
    curve = [r for r in rows if r["model"] == "transfusion" and not r["ablation"]]
    for line, cells in zip(t3["rows"], body):
        key, higher = line["metric"], line["higher_is_better"]
        assert line["chameleon"] == pytest.approx(float(chameleon[key]))
        expected = parity_flops([float(r["flops"]) for r in curve], [float(r[key]) for r in curve],
                                float(chameleon[key]), higher)
        assert line["parity_status"] == expected.status
        assert cells[4].rstrip(" |") == parity_ratio_text(expected, float(chameleon["flops"]))
        cell = r"(<= )?[0-9.e+-]+|not reached \(best .* FLOPs\)|n/a \(Chameleon at 0, the metric's floor\)"
        assert re.fullmatch(cell, cells[4].rstrip(" |"))
        mot = [r for r in rows if r["model"] == "transfusion_mot" and not r["ablation"]]
        against_tf = parity_flops([float(r["flops"]) for r in mot], [float(r[key]) for r in mot], line["transfusion"],
                                  higher)
        transfusion = [r for r in rows if r["run"] == "transfusion-S-3" and r["step"] == "3"][0]
        against_ch = parity_flops([float(r["flops"]) for r in mot], [float(r[key]) for r in mot], line["chameleon"],
                                  higher)
        mot_final = [r for r in mot if r["size"] == "S" and r["step"] == "3"][0]
        assert float(cells[5]) == pytest.approx(float(mot_final[key]), rel=1e-3)
        assert cells[6] == parity_ratio_text(against_ch, float(chameleon["flops"]))
        assert cells[7].rstrip(" |") == parity_ratio_text(against_tf, float(transfusion["flops"]), "Transfusion")

    # the learning-rate grid ran first; each model's other runs trained at its rate with the best mean rank of final
    # perplexity and CIDEr-D: of two rates, the one with the lower perplexity (agreeing metrics, or a tie broken by it)
    chosen = t3["learning_rates"]["chosen"]
    for model in ("transfusion", "chameleon"):
        finals = {float(json.loads((out / "runs" / f"{model}-XS-2-lr_{lr:g}" / "evaluations.json").read_text())
                        ["run"]["overrides"]["model.init_args.lr"]):
                  [float(r["ppl"]) for r in rows if r["run"] == f"{model}-XS-2-lr_{lr:g}"][-1] for lr in (1e-3, 3e-3)}
        assert chosen[model] == min(finals, key=finals.get)
        for size in ("XS", "S"):
            record = json.loads((out / "runs" / f"{model}-{size}-3" / "evaluations.json").read_text())
            assert record["run"]["overrides"]["model.init_args.lr"] == chosen[model]
    record = json.loads((out / "runs" / "transfusion_mot-S-3" / "evaluations.json").read_text())
    assert record["run"]["overrides"]["model.init_args.lr"] == chosen["transfusion"]  # a variant: Transfusion's rate
    mot, dense = (json.loads((out / "runs" / f"{m}-S-3" / "evaluations.json").read_text())["evaluations"][-1]
                  for m in ("transfusion_mot", "transfusion"))
    assert (mot["params"], mot["tokens"], mot["flops"]) == (dense["params"], dense["tokens"], dense["flops"])  # same N, D
    assert "Learning rates: each model's best mean rank of final perplexity, CIDEr-D on the same grid (0.001, 0.003" in table[0]

    ablation = (out / "ablations.md").read_text()
    assert "| learning rate (transfusion) | transfusion | XS | 2 | lr 0.001 |" in ablation
    assert "| intra-image attention | transfusion | XS | 3 | bidirectional |" in ablation
    assert "| intra-image attention | transfusion | XS | 3 | causal |" in ablation
    assert len(result["ablations"][0]["settings"]) == 2
    assert "| text weights | transfusion_mot | S | 3 | LMFusion |" in ablation
    lmfusion = json.loads((out / "runs" / "transfusion_mot-S-3-text_weights-lmfusion" / "evaluations.json").read_text())
    text_model = sweep_dir / "sweep" / "text_model" / "model"
    assert f"--model.init_args.text_model={text_model}" in " ".join(lmfusion["args"]).replace(
        "--model.init_args.text_model ", "--model.init_args.text_model=")
    assert {p.name for p in text_model.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}

    with Image.open(out / "scaling.png") as image:
        assert image.format == "PNG" and image.width > 6 * image.height / 2  # six panels side by side


@pytest.mark.slow
def test_sweep_resumes_without_training_again(sweep_dir, monkeypatch):
    before = (sweep_dir / "sweep" / "results.csv").read_text()
    monkeypatch.setattr(Sweep, "_train", lambda *a: pytest.fail("a finished run was trained again"))
    main(["sweep", "--config", str(sweep_dir / "sweep.yaml")])
    assert (sweep_dir / "sweep" / "results.csv").read_text() == before


def test_sweep_rejects_bad_configs():
    runs = {"config": "x.yaml"}
    with pytest.raises(ValueError, match="reference_size"):
        Sweep(runs, runs, {"S": {}}, [4], 2, reference_size="L")
    with pytest.raises(ValueError, match="ablation 'a' names size 'L'"):
        Sweep(runs, runs, {"S": {}}, [4], 2, ablations=[{"name": "a", "settings": {}, "size": "L"}])
    with pytest.raises(ValueError, match=r"override model.init_args.text_model: \{text_model\} names nothing"):
        Sweep(runs, runs, {"S": {}}, [4], 2, variants={"lmfusion": {"config": "x.yaml", "overrides": {
            "model.init_args.text_model": "{text_model}"}}})
    with pytest.raises(ValueError, match="variant names"):
        Sweep(runs, runs, {"S": {}}, [4], 2, variants={"chameleon": runs})


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("sweep_*.yaml")))
@pytest.mark.slow
def test_shipped_sweep_configs_and_their_runs_parse(config, capsys):
    from transfusion.cli import cli_main
    from transfusion.sweep import parse_sweep

    micro = ["--config", str(CONFIGS / "sweep_micro.yaml")]  # layered on the micro sweep
    base = {"sweep_ablations.yaml": micro, "sweep_beyond.yaml": micro, "sweep_seeds.yaml": micro}
    sweep, _ = parse_sweep(base.get(config, []) + ["--config", str(CONFIGS / config)])
    assert sweep.reference_size in sweep.sizes
    if config == "sweep_ablations.yaml":
        assert {a.name for a in sweep.ablations} >= {"intra-image attention", "patch encoder", "patch size"}
    prepared = {"tokenizer": "tokenizer.model", "autoencoder": "ae.ckpt", "vqvae": "vq.ckpt", "clip": "clip",
                "text_model": "text_model"}
    runs = list({r.name: r for r in sweep.runs}.values())
    if sweep.seeds:  # the micro sweep's runs at another seed: one run of each model shows the seed's arguments
        runs = [r for r in runs if r.seed == sweep.seeds[-1] and r.ablation is None and r.size == sweep.reference_size]
    for run in runs:  # every training run's command line is valid
        with pytest.raises(SystemExit) as exit_info:
            cli_main(sweep.fit_args(run, prepared) + ["--print_config"])
        assert exit_info.value.code == 0, run.name
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["max_steps"] == run.budget
        evaluation = printed["trainer"]["callbacks"][-1]
        assert evaluation["class_path"].endswith("Evaluation")
        assert evaluation["init_args"]["every_n_train_steps"] == sweep.eval_every
        assert printed["model"]["class_path"].endswith("ChameleonModule" if run.model == "chameleon"
                                                       else "TransfusionModule")
        if run.seed is not None:
            assert printed["seed_everything"] == run.seed


def test_learning_rate_choice_by_mean_rank():
    from transfusion.sweep.runner import best_by_mean_rank

    finals = {3e-4: {"fid": 180.0, "clip_score@c": 40.0, "ppl": 450.0},
              1e-3: {"fid": 140.0, "clip_score@c": 80.0, "ppl": 280.0},
              3e-3: {"fid": 155.0, "clip_score@c": 72.0, "ppl": 190.0}}
    # ranks: fid 3/1/2, CLIP (higher is better) 3/1/2, ppl 3/2/1 -> means 3, 4/3, 5/3
    assert best_by_mean_rank(finals, ["fid", "clip_score", "ppl"]) == 1e-3
    assert best_by_mean_rank(finals, ["ppl"]) == 3e-3
    assert best_by_mean_rank(finals, ["clip_score@c"]) == 1e-3
    # a tie in mean rank goes to the better first metric
    assert best_by_mean_rank(finals, ["fid", "ppl"]) == 1e-3
    assert best_by_mean_rank(finals, ["ppl", "fid"]) == 3e-3
    # a diverged run ranks last whatever the direction, and equal values share their rank
    finals[1e-2] = {"fid": float("nan"), "clip_score@c": float("nan"), "ppl": float("inf")}
    assert best_by_mean_rank(finals, ["fid", "clip_score", "ppl"]) == 1e-3
    assert best_by_mean_rank({1: {"ppl": 5.0}, 2: {"ppl": 5.0}}, ["ppl"]) == 1
    with pytest.raises(ValueError, match="lr_grid metric 'cider_d' names no evaluated metric"):
        best_by_mean_rank(finals, ["cider_d"])


def test_learning_rate_grid_is_checked_before_training():
    runs = {"config": "x.yaml"}
    with pytest.raises(ValueError, match="lr_grid needs values and metrics"):
        Sweep(runs, runs, {"S": {}}, [4], 2, lr_grid={"values": [], "metrics": ["fid"]})
    with pytest.raises(ValueError, match="lr_grid metric 'cider_d' needs 'cider' in evaluation.metrics"):
        Sweep(runs, runs, {"S": {}}, [4], 2, evaluation={"metrics": ["fid"]}, lr_grid={"values": [1e-3], "metrics": ["cider_d"]})
    with pytest.raises(KeyError, match="unknown metric 'bleu'"):
        Sweep(runs, runs, {"S": {}}, [4], 2, lr_grid={"values": [1e-3], "metrics": ["bleu"]})
