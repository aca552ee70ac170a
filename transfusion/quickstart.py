"""``transfusion quickstart``: the whole embedded pipeline through the public CLI, in one output folder.

1. train the tokenizer on the embedded text;                  -> tokenizer.model
2. ``transfusion fit`` the autoencoder (autoencoder_embedded);  -> autoencoder/
3. ``transfusion fit`` Transfusion (transfusion_embedded);      -> transfusion/
   with ``--streamed``: first ``transfusion shards`` writes its training data as shard sets -> shards/train,
   shards/validation; then it trains from them streamed (transfusion_streamed_embedded) -> transfusion/
4. ``transfusion predict``: images from held-out captions and captions from held-out images -> samples/
5. a report: losses, whether images follow their captions and captions their images -> report.md/.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
import yaml

from transfusion.cli import cli_main, main, tokenizer_main
from transfusion.schedules import schedule_class

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
# --streamed: the share of text rows that gives transfusion_embedded.yaml's text_ratio (0.25 text tokens per
# image-caption token). Text rows are full; pair rows are f = 0.88 full (measured over 2000 rows), so the text
# row share is p = r f / (1 + r f) = 0.25 x 0.88 / 1.22 = 0.18 (TransfusionRows._p_text_for: 0.181 from 32 rows).
TEXT_ROW_SHARE = 0.18
SAMPLES_PER_SHARD = 500  # 20 training shards: a streamed pass visits them in a new order each pass


def _fit(config: str, root: Path, overrides: list[str]):
    cli = cli_main(["fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(root),
                    "--trainer.logger.init_args.save_dir", str(root), *overrides])
    return cli.trainer


def _steps_overrides(steps: int | None) -> list[str]:
    """Train for ``steps`` (None: the YAML's), validating and checkpointing at the end, logging 20 times."""
    if steps is None:
        return []
    return ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.log_every_n_steps", str(max(1, steps // 20))]


def _curve_callback(config: str, steps: int | None, examples: int, output: Path) -> list[str]:
    """An ``Evaluation`` of prompt following 4 times during training (DDIM, 50 steps: cheap; Euler for a flow
    model), for the curve."""
    yaml_config = yaml.safe_load((CONFIGS / config).read_text())
    if steps is None:
        steps = yaml_config["trainer"]["max_steps"]
    objective = yaml_config.get("model", {}).get("init_args", {}).get("objective", "ddpm")
    evaluation = {"num_samples": examples, "batch_size": 64, "metrics": ["follow"],
                  "every_n_train_steps": max(1, math.ceil(steps / 4)), "on_test": False, "max_caption_tokens": 16,
                  "sampling": {"sampler": schedule_class(objective).FEW_STEP_SAMPLER, "num_steps": 50}, "output_dir": str(output)}
    callback = {"class_path": "transfusion.lightning.evaluation.Evaluation", "init_args": evaluation}
    return [f"--trainer.callbacks+={json.dumps(callback)}"]


def _write_shards(output: Path, model_args: list[str], seed: int) -> dict:
    """``transfusion shards``: the in-memory config's training and validation shapes (pixels, shuffled)."""
    from transfusion.data.shards.stream import open_shard_set

    main(["shards", "--config", str(CONFIGS / "transfusion_embedded.yaml"), *model_args, "--output", str(output),
          "--shuffle", "--seed", str(seed), "--samples_per_shard", str(SAMPLES_PER_SHARD), "--overwrite"])
    sets = {split: open_shard_set(str(output / split)) for split in ("train", "validation")}
    return {"shards": str(output), "format": "webdataset", "image": "pixels", "shuffle_seed": seed,
            "text_row_share": TEXT_ROW_SHARE,
            **{f"{split}_records": sum(s.samples) for split, s in sets.items()},
            **{f"{split}_shards": len(s.shards) for split, s in sets.items()}}


def _streamed_args(data: dict) -> list[str]:
    """Overrides of transfusion_streamed_embedded.yaml: the written sets, the in-memory run's text share."""
    train = [{"url": str(Path(data["shards"]) / "train"), "weight": round(1.0 - TEXT_ROW_SHARE, 6)}]
    return ["--data.init_args.sources", json.dumps(train), "--data.init_args.val",
            str(Path(data["shards"]) / "validation"), "--data.init_args.text_weight", str(TEXT_ROW_SHARE)]


def _metrics(trainer) -> list[dict]:
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")] or [(-1, float("nan"))]


def _follow(samples: Path) -> dict:
    """How the predict outputs follow their prompts: pictures read back from their pixels, captions parsed."""
    from PIL import Image

    from transfusion.images import to_tensor
    from transfusion.evaluation.follow import ATTRIBUTES, FollowScore, caption_scores, confusion_markdown

    records = [json.loads(line) for line in (samples / "generations.jsonl").read_text().splitlines()]
    images = [r for r in records if r["kind"] == "text-to-image"]
    captions = [r for r in records if r["kind"] == "image-to-text"]
    score = FollowScore()
    if images:
        score.update(torch.stack([to_tensor(Image.open(samples / r["images"][0])) for r in images]),
                     [r["reference"] for r in images])
    return {"images": len(images), "image_rates": score.compute(),
            "confusion": {a: confusion_markdown(score, a) for a in ATTRIBUTES},
            "captions": len(captions),
            "caption_rates": caption_scores([c["text"] for c in captions], [c["reference"] for c in captions]),
            "examples": [{"reference": c["reference"], "generated": c["text"]} for c in captions[:8]]}


def _curve(trainer) -> list[dict]:
    """Prompt following at each evaluation during training: [{step, minutes, rates...}]."""
    from transfusion.lightning.evaluation import Evaluation

    evaluation = next((c for c in trainer.callbacks if isinstance(c, Evaluation)), None)
    if evaluation is None:
        return []
    return [{"step": h["training_steps"], "minutes": h["training_seconds"] / 60, **h["metrics"]}
            for h in evaluation.history if h["stage"] == "eval" and "follow@shapes" in h["metrics"]]


def _plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    minutes = [c["minutes"] for c in curve]
    for key, label in (("follow@shapes/colour", "colour"), ("follow@shapes/position", "position"),
                       ("follow@shapes/size", "size"), ("follow@shapes/shape", "shape"),
                       ("follow@shapes/one_object", "one object"), ("follow@shapes", "all four"),
                       ("captions@shapes", "captions: all four")):
        ax.plot(minutes, [c[key] for c in curve], marker="o", label=label, linestyle="--" if "captions" in key else "-")
    ax.set_xlabel("training minutes (this machine, evaluations excluded)")
    ax.set_ylabel("share of held-out prompts")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfusion quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/quickstart", help="folder for everything the run writes")
    parser.add_argument("--autoencoder_steps", type=int, default=None, help="override the YAML's max_steps")
    parser.add_argument("--steps", type=int, default=None, help="Transfusion training steps (default: the YAML's)")
    parser.add_argument("--preset", default=None, help="transformer preset (default: the YAML's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the training draws")
    parser.add_argument("--predict_examples", type=int, default=64, help="held-out captions and images to generate for")
    parser.add_argument("--inference_steps", type=int, default=None, help="diffusion steps when generating")
    parser.add_argument("--curve_examples", type=int, default=64,
                        help="held-out captions for the prompt-following curve during training")
    parser.add_argument("--ema", type=float, nargs="+", default=None, metavar="DECAY",
                        help="keep an EMA of the weights per decay (transfusion.lightning.ema, with warm-up): the first "
                        "is used by the curve and the samples; the raw weights and every EMA are reported (default: off)")
    parser.add_argument("--accelerator", default=None,
                        help="Lightning accelerator of every stage, e.g. gpu (default: the YAMLs': cpu, then auto)")
    parser.add_argument("--streamed", action="store_true",
                        help="write the training data as shards (`transfusion shards`: pixels, shuffled) and train "
                             "Transfusion from them streamed (StreamingDataModule)")
    return parser


def _train_transfusion(args, out: Path, model_args: list[str], common: list[str], timings: dict):
    """Stage 3 (with ``--streamed``, the shards first): the trainer and the streamed data's summary (or None)."""
    start = time.time()
    config, data, data_args = "transfusion_embedded.yaml", None, []
    if args.streamed:
        data = _write_shards(out / "shards", model_args, args.seed)
        timings["shards_s"] = time.time() - start
        start = time.time()
        config, data_args = "transfusion_streamed_embedded.yaml", _streamed_args(data)
    curve = _curve_callback(config, args.steps, args.curve_examples, out / "transfusion" / "evaluation")
    emas = [f"--trainer.callbacks+={json.dumps({'class_path': 'transfusion.lightning.ema.EMA', 'init_args': {'decay': d}})}"
            for d in args.ema or []]
    overrides = model_args + common + _steps_overrides(args.steps) + emas + curve + data_args
    trainer = _fit(config, out / "transfusion", overrides)
    timings["transfusion_s"] = time.time() - start
    return trainer, data


def _predict(out: Path, model_args: list[str], device: list[str], ckpt: str, examples: int, weights: list[str]) -> None:
    """Stage 4: samples/ from the checkpoint's weights, or per ``weights`` (the first in samples/, the others in
    samples_<name>/)."""
    for name in weights or [None]:
        folder = out / ("samples" if name is None or name == weights[0] else f"samples_{name}")
        cli_main(["predict", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
                  "--config", str(CONFIGS / "transfusion_embedded_predict.yaml"), *model_args, *device,
                  *(["--model.init_args.eval_weights", name] if name else []),
                  "--trainer.callbacks.init_args.output_dir", str(folder),
                  "--data.init_args.predict_examples", str(examples), "--ckpt_path", ckpt])


def _report(args, out: Path, ae_trainer, tf_trainer, timings: dict, data: dict | None, weights: list[str]) -> dict:
    """Stage 5: report.json / report.md from the runs' logs and the samples."""
    ae_rows, tf_rows = _metrics(ae_trainer), _metrics(tf_trainer)
    curve = _curve(tf_trainer)
    if curve:
        _plot_curve(curve, out / "follow_curve.png")
    report = {
        "seed": args.seed, "autoencoder_checkpoint": ae_trainer.checkpoint_callback.last_model_path,
        "transfusion_checkpoint": tf_trainer.checkpoint_callback.last_model_path, "timings": timings,
        "autoencoder": {"first_train_rec_loss": _series(ae_rows, "train/rec_loss")[0],
                        "last_val_rec_loss": _series(ae_rows, "val/rec_loss")[-1]},
        "transfusion": {key: {"first": _series(tf_rows, key)[0], "last": _series(tf_rows, key)[-1]}
                        for key in ("train/loss", "train/lm_loss", "train/ddpm_loss",
                                    "val/loss", "val/lm_loss", "val/ddpm_loss", "val/lm_ppl")},
        "follow": _follow(out / "samples"),
        "curve": curve,
    }
    if data is not None:
        report["streamed"] = data
    if weights:  # --ema: which weights the samples above used, and prompt following by weights
        report["weights"] = weights[0]
        report["follow_by_weights"] = {name: _follow(out / ("samples" if i == 0 else f"samples_{name}"))
                                       for i, name in enumerate(weights)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report, out))
    print((out / "report.md").read_text())
    return report


