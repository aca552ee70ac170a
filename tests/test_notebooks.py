"""The notebooks run top to bottom: an API change that breaks one fails here."""
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from transfusion.cli import cli_main  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, cwd: Path) -> list[str]:
    """Run ``notebooks/<name>`` in ``cwd``; the text each code cell printed, one string a cell."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()  # raises on a failing cell
    return ["".join(o.get("text", "") for o in cell.outputs) for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
def test_comparison_notebook_reads_the_committed_sweep():
    printed = "\n".join(_execute("comparison.ipynb", NOTEBOOKS))
    assert "| metric | better | Transfusion | Chameleon | parity FLOP ratio |" in printed
    assert "prompt following (shapes)" in printed and "| intra-image attention |" in printed
    assert "| objective |" in printed and "transfusion_mot vs Transfusion" in printed


@pytest.mark.slow
def test_generate_notebook_draws_and_captions_with_a_quickstart_checkpoint(tmp_path, tokenizer_path, autoencoder_ckpt):
    from test_cli import _fit_args

    # not tmp_path / "transfusion": the kernel runs in tmp_path, where that folder would shadow the package
    cli = cli_main(["fit", *_fit_args(tmp_path / "run", tokenizer_path, autoencoder_ckpt, steps=2)])
    report = tmp_path / "outputs" / "quickstart" / "report.json"  # where the notebook finds the quickstart's run
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"transfusion_checkpoint": cli.trainer.checkpoint_callback.last_model_path}))
    printed = _execute("generate.ipynb", tmp_path)
    assert "a large red circle in the top left" in printed[1]  # a caption -> image per caption
    assert printed[2].count("reference:") == 4 and printed[2].count("| generated:") == 4
    assert "before:" in printed[3] and "move it to the top right" in printed[3]  # the editing cell
