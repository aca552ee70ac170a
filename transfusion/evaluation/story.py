"""Story following on the embedded stories: does each picture of a generated story show what its text asked?

Each held-out story (``transfusion.data.embedded.stories``) is one interleaved prompt, its texts each followed by
``IMAGE`` ("a small red circle in the centre" IMAGE "then it turns blue" IMAGE ...): one ``generate`` call draws all its
pictures, each conditioned on the story so far (the pictures it drew included). Each picture is read back from its
pixels (``transfusion.evaluation.follow.read_shapes``) and compared with the attributes the story gives it at that
point, per position in the story: the first picture follows a caption, the later ones a change of the previous one.
"""

from __future__ import annotations

import torch

from transfusion.data.modules.story import story_prompt
from transfusion.evaluation.follow import FollowScore


def generate_stories(generator, stories: list[dict], batch_size: int = 16, seed: int = 0) -> list[list[torch.Tensor]]:
    """The pictures (3, H, W) in [-1, 1] generated for each story, from its texts alone (no text sampled)."""
    generator = generator.with_options(max_new_tokens=0)
    pictures = []
    for start in range(0, len(stories), batch_size):
        batch = stories[start:start + batch_size]
        outputs = generator.generate([story_prompt(s["texts"]) for s in batch],
                                     seeds=[seed + start + k for k in range(len(batch))])
        pictures += [[x for x in out if isinstance(x, torch.Tensor)] for out in outputs]
    return pictures


def story_scores(stories: list[dict], pictures: list[list[torch.Tensor]]) -> dict[int, dict[str, float]]:
    """Per position k (1-based) in the stories, ``FollowScore`` rates of the k-th pictures against the attributes
    the story gives them (size, colour, shape, position, all four, one object, blank) and ``count``."""
    scores: dict[int, FollowScore] = {}
    for story, drawn in zip(stories, pictures):
        if len(drawn) != len(story["attributes"]):
            raise ValueError(f"story {story['key']!r}: {len(drawn)} pictures generated for "
                             f"{len(story['attributes'])} asked")
        for k, (picture, asked) in enumerate(zip(drawn, story["attributes"]), start=1):
            scores.setdefault(k, FollowScore()).update(picture[None], [asked.caption(0)])
    return {k: {**score.compute(), "count": len(score.records)} for k, score in sorted(scores.items())}