def quickstart_main(argv: list[str]) -> dict:
    args = _parser().parse_args(argv)
    out = Path(args.output).resolve()  # absolute: checkpoints record the tokenizer and autoencoder paths
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    seed = ["--seed_everything", str(args.seed), "--model.init_args.noise_seed", str(args.seed)]
    device = [] if args.accelerator is None else ["--trainer.accelerator", args.accelerator]

    start = time.time()
    tokenizer_main(["--output", str(out / "tokenizer.model")])
    timings["tokenizer_s"] = time.time() - start

    start = time.time()
    ae_trainer = _fit("autoencoder_embedded.yaml", out / "autoencoder",
                      seed + device + _steps_overrides(args.autoencoder_steps))
    timings["autoencoder_s"] = time.time() - start

    model_args = ["--model.init_args.tokenizer", str(out / "tokenizer.model"),
                  "--model.init_args.autoencoder", ae_trainer.checkpoint_callback.last_model_path]
    if args.preset:
        model_args += ["--model.init_args.preset", args.preset]
    if args.inference_steps:
        model_args += ["--model.init_args.sampling.num_steps", str(args.inference_steps)]
    tf_trainer, data = _train_transfusion(args, out, model_args, seed + device, timings)

    start = time.time()
    weights = [f"ema_{d:g}" for d in args.ema or []] + (["raw"] if args.ema else [])  # [] : the checkpoint's own
    _predict(out, model_args, device, tf_trainer.checkpoint_callback.last_model_path, args.predict_examples, weights)
    timings["generation_s"] = time.time() - start
    return _report(args, out, ae_trainer, tf_trainer, timings, data, weights)


