"""The quickstart's Transfusion stage, predict and prompt-following read-back on the tokenizer and autoencoder of an
existing quickstart folder: another seed, budget or override without retraining its first two stages.

    python data/quickstart/transfusion_stage.py outputs/quickstart_seed1 outputs/stage_seed1 --seed 1 \\
        [--steps 850] [-- --model.init_args.diffusion_lambda 10 ...]

Writes OUT/transfusion/ (the fit, its curve), OUT/samples/ and OUT/result.json (stage times, image and caption
rates, the curve, the colour confusion table). With the quickstart's seed and defaults it reproduces its samples
byte for byte (data/quickstart/README.md).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from transfusion import quickstart as q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a `transfusion quickstart` output folder")
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="Transfusion steps (default: the YAML's)")
    argv = sys.argv[1:]
    own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    args.output.mkdir(parents=True, exist_ok=True)
    autoencoder = str(next((args.source / "autoencoder").rglob("last.ckpt")))
    model_args = ["--model.init_args.tokenizer", str(args.source / "tokenizer.model"),
                  "--model.init_args.autoencoder", autoencoder]
    seed = ["--seed_everything", str(args.seed), "--model.init_args.noise_seed", str(args.seed)]
    curve = q._curve_callback("transfusion_embedded.yaml", args.steps, 64, args.output / "transfusion" / "evaluation")
    start = time.time()
    trainer = q._fit("transfusion_embedded.yaml", args.output / "transfusion",
                     model_args + seed + q._steps_overrides(args.steps) + curve + overrides)
    fit_s, start = time.time() - start, time.time()
    q._predict(args.output, model_args, [], trainer.checkpoint_callback.last_model_path, 64, [])
    follow = q._follow(args.output / "samples")
    result = {"transfusion_s": fit_s, "predict_s": time.time() - start, "image_rates": follow["image_rates"],
              "caption_rates": follow["caption_rates"], "curve": q._curve(trainer),
              "colour_confusion": follow["confusion"]["colour"]}
    (args.output / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
