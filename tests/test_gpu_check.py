"""``bench/gpu_check.py`` runs its tiny dry version on the CPU, so the GPU check cannot rot between GPU runs:
every row is there and passes, and the JSON says what the table says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """`bench/gpu_check.py --dry`: every section in one fresh process (a process imports torch, Lightning and the
    package: seconds of the suite's time each)."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry", "--output", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry"] and not results["failures"], results["failures"]
    assert "| section | check | value | target | status |" in done.stdout
    return results


@pytest.mark.slow
def test_dry_generation(dry_run):
    """The cheap section: images/s, text tokens/s, cache == recompute on the CPU."""
    results = dry_run
    checks = [r["check"] for r in results["rows"]]
    assert "images/s, batch 2 (guidance 5, DDPM 3 steps, decoded)" in checks
    assert any(c.startswith("text, 8-token prompt + 4 tokens") for c in checks)
    gen = results["details"]["generation"]
    assert gen["cache_equal_text"] and gen["cache_latent_rel_diff"] <= 1e-9
    assert all(r["ok"] is not False for r in results["rows"])


@pytest.mark.slow
def test_dry_attention_training_quickstart(dry_run):
    """The sections that compile (FlexAttention, a compiled block: ~25 s on the CPU) or train through the CLI."""
    results = dry_run
    checks = [(r["section"], r["check"]) for r in results["rows"]]
    for kernel in ("FlexAttention (compiled)", "dense-mask SDPA"):
        for dtype in ("float32", "bfloat16"):
            assert (("attention", f"{kernel} {dtype}")) in checks
    assert all(r["ok"] is not False for r in results["rows"])
    runs = results["details"]["training"]["runs"]
    assert [(r["compile"], r["strategy"]) for r in runs] == [(False, "auto"), (True, "auto"), (False, "fsdp2")]
    assert all(r["steps"] == 3 and r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in runs)
    q = results["details"]["quickstart"]
    assert set(q["timings"]) == {"tokenizer_s", "autoencoder_s", "transfusion_s", "generation_s"}
    assert {"colour", "position", "size", "shape", "all"} <= set(q["follow"])
