"""LightningDataModule for fine-tuning a Transfusion model to edit images (``lightning_configs/edit_embedded.yaml``).

By default the embedded edits (``ShapeEdits``: held-out combinations for validation and evaluation); with
``edits`` a real InstructPix2Pix-style table (``transfusion.data.sources.edits``). ``caption_ratio`` mixes in
image-caption rows of the embedded shapes, so that the fine-tuned model keeps drawing from captions.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from transfusion.data.embedded.shape_edits import ShapeEdits
from transfusion.data.embedded.shapes import TEMPLATES
from transfusion.data.modules.base import RowsDataModule
from transfusion.data.rows.edits import EditRows
from transfusion.data.rows.prompts import PromptDataset, collate_prompts, read_prompts
from transfusion.data.rows.sequences import SequenceLayout
from transfusion.data.sources.edits import EditSource, EditTriples
from transfusion.images import IMAGE


class EditDataModule(RowsDataModule):
    def __init__(self, seq_len: int = 96, batch_size: int = 32, rows_per_epoch: int = 100_000, val_rows: int = 64,
                 num_edits: int = 10_000, edits: EditSource | None = None, p_drop_instruction: float = 0.05, p_drop_source: float = 0.05,
                 p_drop_both: float = 0.05, caption_ratio: float = 0.0, num_workers: int = 0, seed: int = 0,
                 instruction_first: bool = False, predict_examples: int = 8, prompts: str | None = None,
                 strict: bool = False, p_clean_target: float = 0.0, prompted_boi_loss: bool = False,
                 image_first_max_t: int | None = 500,
                 layout: SequenceLayout | None = None):
        """
        Args:
            num_edits: embedded training edits (``ShapeEdits``); unused with ``edits``.
            edits: a real editing source (``EditFilesSource`` / ``EditFolderSource``); None: the embedded edits.
            p_drop_instruction, p_drop_source, p_drop_both: dropout of the instruction, the source image or both,
                for classifier-free guidance in both conditions (InstructPix2Pix: 0.05 each).
            caption_ratio: share of training rows that are image-caption rows of the embedded shapes (caption-first
                and image-first, as ``TransfusionRows``), so captioning and ending a document are not forgotten.
            image_first_max_t: those rows' image-first limit (the quickstart's: 100).
            p_clean_target: share of edit targets that enter clean, so EOI -> EOS is learnt after a clean edited
                image, as generation commits it (``transfusion.data.rows.edits``).
            prompted_boi_loss: keep the BOI after the source's EOI a next-token target (off: the model learns
                "EOI -> BOI" and no longer ends documents or captions).
            instruction_first: the instruction before the source image (``transfusion.data.rows.edits``); prompts for
                the model then put it first too (``edit_prompt``).
            predict_examples: held-out edits that are the ``predict`` prompts (or a ``prompts`` file).
            strict: stop at the first bad record of a real source instead of skipping it.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["layout", "edits"])
        for name in ("seq_len", "batch_size", "rows_per_epoch", "val_rows", "num_edits", "predict_examples"):
            if not isinstance(self.hparams[name], int) or self.hparams[name] <= 0:
                raise ValueError(f"data option {name} must be a positive integer, got {self.hparams[name]!r}")
        if not 0.0 <= caption_ratio <= 1.0:
            raise ValueError(f"data option caption_ratio must be in [0, 1], got {caption_ratio}")
        if not 0.0 <= p_clean_target < 1.0:
            raise ValueError(f"data option p_clean_target must be in [0, 1), got {p_clean_target}")
        drops = (p_drop_instruction, p_drop_source, p_drop_both)
        if any(p < 0 for p in drops) or sum(drops) >= 1:
            raise ValueError(f"data options p_drop_instruction, p_drop_source, p_drop_both must be >= 0 and sum to "
                             f"< 1, got {list(drops)}")
        self.edits, self.layout = edits, layout
        self.train_set = self.val_set = None

    def _edits(self, split: str):
        """The edits of a split: embedded (train; validation and test from held-out combinations) or real."""
        hp, size = self.hparams, self.layout.image_size
        if self.edits is None:
            seed = {"train": hp.seed, "validation": hp.seed + 1, "test": hp.seed + 2}[split]
            count = hp.num_edits if split == "train" else max(hp.val_rows, 64)
            return ShapeEdits(count, size, seed=seed, split="train" if split == "train" else "heldout")
        rows = self.edits.load("train" if split == "train" else "validation")
        if rows is None:
            raise ValueError(f"the editing source {self.edits!r} has no {split} split")
        return EditTriples(rows, size, name=f"{type(self.edits).__name__} ({split})", strict=hp.strict)

    def setup(self, stage: str | None = None) -> None:
        self._resolve_layout()
        hp = self.hparams
        mix = None
        if hp.caption_ratio > 0:
            mix = self.caption_rows()
        self.train_set = EditRows(self._edits("train"), self.layout, hp.seq_len, hp.rows_per_epoch,
                                  hp.p_drop_instruction, hp.p_drop_source, hp.p_drop_both, mix, hp.caption_ratio,
                                  hp.instruction_first, seed=hp.seed,
                                  p_clean_target=hp.p_clean_target, prompted_boi_loss=hp.prompted_boi_loss)
        self.val_set = EditRows(self._edits("validation"), self.layout, hp.seq_len, hp.val_rows, 0.0, 0.0, 0.0,
                                instruction_first=hp.instruction_first, seed=hp.seed + 1,
                                prompted_boi_loss=hp.prompted_boi_loss)

    def edit_prompt(self, source, instruction: str) -> list:
        """The prompt that asks the model for an edit, in the order it was trained on."""
        return [instruction, source, IMAGE] if self.hparams.instruction_first else [source, instruction, IMAGE]

    def edit_examples(self, num: int) -> list[dict]:
        """``num`` held-out edits: ``{"source", "target", "instruction", ...}`` (embedded ones also carry
        ``source_attributes`` and ``edit``, which edit accuracy reads)."""
        data = self._edits("test")
        examples = []
        for i in range(min(num, len(data))):
            item = dict(data[i])
            item["instruction"] = item["instructions"][i % len(item["instructions"])]
            examples.append(item)
        return examples

    def evaluation_examples(self, num: int) -> list[dict]:
        """Image-caption examples for the caption metrics: the held-out edits' targets, captioned when embedded."""
        examples = []
        for item in self.edit_examples(num):
            if "target_attributes" not in item:
                break
            captions = [item["target_attributes"].caption(t) for t in range(len(TEMPLATES))]
            examples.append({"image": item["target"], "caption": captions[len(examples) % len(captions)],
                             "references": captions})
        return examples

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.prompts:
            records = read_prompts(hp.prompts)
        else:
            records = [{"prompt": self.edit_prompt(e["source"], e["instruction"]), "reference": e["instruction"],
                        "max_new_tokens": 0, "kind": "edit"} for e in self.edit_examples(hp.predict_examples)]
        return DataLoader(PromptDataset(records), batch_size=hp.batch_size, shuffle=False, collate_fn=collate_prompts)
