"""Transfusion: predict the next token and diffuse images with one transformer."""

from transfusion._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before anything imports lightning -> torchmetrics -> torchvision

__version__ = "0.1.0"
