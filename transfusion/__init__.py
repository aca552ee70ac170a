"""Transfusion: predict the next token and diffuse images with one transformer."""

import os

# Idle OpenMP threads sleep instead of spinning: on small CPU machines a spinning pool next to a data
# worker or another process slowed training steps down up to 30x. Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transfusion._torchvision_compat import ensure_torchvision_importable  # noqa: E402  (imports torch)

ensure_torchvision_importable()  # before anything imports lightning -> torchmetrics -> torchvision

__version__ = "0.1.0"
