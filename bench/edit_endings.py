"""Does a Transfusion checkpoint end its documents? Images per prompt for held-out edit prompts and captions.

    python bench/edit_endings.py --ckpt outputs/edit/logs/version_0/checkpoints/last.ckpt [--num 32] [--budget 8]

Each prompt (``[instruction, source, IMAGE]`` in the trained order, or ``[caption, IMAGE]``) is generated with a
text budget of ``--budget`` tokens after the image: a model that ends its document returns exactly the one image
(EOS); one that answers its EOI with BOI returns more images. Prints a Markdown table (``--output`` writes JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transfusion.data.modules.edit import EditDataModule
from transfusion.images import IMAGE
from transfusion.lightning.transfusion import TransfusionModule


def summary(outputs: list[list]) -> dict:
    """Share of outputs that are exactly one image, mean images per output, share with text after the image."""
    images = [sum(isinstance(s, torch.Tensor) for s in out) for out in outputs]
    return {"exactly_one_image": sum(len(o) == 1 and n == 1 for o, n in zip(outputs, images)) / len(outputs),
            "images_per_prompt": sum(images) / len(outputs),
            "most_images": max(images),
            "with_text": sum(any(isinstance(s, str) for s in o) for o in outputs) / len(outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num", type=int, default=32, help="prompts of each kind (held-out edits and captions)")
    parser.add_argument("--budget", type=int, default=8, help="text tokens allowed after the prompt's image")
    parser.add_argument("--instruction_first", type=int, default=1, help="the edit prompts' order (the config's)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    module = TransfusionModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    data = EditDataModule(instruction_first=bool(args.instruction_first), layout=module.sequence_layout())
    examples = data.edit_examples(args.num)
    captions = [e["caption"] for e in data.evaluation_examples(args.num)]
    generator, seed, results = module.generator(max_new_tokens=args.budget), module.hparams.generation_seed, {}
    for kind, prompts in (("edit", [data.edit_prompt(e["source"], e["instruction"]) for e in examples]),
                          ("caption", [[c, IMAGE] for c in captions])):
        start = time.time()
        outputs = generator.generate(prompts, seeds=[seed + i for i in range(len(prompts))])
        results[kind] = {**summary(outputs), "prompts": len(prompts), "seconds": round(time.time() - start, 1)}
    print(f"{args.ckpt}, budget {args.budget} tokens after the image\n")
    print("| prompts | n | exactly one image | images per prompt | most | with text |\n|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['prompts']} | {r['exactly_one_image']:.0%} | {r['images_per_prompt']:.2f} | "
              f"{r['most_images']} | {r['with_text']:.0%} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"ckpt": args.ckpt, "budget": args.budget, **results}, indent=2))


if __name__ == "__main__":
    main()
