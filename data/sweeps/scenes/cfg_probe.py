"""GenEval-style scores of a scenes checkpoint at several guidance scales, with the share of blank pictures.

    python data/sweeps/scenes/cfg_probe.py CKPT --cfg 1 2 3 5 --seeds 2

Every held-out prompt (``transfusion.data.embedded.scenes.evaluation_metadata``) is drawn ``--seeds`` times at each scale with
the checkpoint's other sampling settings; prints one row a scale: each task's accuracy, the overall score and the
share of pictures in which the reader finds no object.
"""

import argparse
from dataclasses import replace

import torch

from transfusion.data.embedded.scenes import evaluation_metadata
from transfusion.evaluation.geneval import GenEvalScore, detect
from transfusion.lightning.transfusion import TransfusionModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--seeds", type=int, default=2, help="pictures a prompt")
    parser.add_argument("--batch_size", type=int, default=48)
    args = parser.parse_args()
    module = TransfusionModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    records = [r for r in evaluation_metadata() for _ in range(args.seeds)]
    seeds = list(range(len(records)))
    print("| CFG | " + " | ".join(("single_object", "two_object", "counting", "colors", "position", "color_attr"))
          + " | overall | blank |")
    print("|---" * 9 + "|")
    for scale in args.cfg:
        sampling = replace(module.sampling, cfg_scale=scale)
        score, blank = GenEvalScore(), 0
        with torch.no_grad():
            for i in range(0, len(records), args.batch_size):
                batch = records[i:i + args.batch_size]
                images = module.generate_images([r["prompt"] for r in batch], seeds[i:i + args.batch_size], sampling)
                score.update(images, batch)
                blank += sum(not any(detect(image).values()) for image in images)
        rates = score.compute()
        print(f"| {scale:g} | " + " | ".join(f"{rates[t]:.2f}" for t in list(rates)[:-1])
              + f" | {rates['overall']:.3f} | {blank / len(records):.2f} |", flush=True)


if __name__ == "__main__":
    main()
