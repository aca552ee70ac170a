"""A sweep's outputs: Table 3 (paper format), the ablation table, scaling plots, raw CSV and JSON.

``rows`` are the sweep's evaluations, one dict each: run, model, size, budget, ablation, setting, seed (None
without ``seeds``), step, params, tokens, flops (6ND), flops_exact (with attention) and the metrics (``fid``,
``clip_score@<clip>``, ``cider_d``, ``ppl``, ``follow@shapes`` and its per-attribute rates). With several seeds,
Table 3 and the ablations give the mean +- standard deviation over seeds, and parity ratios per seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from transfusion.atomic import atomic_write, write_text
from transfusion.sweep.parity import metric_info, parity_flops, parity_ratio_text

COLUMNS = ["run", "model", "size", "budget", "ablation", "setting", "seed", "step", "params", "tokens", "flops",
           "flops_exact"]


def metric_keys(rows: list[dict], parts: bool = False) -> list[str]:
    """Metric columns present in ``rows``, in the paper's order (text first), then prompt following; ``parts``:
    also the per-attribute rates (``follow@shapes/colour``, ...), which the tables and plots leave out."""
    order = ["ppl", "cider_d", "fid", "clip_score", "follow", "captions", "geneval"]
    keys = {k for r in rows for k in r if k not in COLUMNS and (parts or "/" not in k)}
    return sorted(keys, key=lambda k: (order.index(k.split("@")[0]) if k.split("@")[0] in order else 99, k))


def main_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["ablation"]]


def seeds(rows: list[dict]) -> list:
    """The seeds of ``rows`` ([None] for a sweep without ``seeds``)."""
    return sorted({r.get("seed") for r in rows}, key=lambda s: (s is not None, s or 0))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def final(rows: list[dict], model: str, size: str, budget: int) -> dict:
    """The last evaluation of a main run."""
    mine = [r for r in main_rows(rows) if (r["model"], r["size"], r["budget"]) == (model, size, budget)]
    if not mine:
        raise ValueError(f"no evaluations of {model} size {size} budget {budget}")
    return max(mine, key=lambda r: r["step"])


def variants(rows: list[dict]) -> list[str]:
    """Transfusion variants in the main runs (e.g. ``transfusion_mot``), in order of appearance."""
    return list(dict.fromkeys(r["model"] for r in main_rows(rows) if r["model"] not in ("transfusion", "chameleon")))


def table3(rows: list[dict], reference_size: str, parity_curve: str = "all_sizes") -> dict:
    """Transfusion vs Chameleon at the reference size's largest budget, and the parity FLOP ratio per metric; each
    variant's values and parity ratios against Chameleon and against Transfusion. Several seeds: each seed's table
    (its own runs and curves), then their mean +- standard deviation (``merge_seeds``)."""
    main = main_rows(rows)
    per_seed = {s: _table3_one([r for r in main if r.get("seed") == s], reference_size, parity_curve)
                for s in seeds(main)}
    if len(per_seed) == 1:
        return next(iter(per_seed.values()))
    return merge_seeds(per_seed)


def _table3_one(rows: list[dict], reference_size: str, parity_curve: str) -> dict:
    """``table3`` of one seed's rows."""
    budget = max(r["budget"] for r in main_rows(rows) if r["size"] == reference_size)
    tf, ch = final(rows, "transfusion", reference_size, budget), final(rows, "chameleon", reference_size, budget)

    def curve(model):
        return [r for r in main_rows(rows) if r["model"] == model
                and (parity_curve == "all_sizes" or r["size"] == reference_size)]

    def parity(model, key, target, higher):
        points = curve(model)
        return parity_flops([r["flops"] for r in points], [r.get(key, math.nan) for r in points], target, higher)

    others = {v: final(rows, v, reference_size, budget) for v in variants(rows)}
    lines = []
    for key in metric_keys(rows):
        name, higher = metric_info(key)
        if not (_finite(tf.get(key)) and _finite(ch.get(key))):
            continue
        p = parity("transfusion", key, ch[key], higher)
        line = {"metric": key, "name": name, "higher_is_better": higher, "transfusion": tf[key],
                "chameleon": ch[key], "parity_status": p.status, "parity_flops": p.flops,
                "parity_ratio": None if p.flops is None else p.flops / ch["flops"],
                "parity_text": parity_ratio_text(p, ch["flops"]), "best_transfusion": p.best,
                "best_transfusion_flops": p.best_flops, "variants": {}}
        for v, last in others.items():
            if not _finite(last.get(key)):
                continue
            vs_ch, vs_tf = parity(v, key, ch[key], higher), parity(v, key, tf[key], higher)
            line["variants"][v] = {
                "value": last[key], "parity_vs_chameleon": parity_ratio_text(vs_ch, ch["flops"]),
                "parity_ratio_vs_chameleon": None if vs_ch.flops is None else vs_ch.flops / ch["flops"],
                "parity_vs_transfusion": parity_ratio_text(vs_tf, tf["flops"], "Transfusion"),
                "parity_ratio_vs_transfusion": None if vs_tf.flops is None else vs_tf.flops / tf["flops"]}
        lines.append(line)
    return {"size": reference_size, "budget": budget, "parity_curve": parity_curve,
            "variants": {v: {"params": last["params"], "tokens": last["tokens"], "flops": last["flops"]}
                         for v, last in others.items()},
            "transfusion_flops": tf["flops"], "chameleon_flops": ch["flops"], "transfusion_params": tf["params"],
            "chameleon_params": ch["params"], "transfusion_tokens": tf["tokens"], "chameleon_tokens": ch["tokens"],
            "rows": lines}


