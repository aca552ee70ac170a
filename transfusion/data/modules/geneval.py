"""``predict`` data for GenEval: the lines of its metadata file, each expanded to N text-to-image prompts
(``transfusion.data.rows.geneval_prompts``: the file, the folder layout, when a folder is complete)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from transfusion.data.rows.geneval_prompts import ExpandLines, folder_name, is_complete, read_metadata


class GenEvalPrompts(L.LightningDataModule):
    """``predict`` data: the prompts of a GenEval metadata file, for ``GenEvalWriter`` (predict only)."""

    def __init__(self, metadata: str, output_dir: str = "outputs/geneval", samples: int = 4, batch_size: int = 1,
                 skip_complete: bool = True):
        """
        Args:
            metadata: GenEval's ``evaluation_metadata.jsonl`` (your copy; prompts/ of its repository).
            output_dir: the folder GenEval's evaluator reads: ``<output_dir>/<5-digit line>/...``.
            samples: images per prompt (GenEval's default: 4).
            batch_size: lines generated together (``batch_size * samples`` images).
            skip_complete: skip lines whose folder is already complete (an interrupted run resumes); False
                writes every folder again.
        """
        super().__init__()
        for name, value in (("samples", samples), ("batch_size", batch_size)):
            if type(value) is not int or value < 1:
                raise ValueError(f"data option {name} must be an integer >= 1, got {value!r}")
        self.save_hyperparameters()
        self.metadata = read_metadata(metadata)  # at start-up: a bad line stops the command before the model loads

    def setup(self, stage: str | None = None) -> None:
        # here, before Lightning's post-setup barrier: every rank sees the folder as it was before any rank wrote
        hp, root = self.hparams, Path(self.hparams.output_dir)
        lines = [{"index": i, "metadata": m, "folder": str(root / folder_name(i))} for i, m in enumerate(self.metadata)]
        self.todo = [line for line in lines if not (hp.skip_complete and is_complete(Path(line["folder"]),
                                                                                   line["metadata"], hp.samples))]
        rank_zero_info(f"GenEval: {len(lines)} prompts in {hp.metadata}; {len(lines) - len(self.todo)} complete in "
                       f"{root} skipped, {len(self.todo)} to generate ({hp.samples} images each)")

    def predict_dataloader(self) -> DataLoader:
        # in this process (num_workers 0): the IMAGE marker is compared by identity
        return DataLoader(self.todo, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0,
                          collate_fn=ExpandLines(self.hparams.samples))
