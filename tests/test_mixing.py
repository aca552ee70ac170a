"""Mixing text and image-caption rows: the token ratio, determinism per seed, and 2-process DDP sharding
(each rank a distinct set of rows, together exactly the epoch: no duplicates, no gaps)."""

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfusion.data.rows.sequences import collate_rows

SCRIPT = Path(__file__).parent / "scripts" / "ddp_rows.py"
spec = importlib.util.spec_from_file_location("ddp_rows", SCRIPT)
ddp_rows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ddp_rows)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "images").mkdir()
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30), (200, 200, 200)]
    lines = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (10, 10), colour).save(tmp_path / "images" / f"{i}.png")
        lines += [json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}),
                  json.dumps({"file_name": f"{i}.png", "text": f"image number {i}"})]
    (tmp_path / "images" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "text.txt").write_text("".join(f"the story {i} goes on and on today.\n" for i in range(60)))
    return tmp_path


def _tokens(row: dict, pad_id: int) -> int:
    return int(((row["tokens"] != pad_id) | (row["image_ids"] >= 0)).sum())


@pytest.mark.slow
def test_text_to_image_caption_token_ratio_and_determinism(data, tokenizer_path, one_thread):
    for ratio in (1.0, 3.0):
        dm = ddp_rows.make_datamodule(tokenizer_path, data, rows_per_epoch=400, text_ratio=ratio)
        dm.setup("fit")
        pad = dm.layout.tokenizer.pad_id
        text = sum(_tokens(r, pad) for r in (dm.train_set[i] for i in range(400)) if r["images"].shape[0] == 0)
        pairs = sum(_tokens(r, pad) for r in (dm.train_set[i] for i in range(400)) if r["images"].shape[0] > 0)
        assert abs(text / pairs - ratio) / ratio < 0.2, (ratio, text / pairs)
    again = ddp_rows.make_datamodule(tokenizer_path, data, rows_per_epoch=400, text_ratio=3.0)
    again.setup("fit")
    for i in (0, 17, 399):
        a, b = dm.train_set[i], again.train_set[i]
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    other = ddp_rows.make_datamodule(tokenizer_path, data, rows_per_epoch=400, text_ratio=3.0, seed=1)
    other.setup("fit")
    assert any(not torch.equal(dm.train_set[i]["tokens"], other.train_set[i]["tokens"]) for i in range(8))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_shards_rows_without_duplicates_or_gaps(data, tokenizer_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), tokenizer_path, str(data), str(out)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert not set(ranks[0]) & set(ranks[1])  # distinct shards
    dm = ddp_rows.make_datamodule(tokenizer_path, data)
    dm.setup("fit")
    epoch = Counter(f for i in range(len(dm.train_set)) for f in ddp_rows.row_fingerprints(collate_rows([dm.train_set[i]])))
    assert Counter(ranks[0] + ranks[1]) == epoch  # together: every row of the epoch exactly once
