"""LightningDataModule for interleaved documents: the embedded stories (``lightning_configs/story_embedded.yaml``).

Training rows are stories (``ShapeStories``, packed by ``DocumentRows``) with, in ``caption_ratio`` of them,
image-caption rows of the shapes (their caption dropout teaches the unconditional branch that classifier-free
guidance needs). Validation, ``predict`` and the story evaluation (``transfusion.evaluation.story``) use held-out
stories.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from transfusion.data.embedded.stories import ShapeStories
from transfusion.data.modules.base import RowsDataModule
from transfusion.data.rows.documents import DocumentRows
from transfusion.data.rows.prompts import PromptDataset, collate_prompts, read_prompts
from transfusion.data.rows.sequences import SequenceLayout
from transfusion.images import IMAGE


class StoryDataModule(RowsDataModule):
    def __init__(self, seq_len: int = 128, batch_size: int = 32, rows_per_epoch: int = 100_000, val_rows: int = 64,
                 num_stories: int = 10_000, images_per_story: tuple[int, int] = (2, 3), caption_ratio: float = 0.2,
                 caption_dropout: float = 0.1, image_first_max_t: int | None = 100, num_workers: int = 0,
                 seed: int = 0, predict_examples: int = 8, prompts: str | None = None,
                 layout: SequenceLayout | None = None):
        """
        Args:
            num_stories: training stories (``ShapeStories``, split "train").
            images_per_story: the range of pictures in a story (inclusive).
            caption_ratio: share of training rows that are image-caption rows of the shapes.
            caption_dropout: of those rows' captions (the unconditional branch for guidance).
            image_first_max_t: noise limit of an image with no text before it and text after it (pair rows
                with the image first; a story never starts with a picture).
            predict_examples: held-out stories whose texts are the ``predict`` prompts (or a ``prompts`` file).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["layout"])
        for name in ("seq_len", "batch_size", "rows_per_epoch", "val_rows", "num_stories", "predict_examples"):
            if not isinstance(self.hparams[name], int) or self.hparams[name] <= 0:
                raise ValueError(f"data option {name} must be a positive integer, got {self.hparams[name]!r}")
        if not 0.0 <= caption_ratio <= 1.0:
            raise ValueError(f"data option caption_ratio must be in [0, 1], got {caption_ratio}")
        low, high = images_per_story
        if not 1 <= low <= high:
            raise ValueError(f"data option images_per_story must be [low, high] with 1 <= low <= high, "
                             f"got {list(images_per_story)}")
        self.layout = layout
        self.train_set = self.val_set = None

    def stories(self, split: str, count: int) -> ShapeStories:
        """Stories of a split: "train", or held-out ones for "validation" and "test" (other seeds)."""
        hp = self.hparams
        seed = {"train": hp.seed, "validation": hp.seed + 1, "test": hp.seed + 2}[split]
        return ShapeStories(count, self.layout.image_size, seed=seed, split="train" if split == "train" else "heldout",
                            images_per_story=tuple(hp.images_per_story))

    def setup(self, stage: str | None = None) -> None:
        self._resolve_layout()
        hp = self.hparams
        mix = None
        if hp.caption_ratio > 0:
            mix = self.caption_rows(caption_dropout=hp.caption_dropout)
        self.train_set = DocumentRows(self.stories("train", hp.num_stories), self.layout, hp.seq_len,
                                      hp.rows_per_epoch, hp.image_first_max_t, mix, hp.caption_ratio, seed=hp.seed)
        self.val_set = DocumentRows(self.stories("validation", max(hp.val_rows, 64)), self.layout, hp.seq_len,
                                    hp.val_rows, hp.image_first_max_t, seed=hp.seed + 1)

    def story_examples(self, num: int) -> list[dict]:
        """``num`` held-out stories (``ShapeStories`` items, test split)."""
        data = self.stories("test", num)
        return [data[i] for i in range(num)]

    def evaluation_examples(self, num: int) -> list[dict]:
        """Image-caption examples for the caption metrics: the first picture of held-out stories and its caption."""
        return [{"image": s["images"][0], "caption": s["texts"][0], "references": [s["texts"][0]]}
                for s in self.story_examples(num)]

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.prompts:
            records = read_prompts(hp.prompts)
        else:
            records = [{"prompt": story_prompt(s["texts"]), "reference": " ".join(s["texts"]), "max_new_tokens": 0,
                        "kind": "story"} for s in self.story_examples(hp.predict_examples)]
        return DataLoader(PromptDataset(records), batch_size=hp.batch_size, shuffle=False, collate_fn=collate_prompts)


def story_prompt(texts: list[str]) -> list:
    """The prompt that asks for a story's pictures: each text followed by ``IMAGE``."""
    return [s for text in texts for s in (text, IMAGE)]
