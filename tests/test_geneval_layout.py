"""`transfusion predict` on a GenEval metadata file writes GenEval's folder layout (djghosh13/geneval)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from transfusion.cli import cli_main, main
from transfusion.data.rows.geneval_prompts import read_metadata

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
LINES = [  # as GenEval's prompts/create_prompts.py writes them (key order kept)
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
     "prompt": "a photo of two squares"},
    {"tag": "position", "include": [{"class": "square", "count": 1},
                                    {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a circle left of a square"},
]


def _metadata(tmp_path: Path) -> Path:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return path


def _predict(config: str, tokenizer: str, autoencoder: str, metadata: Path, out: Path, batch_size: int, *extra):
    """A random debug model (layout, not quality): no checkpoint needed. On the CPU: batch == alone bit for bit."""
    cli_main(["predict", "--config", str(CONFIGS / config), "--config", str(CONFIGS / "geneval_predict.yaml"),
              "--trainer.accelerator", "cpu",
              "--model.init_args.tokenizer", tokenizer, "--model.init_args.autoencoder", autoencoder,
              "--model.init_args.preset", "debug", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(out.parent), "--data.init_args.metadata", str(metadata),
              "--data.init_args.output_dir", str(out), "--data.init_args.samples", "2",
              "--data.init_args.batch_size", str(batch_size), *extra])


def _check_layout(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    for i, line in enumerate(LINES):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == json.dumps(line)  # what GenEval's json.dump writes
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
        assert all(Image.open(p).size == (16, 16) for p in (folder / "samples").iterdir())
        assert Image.open(folder / "grid.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # one row, make_grid padding 2
        first, second = ((folder / "samples" / f"0000{k}.png").read_bytes() for k in range(2))
        assert first != second  # each image its own seed


def _files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_transfusion_writes_the_layout_deterministically_and_resumes(tmp_path, tokenizer_path, autoencoder_ckpt):
    metadata, out = _metadata(tmp_path), tmp_path / "geneval"
    _predict("transfusion_embedded.yaml", tokenizer_path, autoencoder_ckpt, metadata, out, 2,
             "--model.init_args.sampling.num_steps", "2")
    _check_layout(out)
    before = _files(out)
    # an interrupted run: folder 00001 lost an image and its completion mark; a stale 3rd image is left over
    (out / "00001" / "samples" / "00001.png").unlink()
    (out / "00001" / "metadata.jsonl").unlink()
    (out / "00001" / "samples" / "00002.png").write_bytes(b"stale")
    _predict("transfusion_embedded.yaml", tokenizer_path, autoencoder_ckpt, metadata, out, 1,
             "--model.init_args.sampling.num_steps", "2")
    _check_layout(out)
    after = _files(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # same bytes, batch 2 or 1
    rewritten = sorted(k for k in after if after[k][1] != before[k][1])
    assert rewritten and all(k.startswith("00001") for k in rewritten)  # complete folders were skipped


@pytest.mark.slow
def test_chameleon_writes_the_layout(tmp_path, tokenizer_path, vq_ckpt):
    metadata, out = _metadata(tmp_path), tmp_path / "geneval"
    _predict("chameleon_embedded.yaml", tokenizer_path, vq_ckpt, metadata, out, 3)
    _check_layout(out)


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["a photo of a cat"]', "expected a JSON object, got list"),
    ('{"prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}', "missing tag"),
    ('{"prompt": "", "tag": "single_object", "include": [{"class": "cat", "count": 1}]}', "prompt must be"),
    ('{"prompt": "a cat", "tag": "t", "include": [{"class": "cat", "count": 0}]}', r"include\[0\]: count must be"),
    ('{"prompt": "a cat", "tag": "t", "include": [{"class": "cat", "count": 1, "colour": "red"}]}',
     r"include\[0\]: unknown keys \['colour'\]"),
    ('{"prompt": "a cat", "tag": "t", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}',
     r"include\[0\]: position must be"),
    ('{"prompt": "a cat", "tag": "t", "include": [], "exclude": []}', "include must be a non-empty list"),
    ('{"prompt": "a cat", "tag": "t", "include": [{"class": "cat", "count": 1}], "exclude": {"class": "cat"}}',
     "exclude must be a list"),
    ("", "blank line"),
])
def test_bad_metadata_lines_are_named(tmp_path, line, message):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n" + line + "\n" + json.dumps(LINES[1]) + "\n")
    with pytest.raises(ValueError, match=rf"evaluation_metadata.jsonl:2: {message}"):
        read_metadata(path)


def test_metadata_read_as_geneval_numbers_it(tmp_path):
    path = _metadata(tmp_path)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines shift nothing
    assert read_metadata(path) == LINES


def test_a_bad_line_stops_the_command_in_one_line(tmp_path, tokenizer_path, autoencoder_ckpt, capsys):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n" + '{"prompt": "a cat"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
              "--config", str(CONFIGS / "geneval_predict.yaml"), "--model.init_args.tokenizer", tokenizer_path,
              "--model.init_args.autoencoder", autoencoder_ckpt, "--model.init_args.preset", "debug",
              "--data.init_args.metadata", str(path), "--data.init_args.output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"transfusion predict: error: {path}:2: missing tag, include (a GenEval line has prompt, tag, "
                       "include and optionally exclude)")
    assert not (tmp_path / "out").exists()


def test_the_writer_refuses_other_prompts():
    from types import SimpleNamespace

    from transfusion.data.modules.embedded import TransfusionDataModule
    from transfusion.lightning.callbacks import GenEvalWriter

    with pytest.raises(ValueError, match="GenEvalWriter writes GenEval prompts: set data.class_path to "
                                         "transfusion.data.modules.geneval.GenEvalPrompts"):
        GenEvalWriter().on_predict_start(SimpleNamespace(datamodule=TransfusionDataModule()), None)
