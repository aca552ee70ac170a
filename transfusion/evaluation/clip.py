"""CLIP score with a local CLIP, and a small CLIP trained in-package when no real one can be had.

``clip_score_metric(path)`` is torchmetrics' ``CLIPScore`` on a Hugging Face CLIP directory
(``CLIPModel`` + ``CLIPProcessor``, e.g. a local copy of ``openai/clip-vit-large-patch14``, the paper's
evaluator). ``transfusion.lightning.clip.ClipModule`` trains a small one in the same format: ``transfusion
fit --config lightning_configs/clip_embedded.yaml``. Scores from such a model are NOT comparable to published CLIP
scores; reports name the CLIP that computed them (``clip_score@<name>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

NAME_FILE = "transfusion_clip.json"


class _Features(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors: transformers 5 returns model outputs (the
    projection in ``pooler_output``), which torchmetrics 1.9's CLIPScore does not expect."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))

    @property
    def config(self):
        return self.model.config


def clip_name(path: str | os.PathLike) -> str:
    """The name a CLIP directory was exported under (``transfusion_clip.json``), else the directory name."""
    meta = Path(path) / NAME_FILE
    return json.loads(meta.read_text())["name"] if meta.is_file() else Path(path).name


def load_clip(path: str | os.PathLike):
    """(model, processor) from a Hugging Face CLIP directory; a clear error if it is not one."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP model at {path} (config.json missing). Pass a local Hugging Face CLIP directory with the "
            "`clip_model` option, or train one: `transfusion fit --config lightning_configs/clip_embedded.yaml`.")
    model = CLIPModel.from_pretrained(str(path)).eval()
    return _Features(model), CLIPProcessor.from_pretrained(str(path))


def clip_score_metric(path: str | os.PathLike):
    """torchmetrics CLIPScore on the CLIP at ``path`` (images uint8 (N, 3, H, W), captions str)."""
    from torchmetrics.multimodal import CLIPScore

    model, processor = load_clip(path)
    return CLIPScore(model_name_or_path=lambda: (model, processor))