def _markdown(report: dict, out: Path) -> str:
    lines = ["# Transfusion quickstart report", "", f"Seed {report['seed']}.", ""]
    if "streamed" in report:
        s = report["streamed"]
        lines += [f"Streamed: Transfusion trained from the shard set `{s['shards']}` ({s['train_records']} training "
                  f"records in {s['train_shards']} WebDataset shards of {s['image']}, shuffled with seed "
                  f"{s['shuffle_seed']}; validation: {s['validation_records']} records) with StreamingDataModule, "
                  f"text rows {s['text_row_share']:.0%} of rows.", ""]
    lines += ["| stage | seconds |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.0f} |" for k, v in report["timings"].items()]
    lines.append(f"| total | {sum(report['timings'].values()):.0f} |")
    lines += ["", "## Losses (step, value)", "", "| metric | first | last |", "|---|---|---|"]
    ae = report["autoencoder"]
    lines.append(f"| autoencoder train/val L1 | {ae['first_train_rec_loss'][1]:.4f} (step {ae['first_train_rec_loss'][0]}) "
                 f"| {ae['last_val_rec_loss'][1]:.4f} (step {ae['last_val_rec_loss'][0]}) |")
    for key, v in report["transfusion"].items():
        lines.append(f"| {key} | {v['first'][1]:.4f} (step {v['first'][0]}) | {v['last'][1]:.4f} (step {v['last'][0]}) |")
    f = report["follow"]
    images, captions = f["image_rates"], f["caption_rates"]
    lines += ["", "## Do the generations follow their prompts?", "",
              "Attributes read back from the pixels of each generated picture (`transfusion.evaluation.follow`) and "
              "parsed from each generated caption.", "",
              "| direction | prompts | size | colour | shape | position | all four | exactly one object | blank |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| caption -> image | {f['images']} | " + " | ".join(f"{images[k]:.0%}" for k in
                                                                   ("size", "colour", "shape", "position", "all", "one_object", "blank")) + " |",
              f"| image -> caption | {f['captions']} | " + " | ".join(f"{captions[k]:.0%}" for k in
                                                                     ("size", "colour", "shape", "position", "all")) + " | | |"]
    if report.get("follow_by_weights"):
        lines += ["", f"The rows above use the weights `{report['weights']}`. By weights (the same checkpoint):", "",
                  "| weights | size | colour | shape | position | all four | exactly one object | blank "
                  "| image -> caption: all four |", "|---|---|---|---|---|---|---|---|---|"]
        for name, g in report["follow_by_weights"].items():
            r = g["image_rates"]
            lines.append(f"| {name} | " + " | ".join(f"{r[k]:.0%}" for k in ("size", "colour", "shape", "position",
                                                                              "all", "one_object", "blank"))
                         + f" | {g['caption_rates']['all']:.0%} |")
    if report["curve"]:
        lines += ["", "### During training (`follow_curve.png`: other held-out captions, DDIM 50 steps)", "",
                  "| step | minutes | size | colour | shape | position | all four | one object | captions: all four |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['step']} | {c['minutes']:.1f} | " + " | ".join(
            f"{c[k]:.0%}" for k in ("follow@shapes/size", "follow@shapes/colour", "follow@shapes/shape",
                                    "follow@shapes/position", "follow@shapes", "follow@shapes/one_object",
                                    "captions@shapes")) + " |" for c in report["curve"]]
        lines += ["", "![prompt following against training minutes](follow_curve.png)"]
    lines += ["", "### Caption -> image: asked (rows) against read (columns)", ""]
    for attribute, table in f["confusion"].items():
        lines += [f"**{attribute}**", "", table, ""]
    lines += ["## Image -> caption examples", "", "| reference caption | generated caption |", "|---|---|"]
    lines += [f"| {e['reference']} | {e['generated']} |" for e in f["examples"]]
    lines += ["", f"Images: `{out / 'samples' / 'grid.png'}`; captions: `{out / 'samples' / 'captions.png'}`; "
              f"all generations: `{out / 'samples' / 'generations.jsonl'}`.", ""]
    return "\n".join(lines)