def merge_seeds(per_seed: dict) -> dict:
    """One Table 3 from per-seed tables: values as mean (``*_std``: standard deviation) over the seeds; the parity
    ratio's mean and standard deviation when every seed has one, else each seed's cell. Metrics of every seed."""
    tables = list(per_seed.values())
    merged = {**tables[0], "seeds": list(per_seed), "per_seed": {str(s): t for s, t in per_seed.items()}, "rows": []}
    common = set.intersection(*({r["metric"] for r in t["rows"]} for t in tables))
    for first in (r for r in tables[0]["rows"] if r["metric"] in common):
        lines = [next(r for r in t["rows"] if r["metric"] == first["metric"]) for t in tables]
        line = {k: first[k] for k in ("metric", "name", "higher_is_better")}
        for model in ("transfusion", "chameleon"):
            line[model], line[f"{model}_std"] = mean_std([r[model] for r in lines])
        line.update(_merged_parity([r["parity_ratio"] for r in lines], [r["parity_text"] for r in lines],
                                   per_seed, "parity"))
        line["parity_statuses"] = [r["parity_status"] for r in lines]
        line["variants"] = {}
        for v in set.intersection(*(set(r["variants"]) for r in lines)):
            cells = [r["variants"][v] for r in lines]
            value, std = mean_std([c["value"] for c in cells])
            line["variants"][v] = {"value": value, "value_std": std}
            for against in ("chameleon", "transfusion"):
                merged_cell = _merged_parity([c[f"parity_ratio_vs_{against}"] for c in cells],
                                             [c[f"parity_vs_{against}"] for c in cells], per_seed, "parity")
                line["variants"][v][f"parity_vs_{against}"] = merged_cell["parity_text"]
                line["variants"][v][f"parity_ratio_vs_{against}"] = merged_cell["parity_ratio"]
        merged["rows"].append(line)
    return merged


def _merged_parity(ratios: list, texts: list[str], per_seed: dict, name: str) -> dict:
    """Mean +- standard deviation of per-seed parity ratios when all are interpolated numbers; otherwise None and
    each seed's cell ("seed 0: 0.41; seed 1: not reached (...)")."""
    if all(r is not None for r in ratios) and not any(t.startswith("<=") for t in texts):
        mean, std = mean_std(ratios)
        return {f"{name}_ratio": mean, f"{name}_ratio_std": std, f"{name}_ratios": ratios,
                f"{name}_text": f"{mean:.3g} ± {std:.2g}"}
    return {f"{name}_ratio": None, f"{name}_ratio_std": None, f"{name}_ratios": ratios,
            f"{name}_text": "; ".join(f"seed {s}: {t}" for s, t in zip(per_seed, texts))}


def _cell(row: dict, key: str) -> str:
    """``12.3`` or, over seeds, ``12.3 ± 0.45``."""
    std = row.get(f"{key}_std")
    return f"{row[key]:.4g}" if std is None else f"{row[key]:.4g} ± {std:.2g}"


