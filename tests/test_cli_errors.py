"""The command's error surface: a user error ends in one line naming the file or option and exit status 2;
``--debug`` / ``TRANSFUSION_DEBUG=1`` show its traceback; an internal error keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfusion.cli import main
from transfusion.errors import UserError, one_line, user_error

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lightning_configs"


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"transfusion {argv[0]}: error: "), err
    return err


def _tokenizer_args(tmp_path: Path) -> list[str]:
    (tmp_path / "text.txt").write_text("abc abc\nabd\n")
    return ["tokenizer", "--output", str(tmp_path / "t.model"), "--vocab_size", "100",
            "--text_path", str(tmp_path / "text.txt"), "--captions_from"]


def test_tokenizer_vocab_size_too_small(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRANSFUSION_DEBUG", raising=False)
    err = _one_line_error(capsys, _tokenizer_args(tmp_path))
    # 5 characters (a, b, c, d, '▁') + 256 byte pieces + unk, bos, eos, pad, <boi>, <eoi>
    assert "vocab_size 100 is smaller than the 267 pieces the text needs" in err and "use at least 267" in err, err
    with pytest.raises(UserError, match="vocab_size 100"):  # --debug (anywhere): the exception and its traceback
        main([*_tokenizer_args(tmp_path), "--debug"])
    monkeypatch.setenv("TRANSFUSION_DEBUG", "1")
    with pytest.raises(UserError, match="vocab_size 100"):
        main(_tokenizer_args(tmp_path))


def test_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    from transfusion.data.tokenizer import Tokenizer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.delenv("TRANSFUSION_DEBUG", raising=False)
    monkeypatch.setattr(Tokenizer, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(_tokenizer_args(tmp_path))


def _truncated_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, path)
    path.write_bytes(path.read_bytes()[:2000])  # an interrupted copy
    return path


def test_truncated_checkpoint_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRANSFUSION_DEBUG", raising=False)
    ckpt = _truncated_checkpoint(tmp_path)
    err = _one_line_error(capsys, ["predict", "--config", str(CONFIGS / "transfusion_embedded.yaml"), "--config",
                                   str(CONFIGS / "transfusion_embedded_predict.yaml"), "--ckpt_path", str(ckpt)])
    assert f"checkpoint {ckpt} cannot be read (truncated or not a torch checkpoint: a zip archive cut short" in err, err
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes\.ckpt cannot be read .*not a zip archive"):
        from transfusion.lightning.checkpoint import AtomicCheckpointIO

        AtomicCheckpointIO().load_checkpoint(tmp_path / "notes.ckpt")  # Trainer.fit(ckpt_path=...) from Python


@pytest.mark.slow
def test_debug_flag_on_the_command_line_shows_the_traceback(tmp_path):
    ckpt = _truncated_checkpoint(tmp_path)
    args = [sys.executable, "-m", "transfusion.cli", "validate", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
            "--ckpt_path", str(ckpt), "--debug"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRANSFUSION_DEBUG", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr  # --debug was not passed on to parse
    assert result.stderr.strip().splitlines()[-1].startswith("transfusion.errors.UserError: checkpoint "), result.stderr


def test_bad_prompt_file(tmp_path, capsys, monkeypatch, tokenizer_path, autoencoder_ckpt):
    monkeypatch.delenv("TRANSFUSION_DEBUG", raising=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    err = _one_line_error(capsys, [
        "predict", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
        "--config", str(CONFIGS / "transfusion_embedded_predict.yaml"),
        "--model.init_args.tokenizer", tokenizer_path, "--model.init_args.autoencoder", autoencoder_ckpt,
        "--model.init_args.preset", "debug", "--data.init_args.num_workers", "0", "--data.init_args.prompts", str(bad),
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.output_dir", str(tmp_path / "out"),
        "--trainer.default_root_dir", str(tmp_path)])
    assert f"{bad}:1: not valid JSON" in err, err


class _Bad(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        from transfusion.data.sources.pairs import BadDataError

        raise BadDataError("x.png: cannot decode image")


def test_wrapped_errors_are_unwrapped():
    # a DataLoader worker re-raises the error with the worker's traceback in its message
    with pytest.raises(Exception) as info:
        next(iter(torch.utils.data.DataLoader(_Bad(), num_workers=1)))
    assert user_error(info.value) is info.value and one_line(info.value) == "x.png: cannot decode image"
    # a wrapper that names its cause (raise ... from): the cause is reported; an error met while handling another is not
    try:
        try:
            raise UserError("bad option")
        except UserError as cause:
            raise RuntimeError("hook failed") from cause
    except RuntimeError as wrapped:
        assert str(user_error(wrapped)) == "bad option"
    try:
        try:
            raise FileNotFoundError("x")
        except FileNotFoundError:
            raise RuntimeError("a bug")
    except RuntimeError as internal:
        assert user_error(internal) is None
