"""The evaluation report: the metrics of one evaluation and what they were measured on (the model and its weights,
samples, sampling settings, training so far), written as ``evaluation.json`` and ``evaluation.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path


def evaluation_report(metrics: dict, model: dict, *, num_samples: int, ppl_tokens: int | None,
                      fid_weights: str | None, clip_model: str | None, training_seconds: float | None,
                      world_size: int) -> dict:
    """The report of ``metrics``; ``model`` is what the module says of itself (``GenerativeModule.report_fields``:
    ``model``, ``weights``, ``tokenizer``, ``sampling`` (its ``sampling_summary``), ``flops``, ``training_steps``)."""
    sampling, flops = model["sampling"], model["flops"]
    return {
        "model": model["model"],
        "weights": model["weights"],  # "raw" or an EMA's (transfusion.lightning.ema)
        "metrics": metrics,
        "num_samples": num_samples,
        "ppl_tokens": ppl_tokens,
        "tokenizer": model["tokenizer"],
        "sampler": {k: v for k, v in sampling.items() if k != "cfg_scale"},
        "cfg_scale": sampling["cfg_scale"],
        "fid_weights": fid_weights,
        "clip_model": clip_model,
        "training_flops": flops.get("flops"),  # 6ND (transfusion.flops)
        "training_flops_exact": flops.get("exact_flops"),  # + attention
        "training_tokens": flops.get("tokens"),
        "training_steps": model["training_steps"],
        "training_seconds": training_seconds,  # wall time of fit so far, evaluations excluded
        "world_size": world_size,
    }


def write_report(report: dict, folder: str | Path) -> Path:
    """``evaluation.json`` and ``evaluation.md`` (``markdown_table``) in ``folder``; returns the JSON's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "evaluation.md").write_text(markdown_table(report))
    return folder / "evaluation.json"


def markdown_table(report: dict) -> str:
    """The report as a two-column Markdown table: each metric (4 decimals), then the settings behind them."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v))
            for k, v in report["metrics"].items()]
    s = report["sampler"]
    image_sampling = ", ".join(f"{k} {v}" for k, v in s.items() if k != "caption_decoding")
    rows += [("model", report["model"]), ("weights", report.get("weights", "raw")),
             ("samples", str(report["num_samples"])),
             ("perplexity tokens", str(report["ppl_tokens"])), ("tokenizer", report["tokenizer"]),
             ("image sampling", image_sampling), ("captions", s["caption_decoding"]), ("CFG scale", str(report["cfg_scale"])),
             ("training FLOPs (6ND)", _flops(report["training_flops"])),
             ("training FLOPs (with attention)", _flops(report["training_flops_exact"])),
             ("training steps", str(report["training_steps"])), ("processes", str(report["world_size"]))]
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _flops(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.3e}"