def table3_markdown(t: dict) -> str:
    curve = "all Transfusion sizes and budgets" if t["parity_curve"] == "all_sizes" else f"Transfusion {t['size']}"
    out = [f"Size {t['size']}, {t['budget']} steps: Transfusion {t['transfusion_params']:,} parameters, "
           f"{t['transfusion_tokens']:,} tokens, {t['transfusion_flops']:.3e} FLOPs; Chameleon "
           f"{t['chameleon_params']:,} parameters, {t['chameleon_tokens']:,} tokens, {t['chameleon_flops']:.3e} FLOPs "
           f"(6ND). Parity FLOP ratio = FLOPs at which Transfusion ({curve}, running best, interpolated in "
           f"log FLOPs) first reaches Chameleon's final value / Chameleon's FLOPs; `<=`: already reached at the "
           "first evaluation."]
    if t.get("seeds"):
        out[0] += (f" Seeds {', '.join(map(str, t['seeds']))}: each value is the mean ± standard deviation over the "
                   "seeds (the parameters, tokens and FLOPs above are the first seed's); the parity ratio is computed "
                   "per seed, from that seed's Transfusion curve and Chameleon value.")
    lrs = t.get("learning_rates")
    if lrs:
        names = ", ".join(metric_info(m)[0] for m in lrs["metrics"])
        out[0] += (f" Learning rates: each model's best mean rank of final {names} on the same grid "
                   f"({', '.join(f'{v:g}' for v in lrs['values'])}; size {lrs['size']}, {lrs['budget']} steps; "
                   "`ablations.md`): " + ", ".join(f"{m} {lr:g}" for m, lr in lrs["chosen"].items()) + ".")
    names = list(t.get("variants", {}))
    for v in names:
        out[0] += (f" {v}: {t['variants'][v]['params']:,} parameters a position uses, {t['variants'][v]['tokens']:,} "
                   f"tokens, {t['variants'][v]['flops']:.3e} FLOPs, at Transfusion's learning rate; its parity ratios "
                   "are against Chameleon's and against Transfusion's final values.")
    head = "| metric | better | Transfusion | Chameleon | parity FLOP ratio |"
    for v in names:
        head += f" {v} | {v} vs Chameleon | {v} vs Transfusion |"
    out += ["", head, "|---|---|---|---|---|" + "---|---|---|" * len(names)]
    for r in t["rows"]:
        line = (f"| {r['name']} | {'higher' if r['higher_is_better'] else 'lower'} | {_cell(r, 'transfusion')} | "
                f"{_cell(r, 'chameleon')} | {r['parity_text']} |")
        for v in names:
            cell = r.get("variants", {}).get(v)
            line += (f" {_cell(cell, 'value')} | {cell['parity_vs_chameleon']} | {cell['parity_vs_transfusion']} |"
                     if cell else " - | - | - |")
        out.append(line)
    return "\n".join(out) + "\n"


def ablation_tables(rows: list[dict]) -> list[dict]:
    """One table per ablation: each setting's final metrics (over seeds: the mean, ``std`` and ``seeds``)."""
    tables = {}
    for r in rows:
        if r["ablation"]:
            finals = tables.setdefault(r["ablation"], {}).setdefault(r["setting"], {})
            seed = r.get("seed")
            if seed not in finals or r["step"] > finals[seed]["step"]:
                finals[seed] = r
    keys = metric_keys(rows)
    out = []
    for name, settings in tables.items():
        first = next(iter(next(iter(settings.values())).values()))
        table = {"ablation": name, "model": first["model"], "size": first["size"], "budget": first["budget"],
                 "settings": []}
        for setting, finals in settings.items():
            if len(finals) == 1:
                table["settings"].append({"setting": setting, **{m: next(iter(finals.values())).get(m) for m in keys}})
                continue
            values = {m: [f[m] for f in finals.values() if _finite(f.get(m))] for m in keys}
            stats = {m: mean_std(v) for m, v in values.items() if len(v) == len(finals)}
            table["settings"].append({"setting": setting, "seeds": list(finals),
                                      **{m: stats[m][0] if m in stats else None for m in keys},
                                      "std": {m: stats[m][1] for m in stats}})
        out.append(table)
    return out


