"""The embedded scenes: deterministic, each picture true to its GenEval record, held-out combinations never
trained on; the scene configs train Transfusion and Chameleon and score them with GenEval's rules."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from transfusion.cli import cli_main
from transfusion.data.embedded.scenes import (GAP, HELDOUT_BINDINGS, HELDOUT_COUNTS, TASKS, ScenesDataset,
                                              evaluation_metadata, is_heldout, records, write_metadata)
from transfusion.data.embedded.shapes import shape_box
from transfusion.evaluation.geneval import check_metadata, evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


def _truth(objects):
    """The objects as a perfect detector reports them: class -> [{"colour", "box"}], largest first."""
    found = {}
    for o in sorted(objects, key=lambda o: -o["r"]):
        found.setdefault(o["shape"], []).append({"colour": o["colour"], "box": shape_box(o["shape"], o["cx"], o["cy"], o["r"])})
    return found


def test_scenes_are_deterministic_and_true_to_their_records():
    data = ScenesDataset(300, 32, seed=0)
    assert torch.equal(data[7]["image"], ScenesDataset(300, 32, seed=0)[7]["image"])
    assert not torch.equal(data[7]["image"], ScenesDataset(300, 32, seed=1)[7]["image"])
    tags = Counter()
    for i in range(300):
        item = data[i]
        assert item["captions"] == [item["metadata"]["prompt"]] and item["image"].shape == (3, 32, 32)
        assert evaluate(_truth(item["objects"]), item["metadata"])[0], item["metadata"]["prompt"]
        assert len(item["objects"]) == sum(c["count"] for c in item["metadata"]["include"])  # nothing unasked
        boxes = [shape_box(o["shape"], o["cx"], o["cy"], o["r"]) for o in item["objects"]]
        for j, a in enumerate(boxes):  # no overlaps: a gap between every two boxes
            assert all(0 <= v <= 1 for v in a)
            for b in boxes[:j]:
                assert a[0] - GAP >= b[2] or b[0] - GAP >= a[2] or a[1] - GAP >= b[3] or b[1] - GAP >= a[3]
        tags[item["metadata"]["tag"]] += 1
    assert set(tags) == set(TASKS) and min(tags.values()) > 25  # tasks drawn uniformly


def test_training_never_shows_a_heldout_combination():
    data = ScenesDataset(400, 32, seed=0)
    for i in range(400):
        item = data[i]
        assert not is_heldout(item["metadata"])
        assert not {(o["colour"], o["shape"]) for o in item["objects"]} & HELDOUT_BINDINGS
        per_class = Counter(o["shape"] for o in item["objects"])
        assert not {(n, s) for s, n in per_class.items()} & HELDOUT_COUNTS
    heldout = records("heldout")
    assert all(heldout[t] for t in TASKS)
    assert all(is_heldout(r) for t in TASKS if t != "single_object" for r in heldout[t])
    train_prompts = {r["prompt"] for t in TASKS for r in records("train")[t]}
    assert not train_prompts & {r["prompt"] for t in TASKS if t != "single_object" for r in heldout[t]}


def test_evaluation_metadata_is_genevals_format(tmp_path):
    path = write_metadata(tmp_path / "evaluation_metadata.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == evaluation_metadata() and len({r["prompt"] for r in lines}) == len(lines)
    for r in lines:
        check_metadata(r)
        assert set(r) <= {"tag", "include", "exclude", "prompt"} and r["prompt"].startswith("a photo of ")
    counting = next(r for r in lines if r["tag"] == "counting")
    n = counting["include"][0]["count"]
    assert counting["exclude"] == [{"class": counting["include"][0]["class"], "count": n + 1}]
    position = next(r for r in lines if r["tag"] == "position")
    assert position["include"][1]["position"][1] == 0  # the placed object points back at the reference
    held = ScenesDataset(12, 32, seed=2, split="heldout")
    assert [held[i]["metadata"]["tag"] for i in range(6)] == list(TASKS)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        ScenesDataset(4, 32, split="test")
    with pytest.raises(ValueError, match="image_size >= 16"):
        ScenesDataset(4, 8)
    from transfusion.data.modules.image import ImageDataModule

    with pytest.raises(ValueError, match="data option images must be 'shapes' or 'scenes'"):
        ImageDataModule(images="scene")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transfusion", "chameleon"])
def test_scene_configs_train_two_steps_and_report_geneval(model, tmp_path, tokenizer_path, autoencoder_ckpt, vq_ckpt):
    root = tmp_path / model
    cli = cli_main(["fit", "--config", str(CONFIGS / f"{model}_scenes.yaml"),
                    "--model.init_args.tokenizer", tokenizer_path,
                    "--model.init_args.autoencoder", vq_ckpt if model == "chameleon" else autoencoder_ckpt,
                    "--model.init_args.preset", "debug",
                    *([] if model == "chameleon" else ["--model.init_args.sampling.num_steps", "2"]),
                    "--data.init_args.seq_len", "64", "--data.init_args.batch_size", "4",
                    "--data.init_args.num_workers", "0", "--data.init_args.rows_per_epoch", "16",
                    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                    "--trainer.callbacks+=transfusion.lightning.evaluation.Evaluation",
                    "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.on_test=false",
                    "--trainer.callbacks.metrics=[geneval]", "--trainer.callbacks.num_samples=6",
                    "--trainer.callbacks.max_caption_tokens=2", "--trainer.callbacks.output_dir", str(root / "eval")])
    assert cli.trainer.global_step == 2
    report = json.loads((root / "eval" / "evaluation.json").read_text())
    expected = {"geneval@scenes", *(f"geneval@scenes/{t}" for t in TASKS)}
    assert set(report["metrics"]) == expected  # six samples: one a task
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    tasks = [report["metrics"][f"geneval@scenes/{t}"] for t in TASKS]
    assert report["metrics"]["geneval@scenes"] == pytest.approx(sum(tasks) / len(tasks))
