"""`transfusion quickstart` end to end, a few steps of each stage: every file it promises and every report field,
with values (a stage that silently did nothing leaves NaN or step -1 in the report)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _finite_pairs(value) -> bool:
    """A (step, value) pair as the report writes it: a real step, a finite value."""
    step, number = value
    return step >= 0 and math.isfinite(number)


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_the_whole_report(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "transfusion.cli", "quickstart", "--output", str(out), "--autoencoder_steps", "2",
           "--steps", "2", "--preset", "debug", "--predict_examples", "2", "--inference_steps", "2",
           "--curve_examples", "2", "--seed", "3"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"seed", "autoencoder_checkpoint", "transfusion_checkpoint", "timings", "autoencoder",
                           "transfusion", "follow", "curve"}
    assert report["seed"] == 3
    for key in ("autoencoder_checkpoint", "transfusion_checkpoint"):
        assert Path(report[key]).is_file() and Path(report[key]).is_relative_to(out), report[key]
    assert set(report["timings"]) == {"tokenizer_s", "autoencoder_s", "transfusion_s", "generation_s"}
    assert all(seconds > 0 for seconds in report["timings"].values())
    assert set(report["autoencoder"]) == {"first_train_rec_loss", "last_val_rec_loss"}
    assert all(_finite_pairs(v) for v in report["autoencoder"].values()), report["autoencoder"]
    assert set(report["transfusion"]) == {"train/loss", "train/lm_loss", "train/ddpm_loss", "val/loss",
                                          "val/lm_loss", "val/ddpm_loss", "val/lm_ppl"}
    for key, series in report["transfusion"].items():
        assert set(series) == {"first", "last"} and all(_finite_pairs(v) for v in series.values()), (key, series)

    follow = report["follow"]
    assert follow["images"] == 2 and follow["captions"] == 2  # --predict_examples, each direction
    for rates in (follow["image_rates"], follow["caption_rates"]):
        assert {"size", "colour", "shape", "position", "all"} <= set(rates)
        assert all(0.0 <= v <= 1.0 for v in rates.values()), rates
    assert set(follow["confusion"]) == {"size", "colour", "shape", "position"}
    assert len(follow["examples"]) == 2 and all(set(e) == {"reference", "generated"} for e in follow["examples"])
    assert report["curve"], "no prompt-following evaluation during training"
    for point in report["curve"]:
        assert point["step"] >= 1 and "follow@shapes" in point and "captions@shapes" in point

    # the files the report points to
    assert (out / "tokenizer.model").is_file() and (out / "follow_curve.png").is_file()
    generations = (out / "samples" / "generations.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["kind"] for line in generations) == ["image-to-text"] * 2 + ["text-to-image"] * 2
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Transfusion quickstart report")
    losses = [line for line in markdown.splitlines() if line.startswith(("| autoencoder train/val", "| train/", "| val/"))]
    assert len(losses) == 8 and not any("nan" in line for line in losses), losses
    assert "| caption -> image | 2 |" in markdown and "| image -> caption | 2 |" in markdown


@pytest.mark.slow
def test_streamed_quickstart_trains_from_the_shards_it_writes_and_names_them_in_the_report(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "transfusion.cli", "quickstart", "--streamed", "--output", str(out),
           "--autoencoder_steps", "2", "--steps", "2", "--preset", "debug", "--predict_examples", "2",
           "--inference_steps", "2", "--curve_examples", "2", "--seed", "3"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    streamed = report["streamed"]
    assert streamed["shards"] == str(out / "shards") and streamed["image"] == "pixels"
    # the in-memory config's examples (num_examples 10000; validation: 64), shuffled with the run's seed
    assert (streamed["train_records"], streamed["validation_records"], streamed["shuffle_seed"]) == (10000, 64, 3)
    for split in ("train", "validation"):
        index = json.loads((out / "shards" / split / "index.json").read_text())
        assert index["content"] == "pairs" and index["skipped"] == {}
    assert set(report["timings"]) == {"tokenizer_s", "autoencoder_s", "shards_s", "transfusion_s", "generation_s"}
    for key, series in report["transfusion"].items():
        assert all(_finite_pairs(v) for v in series.values()), (key, series)
    assert report["curve"] and report["follow"]["images"] == 2 and report["follow"]["captions"] == 2

    # Transfusion was fitted from those shards, with the in-memory run's share of text rows
    import yaml

    config = yaml.safe_load(next((out / "transfusion").rglob("config.yaml")).read_text())
    data = config["data"]
    assert data["class_path"] == "transfusion.data.modules.streaming.StreamingDataModule"
    assert data["init_args"]["sources"] == [{"url": str(out / "shards" / "train"), "weight": 0.82}]
    assert data["init_args"]["val"] == str(out / "shards" / "validation") and data["init_args"]["text_weight"] == 0.18
    markdown = (out / "report.md").read_text()
    assert f"Streamed: Transfusion trained from the shard set `{out / 'shards'}`" in markdown
    assert "| shards |" in markdown and "| caption -> image | 2 |" in markdown