def ablations_markdown(tables: list[dict], keys: list[str]) -> str:
    if not tables:
        return ""
    names = [f"{metric_info(k)[0]} {'↑' if metric_info(k)[1] else '↓'}" for k in keys]
    out = ["| ablation | model | size | steps | setting | " + " | ".join(names) + " |",
           "|---|---|---|---|---|" + "---|" * len(keys)]
    for t in tables:
        for s in t["settings"]:
            cells = [("-" if not _finite(s.get(k)) else f"{s[k]:.4g}" if k not in s.get("std", {})
                      else f"{s[k]:.4g} ± {s['std'][k]:.2g}") for k in keys]
            out.append(f"| {t['ablation']} | {t['model']} | {t['size']} | {t['budget']} | {s['setting']} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_scaling(rows: list[dict], path: Path) -> None:
    """Metric vs training FLOPs (log x), one panel per metric, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metric_keys(rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    runs = _curves(rows)
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    markers = "os^Dvp*"
    palette = {"transfusion": "C0", "chameleon": "C3", **{v: f"C{i + 4}" for i, v in enumerate(variants(rows))}}
    for ax, key in zip(axes[0], keys):
        name, higher = metric_info(key)
        for (model, size, budget, seed), points in runs.items():
            points = sorted((f, r[key]) for f, r in points if _finite(r.get(key)))
            if points:
                ax.plot(*zip(*points), color=palette[model],
                        marker=markers[sizes.index(size) % len(markers)], markersize=4, linewidth=1,
                        label=_label(model, size, budget, seed))
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (6ND)")
        ax.set_title(f"{name} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "sweep plot") as f:
        fig.savefig(f, format=Path(path).suffix[1:], dpi=110)
    plt.close(fig)


def plot_parts(rows: list[dict], metric: str, path: Path) -> bool:
    """One panel per part of ``metric`` (``geneval@scenes/counting``, ...): value vs training FLOPs, one line per main
    run; False (nothing written) when no row has parts of it."""
    parts = [k for k in metric_keys(rows, parts=True) if k.startswith(metric + "/")]
    if not parts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(3.4 * len(parts), 3.2), squeeze=False, sharey=True)
    runs = _curves(rows)
    for ax, key in zip(axes[0], parts):
        for i, (run, points) in enumerate(runs.items()):
            points = sorted((f, r[key]) for f, r in points if _finite(r.get(key)))
            if points:
                ax.plot(*zip(*points), marker="o", markersize=4, linewidth=1, color=f"C{i}", label=_label(*run))
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (6ND)")
        ax.set_title(key.partition("/")[2].replace("_", " "), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(metric_info(metric)[0])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict], output: Path, reference_size: str, parity_curve: str = "all_sizes",
                 config: dict | None = None, learning_rates: dict | None = None) -> dict:
    """Write results.csv, results.json, table3.md, ablations.md and scaling.png (and ``geneval_scenes_tasks.png``
    with GenEval-style scores) under ``output``;
    ``learning_rates``: how each model's rate was chosen on the sweep's grid (``Sweep.lr_choice``), if it has one."""
    output.mkdir(parents=True, exist_ok=True)
    keys = metric_keys(rows)
    table = io.StringIO()  # every metric, per-attribute rates too
    writer = csv.DictWriter(table, fieldnames=COLUMNS + metric_keys(rows, parts=True), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["ablation"], r["model"], r["size"], r["budget"],
                                                  -1 if r.get("seed") is None else r["seed"], r["step"])))
    # each file whole or not at all: a full disk leaves the previous one (transfusion.atomic)
    write_text(output / "results.csv", table.getvalue(), "sweep results")
    t3 = table3(rows, reference_size, parity_curve)
    t3["learning_rates"] = dict(learning_rates or {})
    abl = ablation_tables(rows)
    write_text(output / "table3.md", table3_markdown(t3), "sweep results")
    write_text(output / "ablations.md", ablations_markdown(abl, keys), "sweep results")
    plot_scaling(rows, output / "scaling.png")
    for key in metric_keys(rows):  # per-task curves of the GenEval-style score
        if key.startswith("geneval@"):
            plot_parts(rows, key, output / f"{key.replace('@', '_')}_tasks.png")
    result = {"config": config, "table3": t3, "ablations": abl, "evaluations": rows}
    write_text(output / "results.json", json.dumps(result, indent=2) + "\n", "sweep results")
    return result


def _curves(rows: list[dict]) -> dict:
    """(model, size, budget, seed) -> [(flops, row)] of the main runs, in a stable order."""
    curves = {}
    for r in main_rows(rows):
        curves.setdefault((r["model"], r["size"], r["budget"], r.get("seed")), []).append((r["flops"], r))
    return dict(sorted(curves.items(), key=lambda kv: (kv[0][:3], -1 if kv[0][3] is None else kv[0][3])))


def _label(model: str, size: str, budget: int, seed) -> str:
    return f"{model} {size} ({budget} steps)" + ("" if seed is None else f" seed {seed}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
