"""Callbacks that turn predictions into files a person can look at."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from PIL import Image
from torchvision.utils import make_grid

from transfusion.data.modules.geneval import GenEvalPrompts
from transfusion.data.rows.geneval_prompts import SAMPLE_FILE, sample_name
from transfusion.data.rows.prompts import prompt_text
from transfusion.errors import UserError
from transfusion.images import image_grid, to_pil


class LastStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final step.

    Lightning writes ``last.ckpt`` only together with a scheduled checkpoint, so a run whose ``max_steps``
    is not a multiple of ``every_n_train_steps`` would end with a stale ``last.ckpt``.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class GenerationWriter(BasePredictionWriter):
    """Writes the ``predict`` outputs of ``TransfusionModule`` under ``output_dir``.

    ``generations.jsonl``: one line per prompt (index, kind, prompt, reference, generated text, image
    files); ``images/NNNN_K.png``: the K-th image generated for prompt NNNN; ``grid.png``: generated
    images under their prompts; ``captions.png``: input images above the text generated for them;
    ``edits.png``: for prompts with an input image that generated an image (edits), before and after.
    """

    def __init__(self, output_dir: str = "outputs/predictions", scale: int = 4):
        super().__init__(write_interval="batch")
        self.output_dir, self.scale = Path(output_dir), scale
        self._generated: list[tuple[Image.Image, str]] = []
        self._captioned: list[tuple[Image.Image, str]] = []
        self._edited: list[tuple[Image.Image, str]] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        (self.output_dir / "images").mkdir(parents=True, exist_ok=True)
        (self.output_dir / "generations.jsonl").write_text("")
        self._generated, self._captioned, self._edited = [], [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.output_dir / "generations.jsonl", "a") as out:
            for record in prediction:
                images = [s for s in record["output"] if isinstance(s, torch.Tensor)]
                text = "".join(s for s in record["output"] if isinstance(s, str))
                files = []
                for k, image in enumerate(images):
                    files.append(f"images/{record['index']:04d}_{k}.png")
                    picture = to_pil(image)
                    picture.save(self.output_dir / files[-1])
                    self._generated.append((picture, prompt_text(record["prompt"])))
                inputs = [s for s in record["prompt"] if not isinstance(s, str) and isinstance(s, (Image.Image, torch.Tensor))]
                if inputs:
                    first = inputs[0] if isinstance(inputs[0], Image.Image) else to_pil(inputs[0])
                    if text:
                        self._captioned.append((first, text))
                    if images:  # an edit: before and after
                        words = " ".join(s for s in record["prompt"] if isinstance(s, str))
                        self._edited += [(first, "before"), (to_pil(images[0]), words)]
                out.write(json.dumps({"index": record["index"], "kind": record["kind"],
                                      "prompt": prompt_text(record["prompt"]), "reference": record.get("reference"),
                                      "text": text, "images": files}) + "\n")

    def on_predict_end(self, trainer, pl_module) -> None:
        image_grid(self._generated, self.scale).save(self.output_dir / "grid.png")
        image_grid(self._captioned, self.scale).save(self.output_dir / "captions.png")
        if self._edited:
            image_grid(self._edited, self.scale).save(self.output_dir / "edits.png")


class GenEvalWriter(BasePredictionWriter):
    """Writes the ``predict`` outputs of ``GenEvalPrompts`` in GenEval's layout
    (``transfusion.data.rows.geneval_prompts``).

    Each batch holds whole lines; a line's folder is written whole: its old ``metadata.jsonl`` removed, images
    ``samples/00000.png ...`` (numbered images beyond N removed), ``grid.png`` (one row, as ``make_grid``), then
    ``metadata.jsonl`` last, the mark of a complete folder.
    """

    def __init__(self, grid: bool = True):
        super().__init__(write_interval="batch")
        self.grid = grid

    def on_predict_start(self, trainer, pl_module) -> None:
        if not isinstance(trainer.datamodule, GenEvalPrompts):
            raise UserError(f"GenEvalWriter writes GenEval prompts: set data.class_path to "
                            f"transfusion.data.modules.geneval.GenEvalPrompts (got {type(trainer.datamodule).__name__})")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        lines: dict[str, list[dict]] = {}
        for record in prediction:
            lines.setdefault(record["geneval"]["folder"], []).append(record)
        for records in lines.values():
            self.write_folder(records)

    def write_folder(self, records: list[dict]) -> None:
        line = records[0]["geneval"]
        folder, n = Path(line["folder"]), line["samples"]
        if sorted(r["geneval"]["sample"] for r in records) != list(range(n)):
            raise RuntimeError(f"{folder}: a batch must hold every image of a line, got "
                               f"{sorted(r['geneval']['sample'] for r in records)} of {n}")
        (folder / "metadata.jsonl").unlink(missing_ok=True)  # incomplete until written again, last
        samples = folder / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        for stale in samples.iterdir():
            if SAMPLE_FILE.fullmatch(stale.name) and int(stale.stem) >= n:
                stale.unlink()
        images = []
        for record in sorted(records, key=lambda r: r["geneval"]["sample"]):
            image = next(s for s in record["output"] if isinstance(s, torch.Tensor))  # the prompt ends with IMAGE
            to_pil(image).save(samples / sample_name(record["geneval"]["sample"]))
            images.append(image.float().cpu())
        if self.grid:
            to_pil(make_grid(torch.stack(images), nrow=n, padding=2, pad_value=-1.0)).save(folder / "grid.png")
        (folder / "metadata.jsonl").write_text(json.dumps(line["metadata"]), encoding="utf-8")  # as GenEval's json.dump
