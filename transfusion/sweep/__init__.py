"""Compute-matched comparison of Transfusion and Chameleon (paper Table 3) and ablations, from one config.

``transfusion sweep --config lightning_configs/sweep_micro.yaml``: ``runner.Sweep`` trains and evaluates
the runs through LightningCLI, ``report`` writes Table 3, the ablation table, scaling plots, CSV and JSON,
``parity`` computes the parity FLOP ratio.
"""

from __future__ import annotations

import json

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # runner imports lightning


def parse_sweep(argv: list[str]):
    """(``Sweep``, its configuration as a dict) from the ``transfusion sweep`` command line."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from transfusion.sweep.runner import Sweep

    parser = ArgumentParser(prog="transfusion sweep", description="Train Transfusion and Chameleon at several sizes "
                            "and budgets, evaluate along the way, and write Table 3, plots, CSV and JSON.")
    parser.add_argument("--config", action=ActionConfigFile, help="a sweep YAML (lightning_configs/sweep_*.yaml)")
    parser.add_class_arguments(Sweep, as_group=False)
    cfg = parser.parse_args(argv)
    config = json.loads(parser.dump(cfg, format="json"))
    config.pop("config", None)
    init = vars(parser.instantiate_classes(cfg))
    init.pop("config", None)
    return Sweep(**init), config


def sweep_main(argv: list[str]) -> dict:
    from transfusion.sweep.report import ablations_markdown, metric_keys, write_report

    sweep, config = parse_sweep(argv)
    rows = sweep.run()
    report = write_report(rows, sweep.output, sweep.reference_size, sweep.parity_curve, config=config,
                          learning_rates=sweep.lr_choice())
    print((sweep.output / "table3.md").read_text())
    if report["ablations"]:
        print(ablations_markdown(report["ablations"], metric_keys(rows)))
    print(f"wrote {sweep.output}/results.csv, results.json, table3.md, ablations.md, scaling.png")
    return report
