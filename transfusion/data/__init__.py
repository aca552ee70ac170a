"""Data: sources, row builders and DataModules."""

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # this package imports lightning / torchmetrics / torchvision
