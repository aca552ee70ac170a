"""LightningModules and callbacks around the pure-PyTorch models."""

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # this package imports lightning / torchmetrics / torchvision
