"""The quickstart's Transfusion stage, predict and prompt-following read-back on the tokenizer and autoencoder of an
existing quickstart folder: another seed, budget or override without retraining its first two stages.

    python data/quickstart/transfusion_stage.py outputs/quickstart_seed1 outputs/stage_seed1 --seed 1 \\
        [--steps 850] [-- --model.init_args.diffusion_lambda 10 ...]

Writes OUT/transfusion/ (the fit, its curve), OUT/samples/ and OUT/result.json (stage times, image and caption
rates, the curve, the colour confusion table). Options other than SOURCE and OUT are the quickstart's (`transfusion quickstart --help`). With the quickstart's seed
and defaults it reproduces its samples
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
    argv = sys.argv[1:]
    own, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, quickstart_argv = parser.parse_known_args(own)
    options = q._parser().parse_args(quickstart_argv)  # the quickstart's own --seed, --steps, --curve_examples, ...
    args.output.mkdir(parents=True, exist_ok=True)
    autoencoder = str(next((args.source / "autoencoder").rglob("last.ckpt")))
    model_args = ["--model.init_args.tokenizer", str(args.source / "tokenizer.model"),
                  "--model.init_args.autoencoder", autoencoder]
    if options.preset:
        model_args += ["--model.init_args.preset", options.preset]
    if options.inference_steps:
        model_args += ["--model.init_args.sampling.num_steps", str(options.inference_steps)]
    seed = ["--seed_everything", str(options.seed), "--model.init_args.noise_seed", str(options.seed)]
    timings = {}
    trainer, _ = q._train_transfusion(options, args.output, model_args, seed + overrides, timings)
    start = time.time()
    q._predict(args.output, model_args, [], trainer.checkpoint_callback.last_model_path, options.predict_examples, [])
    follow = q._follow(args.output / "samples")
    result = {"transfusion_s": timings["transfusion_s"], "predict_s": time.time() - start,
              "image_rates": follow["image_rates"], "caption_rates": follow["caption_rates"], "curve": q._curve(trainer),
              "colour_confusion": follow["confusion"]["colour"]}
    (args.output / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
