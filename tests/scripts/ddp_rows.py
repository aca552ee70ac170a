"""Run by tests/test_mixing.py: train a no-op module for one epoch under 2-process DDP on CPU and write,
per rank, a fingerprint of every row it was given (``rank{r}.json`` in the output folder)."""

import hashlib
import json
import sys
from pathlib import Path

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before lightning -> torchmetrics -> torchvision

import lightning as L  # noqa: E402
import torch  # noqa: E402

from transfusion.data.modules.image_text import ImageTextDataModule  # noqa: E402
from transfusion.data.rows.sequences import SequenceLayout  # noqa: E402
from transfusion.data.sources import ImageFolderSource, TextFilesSource  # noqa: E402
from transfusion.data.tokenizer import Tokenizer  # noqa: E402


def row_fingerprints(batch: dict) -> list[str]:
    """One hash per row: its tokens, document ids and its own images."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        ids = batch["image_ids"][r]
        images = batch["images"][ids[ids >= 0].unique()]
        h = hashlib.sha1(batch["tokens"][r].numpy().tobytes() + batch["doc_ids"][r].numpy().tobytes())
        h.update(images.numpy().tobytes())
        out.append(h.hexdigest())
    return out


def make_datamodule(tokenizer: str, data: Path, **overrides) -> ImageTextDataModule:
    layout = SequenceLayout(Tokenizer(tokenizer), patches_per_image=4, image_size=8)
    kwargs = dict(seq_len=32, batch_size=4, rows_per_epoch=24, val_rows=4, val_fraction=0.2, layout=layout)
    return ImageTextDataModule(ImageFolderSource(str(data / "images")), TextFilesSource(str(data / "text.txt")),
                               **{**kwargs, **overrides})


class RecordRows(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen += row_fingerprints(batch)
        return self.weight * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    tokenizer, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    module = RecordRows()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, make_datamodule(tokenizer, data))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(module.seen))
