"""Draw a story and measure story following for a Transfusion checkpoint trained on the embedded stories.

    python data/stories/evaluate_stories.py --ckpt outputs/story/logs/version_0/checkpoints/last.ckpt

1. the story "a small red circle in the centre" IMAGE "then it turns blue" IMAGE "then it moves to the top left"
   IMAGE, in one ``generate`` call, and the first held-out stories: ``story_grid.png`` (each row a story);
2. ``--stories`` held-out stories (``StoryDataModule.story_examples``), every picture read back from its pixels
   per position in the story (``transfusion.evaluation.story``): ``story_follow.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transfusion.data.modules.story import StoryDataModule
from transfusion.evaluation.story import generate_stories, story_scores
from transfusion.images import IMAGE, image_grid
from transfusion.lightning.transfusion import TransfusionModule

STORY = ["a small red circle in the centre", IMAGE, "then it turns blue", IMAGE, "then it moves to the top left", IMAGE]
COLUMNS = ("size", "colour", "shape", "position", "all", "one_object", "blank")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--stories", type=int, default=48, help="held-out stories to measure")
    parser.add_argument("--grid_stories", type=int, default=3, help="held-out stories in the grid, after the headline")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", default="data/stories")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: immune to a shared machine's load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = TransfusionModule.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    generator = module.generator()
    data = StoryDataModule(layout=module.sequence_layout())
    stories = data.story_examples(args.stories)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    headline = generator.with_options(max_new_tokens=0).generate([STORY], seeds=[0])[0]  # one call, three pictures
    pictures = generate_stories(generator, stories, batch_size=args.batch_size)
    seconds = time.time() - start

    texts = [s for s in STORY if isinstance(s, str)]
    tiles = [(x, t) for x, t in zip([x for x in headline if isinstance(x, torch.Tensor)], texts)]
    for story, drawn in zip(stories[:args.grid_stories], pictures):
        tiles += [(x, t) for x, t in zip(drawn, story["texts"])] + [(torch.full_like(drawn[0], 1.0), "")] * (
            3 - len(drawn))
    image_grid(tiles, scale=3, columns=3).save(out / "story_grid.png", optimize=True)

    scores = story_scores(stories, pictures)
    report = {"ckpt": args.ckpt, "stories": len(stories), "sampler": {k: getattr(generator.options, k) for k in
              ("sampler", "num_steps", "cfg_scale", "clip_x0")}, "seconds": round(seconds, 1),
              "per_position": scores}
    (out / "story_follow.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| position | pictures | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for k, rates in scores.items():
        lines.append(f"| {k} | {rates['count']} | " + " | ".join(f"{100 * rates[c]:.0f}%" for c in COLUMNS) + " |")
    print("\n".join(lines))
    print(f"{seconds:.0f} s of generation; wrote {out / 'story_grid.png'} and {out / 'story_follow.json'}")


if __name__ == "__main__":
    main()
