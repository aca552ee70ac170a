"""The evaluation report (``transfusion.evaluation.report``): what a module says of itself (``report_fields``), the
JSON and Markdown files written from it, and the sample grids the ``Evaluation`` callback hands to a file logger."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from transfusion.evaluation.report import evaluation_report, markdown_table, write_report

KEYS = ["model", "weights", "metrics", "num_samples", "ppl_tokens", "tokenizer", "sampler", "cfg_scale", "fid_weights",
        "clip_model", "training_flops", "training_flops_exact", "training_tokens", "training_steps", "training_seconds",
        "world_size"]  # evaluation.json's fields, in order (sweeps and the quickstart read them)


@pytest.fixture(scope="module")
def module(tokenizer_path, autoencoder_ckpt):
    from transfusion.lightning.transfusion import TransfusionModule

    return TransfusionModule(tokenizer_path, autoencoder_ckpt, preset="debug", sampling={"num_steps": 4})


def test_report_fields_say_what_the_module_is_and_samples_with(module, tokenizer_path, monkeypatch):
    fields = module.report_fields()
    assert fields == {"model": "TransfusionModule", "weights": "raw", "tokenizer": tokenizer_path,
                      "sampling": module.sampling_summary(), "flops": module.training_flops(), "training_steps": 0}
    assert fields["sampling"]["num_steps"] == 4 and fields["flops"]["tokens"] == 0
    other = module.report_fields(replace(module.sampling, sampler="ddim", num_steps=2))  # the callback's options
    assert (other["sampling"]["sampler"], other["sampling"]["num_steps"]) == ("ddim", 2)
    monkeypatch.setattr(module, "trained_steps", 40, raising=False)  # read from a checkpoint (validate / test)
    assert module.report_fields()["training_steps"] == 40
    assert (module.generation_seed, module.max_seq_len) == (0, module.config.transformer.max_seq_len)


def test_report_written_as_json_and_markdown(module, tmp_path):
    metrics = {"cider_d": 0.123456, "ppl": float("nan"), "follow@shapes": 0.5}
    report = evaluation_report(metrics, module.report_fields(), num_samples=8, ppl_tokens=None, fid_weights=None,
                               clip_model="clip", training_seconds=None, world_size=2)
    assert list(report) == KEYS
    assert report["sampler"] == {k: v for k, v in module.sampling_summary().items() if k != "cfg_scale"}
    assert report["cfg_scale"] == module.sampling.cfg_scale and report["training_flops"] == 0.0
    path = write_report(report, tmp_path / "new")  # the folder is made
    assert path == tmp_path / "new" / "evaluation.json"
    read = json.loads(path.read_text())
    assert list(read) == KEYS and read["metrics"]["cider_d"] == 0.123456 and read["world_size"] == 2
    table = (tmp_path / "new" / "evaluation.md").read_text()
    assert table == markdown_table(report)
    rows = dict(line.strip("| ").split(" | ") for line in table.splitlines()[2:])
    assert (rows["cider_d"], rows["ppl"], rows["follow@shapes"]) == ("0.1235", "nan", "0.5000")
    assert rows["model"] == "TransfusionModule" and rows["processes"] == "2" and rows["perplexity tokens"] == "None"
    assert rows["image sampling"].startswith("sampler ddpm, num_steps 4") and rows["captions"] == "greedy"
    assert rows["training FLOPs (6ND)"] == "0.000e+00"
    assert markdown_table({**report, "training_flops": None}).count("| not recorded |") == 1  # older checkpoints


def test_sample_grids_go_beside_a_file_logger(tmp_path):
    from transfusion.lightning.evaluation import log_pictures
    from transfusion.lightning.evaluation import markdown_table as old_home

    assert old_home is markdown_table  # the callback's module still offers it
    trainer = SimpleNamespace(global_step=3, default_root_dir=str(tmp_path), logger=SimpleNamespace(log_dir=None))
    grid = Image.fromarray(torch.zeros(4, 6, 3, dtype=torch.uint8).numpy())
    log_pictures(trainer, "val", {"caption_to_image": grid, "edits": grid}, {"captions": "| a |\n"})
    folder = tmp_path / "evaluation" / "val_step3"
    assert sorted(p.name for p in folder.iterdir()) == ["caption_to_image.png", "captions.md", "edits.png"]
    assert Image.open(folder / "edits.png").size == (6, 4) and (folder / "captions.md").read_text() == "| a |\n"
