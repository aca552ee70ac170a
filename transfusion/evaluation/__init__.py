"""Evaluation metrics: FID, CLIP, CIDEr-D, perplexity, prompt following, edits, stories."""

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # this package imports lightning / torchmetrics / torchvision
