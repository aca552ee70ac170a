"""The committed micro sweep (``data/sweeps/micro``): this code's report, run on the sweep's recorded evaluations,
writes its committed Table 3 and ablation table byte for byte (values, parity FLOP ratios, the text above)."""

from __future__ import annotations

import json
from pathlib import Path

from transfusion.sweep.report import ablation_tables, ablations_markdown, metric_keys, table3, table3_markdown

MICRO = Path(__file__).resolve().parents[1] / "data" / "sweeps" / "micro"


def test_committed_tables_are_reproduced_from_their_evaluations():
    result = json.loads((MICRO / "results.json").read_text())
    rows, committed = result["evaluations"], result["table3"]
    t3 = table3(rows, committed["size"], committed["parity_curve"])
    t3["learning_rates"] = committed["learning_rates"]  # the grid's choice, made by the sweep before the main runs
    assert t3 == committed
    assert table3_markdown(t3) == (MICRO / "table3.md").read_text()
    assert ablation_tables(rows) == result["ablations"]
    assert ablations_markdown(result["ablations"], metric_keys(rows)) == (MICRO / "ablations.md").read_text()
