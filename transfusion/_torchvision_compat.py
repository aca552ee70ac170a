"""Make a CUDA-only torchvision wheel importable next to a CPU torch.

The registry's torchvision is compiled against CUDA; with a CPU torch its extension does not load and
``import torchvision`` fails with "operator torchvision::nms does not exist". torchmetrics imports
torchvision when it is installed and lightning imports torchmetrics, so that failure would break
``import lightning``. Registering the two missing operator schemas lets torchvision import; everything
pure-Python in it then works (transforms, utils, model classes), while ``ops.nms`` itself does not.
On a machine where the compiled ops load, this does nothing.

Where it runs: ``import transfusion`` and the pure-PyTorch parts (models, generation, diffusion) never touch
torchvision; the packages whose modules import lightning, torchmetrics or torchvision call it in their
``__init__`` (data, evaluation, lightning, sweep), as do the ``transfusion`` command (``cli.py``), the lazy
``import diffusers``, ``tests/conftest.py`` and scripts that import those libraries themselves.
"""

import importlib.util
import sys

import torch

_LIBRARY = None  # keeps the schema registrations alive


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # drop the half-imported package before retrying
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
