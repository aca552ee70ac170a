"""``transfusion quickstart``: the whole embedded pipeline through the public CLI, in one output folder.

1. train the tokenizer on the embedded text;                  -> tokenizer.model
2. ``transfusion fit`` the autoencoder (autoencoder_embedded);  -> autoencoder/
3. ``transfusion fit`` Transfusion (transfusion_embedded);      -> transfusion/
4. ``transfusion predict``: images from held-out captions and captions from held-out images -> samples/
5. a report: losses, whether images follow their captions and captions their images -> report.md/.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from transfusion.cli import cli_main, tokenizer_main

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"


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


def _metrics(trainer) -> list[dict]:
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")] or [(-1, float("nan"))]


def _follow_rates(samples: Path) -> dict:
    """Share of generated images whose colour/position match the prompt, and of captions matching the image."""
    from PIL import Image

    from transfusion.data.shapes import describe, parse_caption, to_tensor

    records = [json.loads(line) for line in (samples / "generations.jsonl").read_text().splitlines()]
    images = [r for r in records if r["kind"] == "text-to-image"]
    captions = [r for r in records if r["kind"] == "image-to-text"]
    colour = position = 0
    for record in images:
        wanted = parse_caption(record["reference"])
        seen = describe(to_tensor(Image.open(samples / record["images"][0]))) or {}
        colour += seen.get("colour") == wanted.get("colour")
        position += seen.get("position") == wanted.get("position")
    exact = sum(parse_caption(c["text"]) == parse_caption(c["reference"]) for c in captions)
    per_attribute = {key: sum(parse_caption(c["text"]).get(key) == parse_caption(c["reference"])[key]
                              for c in captions) / max(len(captions), 1) for key in ("size", "colour", "shape", "position")}
    return {"images": len(images), "image_colour_match": colour / max(len(images), 1),
            "image_position_match": position / max(len(images), 1), "captions": len(captions),
            "caption_all_attributes_match": exact / max(len(captions), 1), "caption_attribute_match": per_attribute,
            "examples": [{"reference": c["reference"], "generated": c["text"]} for c in captions[:8]]}


def quickstart_main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="transfusion quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/quickstart", help="folder for everything the run writes")
    parser.add_argument("--autoencoder_steps", type=int, default=None, help="override the YAML's max_steps")
    parser.add_argument("--steps", type=int, default=None, help="Transfusion training steps (default: the YAML's)")
    parser.add_argument("--preset", default=None, help="transformer preset (default: the YAML's)")
    parser.add_argument("--predict_examples", type=int, default=16)
    parser.add_argument("--inference_steps", type=int, default=None, help="diffusion steps when generating")
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()  # absolute: checkpoints record the tokenizer and autoencoder paths
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.time()
    tokenizer_main(["--output", str(out / "tokenizer.model")])
    timings["tokenizer_s"] = time.time() - start

    start = time.time()
    ae_overrides = _steps_overrides(args.autoencoder_steps)
    ae_trainer = _fit("autoencoder_embedded.yaml", out / "autoencoder", ae_overrides)
    ae_ckpt = ae_trainer.checkpoint_callback.last_model_path
    timings["autoencoder_s"] = time.time() - start

    start = time.time()
    model_args = ["--model.init_args.tokenizer", str(out / "tokenizer.model"), "--model.init_args.autoencoder", ae_ckpt]
    if args.preset:
        model_args += ["--model.init_args.preset", args.preset]
    if args.inference_steps:
        model_args += ["--model.init_args.num_inference_steps", str(args.inference_steps)]
    fit_args = model_args + _steps_overrides(args.steps)
    tf_trainer = _fit("transfusion_embedded.yaml", out / "transfusion", fit_args)
    tf_ckpt = tf_trainer.checkpoint_callback.last_model_path
    timings["transfusion_s"] = time.time() - start

    start = time.time()
    cli_main(["predict", "--config", str(CONFIGS / "transfusion_embedded.yaml"),
              "--config", str(CONFIGS / "transfusion_embedded_predict.yaml"), *model_args,
              "--trainer.callbacks.init_args.output_dir", str(out / "samples"),
              "--data.init_args.predict_examples", str(args.predict_examples), "--ckpt_path", tf_ckpt])
    timings["generation_s"] = time.time() - start

    ae_rows, tf_rows = _metrics(ae_trainer), _metrics(tf_trainer)
    report = {
        "autoencoder_checkpoint": ae_ckpt, "transfusion_checkpoint": tf_ckpt, "timings": timings,
        "autoencoder": {"first_train_rec_loss": _series(ae_rows, "train/rec_loss")[0],
                        "last_val_rec_loss": _series(ae_rows, "val/rec_loss")[-1]},
        "transfusion": {key: {"first": _series(tf_rows, key)[0], "last": _series(tf_rows, key)[-1]}
                        for key in ("train/loss", "train/lm_loss", "train/ddpm_loss",
                                    "val/loss", "val/lm_loss", "val/ddpm_loss", "val/lm_ppl")},
        "follow": _follow_rates(out / "samples"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report, out))
    print((out / "report.md").read_text())
    return report


def _markdown(report: dict, out: Path) -> str:
    lines = ["# Transfusion quickstart report", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.0f} |" for k, v in report["timings"].items()]
    lines += ["", "## Losses (step, value)", "", "| metric | first | last |", "|---|---|---|"]
    ae = report["autoencoder"]
    lines.append(f"| autoencoder train/val L1 | {ae['first_train_rec_loss'][1]:.4f} (step {ae['first_train_rec_loss'][0]}) "
                 f"| {ae['last_val_rec_loss'][1]:.4f} (step {ae['last_val_rec_loss'][0]}) |")
    for key, v in report["transfusion"].items():
        lines.append(f"| {key} | {v['first'][1]:.4f} (step {v['first'][0]}) | {v['last'][1]:.4f} (step {v['last'][0]}) |")
    f = report["follow"]
    lines += ["", "## Do the generations follow their prompts?", "",
              f"- caption -> image ({f['images']} held-out captions): colour matches {f['image_colour_match']:.0%}, "
              f"position matches {f['image_position_match']:.0%} (read back from the pixels)",
              f"- image -> caption ({f['captions']} held-out images): all four attributes right "
              f"{f['caption_all_attributes_match']:.0%}; per attribute "
              + ", ".join(f"{k} {v:.0%}" for k, v in f["caption_attribute_match"].items()),
              "", "| reference caption | generated caption |", "|---|---|"]
    lines += [f"| {e['reference']} | {e['generated']} |" for e in f["examples"]]
    lines += ["", f"Images: `{out / 'samples' / 'grid.png'}`; captions: `{out / 'samples' / 'captions.png'}`; "
              f"all generations: `{out / 'samples' / 'generations.jsonl'}`.", ""]
    return "\n".join(lines)
