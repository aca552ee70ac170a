"""The GenEval-style score in a sweep's outputs: a Table 3 row with its parity FLOP ratio, per-task CSV columns,
per-task curves."""

import csv

import pytest

from transfusion.data.embedded.scenes import TASKS
from transfusion.sweep.parity import metric_info
from transfusion.sweep.report import write_report


def _row(model, step, flops, overall, per_task):
    return {"run": f"{model}-S-4", "model": model, "size": "S", "budget": 4, "ablation": "", "setting": "",
            "step": step, "params": 10, "tokens": 100 * step, "flops": flops, "flops_exact": flops, "ppl": 50.0,
            "geneval@scenes": overall, **{f"geneval@scenes/{t}": per_task for t in TASKS}}


@pytest.mark.slow  # matplotlib: ~6 s on a loaded 2-core machine
def test_sweep_report_has_a_geneval_row_per_task_columns_and_curves(tmp_path):
    rows = [_row("transfusion", 2, 1e9, 0.1, 0.1), _row("transfusion", 4, 2e9, 0.5, 0.5),
            _row("chameleon", 2, 1e9, 0.05, 0.05), _row("chameleon", 4, 2e9, 0.3, 0.3)]
    result = write_report(rows, tmp_path, "S")
    line = next(r for r in result["table3"]["rows"] if r["metric"] == "geneval@scenes")
    assert (line["name"], line["higher_is_better"]) == ("GenEval (scenes)", True)
    # Transfusion reaches Chameleon's 0.3 half-way from 0.1 to 0.5: at sqrt(1e9 * 2e9) in log FLOPs
    assert line["parity_ratio"] == pytest.approx(2 ** 0.5 * 1e9 / 2e9)
    assert "| GenEval (scenes) | higher | 0.5 | 0.3 | 0.707 |" in (tmp_path / "table3.md").read_text()
    with open(tmp_path / "results.csv") as f:
        header = next(csv.reader(f))
    assert {f"geneval@scenes/{t}" for t in TASKS} <= set(header)
    assert (tmp_path / "geneval_scenes_tasks.png").stat().st_size > 1000
    assert metric_info("geneval@scenes/counting") == ("GenEval: counting (scenes)", True)
