"""Model weights as ``safetensors`` with the config beside them: a checkpoint anyone can load safely.

``transfusion export --ckpt_path CKPT --output DIR`` (or :func:`export`) writes

* ``DIR/model.safetensors``: every tensor of the module (for Transfusion, the frozen autoencoder too);
* ``DIR/config.json``: ``{"class_path", "init_args", "config"}``: the module's arguments and its resolved
  architecture (``config``, checked again on import);
* ``DIR/tokenizer.model``: a copy of the tokenizer (Transfusion only).

:func:`load_exported` (the import) rebuilds the module from ``config.json`` and loads the weights; neither
step unpickles anything. Optimizer state is not exported: to continue training, use the checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transfusion.lightning.checkpoint import check_config, flatten_config

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
_KNOWN = {"transfusion.lightning.transfusion.TransfusionModule": ("tokenizer", "autoencoder"),
          "transfusion.lightning.autoencoder.AutoencoderModule": ("kl_weight",)}


def _class_path(hparams: dict) -> str:
    if "_class_path" in hparams:  # written by LightningCLI
        return hparams["_class_path"]
    for path, keys in _KNOWN.items():  # a checkpoint from a plain Trainer
        if all(k in hparams for k in keys):
            return path
    raise ValueError("cannot tell which LightningModule wrote this checkpoint (no _class_path in its hyper-parameters)")


def _load_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def export(ckpt_path: str | Path, output: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.model``) for a Lightning checkpoint."""
    ckpt_path, output = Path(ckpt_path), Path(output)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    class_path = _class_path(checkpoint["hyper_parameters"])
    module = _load_class(class_path).load_from_checkpoint(ckpt_path, map_location="cpu")
    output.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "tokenizer"):  # Transfusion: self-contained, no paths to other files
        shutil.copyfile(hparams["tokenizer"], output / TOKENIZER)
        hparams["tokenizer"] = TOKENIZER
        hparams["autoencoder"] = {k: v for k, v in module.autoencoder.hparams.items() if not k.startswith("_")}
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, output / WEIGHTS, metadata={"class_path": class_path})
    config = {"class_path": class_path, "init_args": hparams, "config": flatten_config(module.config)}
    (output / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return output


def load_exported(folder: str | Path, map_location: str | torch.device = "cpu"):
    """The module saved by :func:`export` in ``folder``, in eval mode."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{str(folder / name)!r} does not exist; is {str(folder)!r} an export folder?")
    config = json.loads((folder / CONFIG).read_text())
    init_args = dict(config["init_args"])
    if isinstance(init_args.get("tokenizer"), str) and not Path(init_args["tokenizer"]).is_absolute():
        init_args["tokenizer"] = str(folder / init_args["tokenizer"])
    module = _load_class(config["class_path"])(**init_args)
    check_config(config["config"], module.config, f"the export in {str(folder)!r}")
    module.configure_model()  # modules that build their network lazily (TransfusionModule) build it now
    state = load_file(folder / WEIGHTS, device=str(map_location))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{str(folder / WEIGHTS)!r} does not fit {config['class_path']}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return module.to(map_location).eval()


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="transfusion export", description="Export the weights of a checkpoint as "
                                     "safetensors, with config.json (and tokenizer.model) beside them.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `transfusion fit`")
    parser.add_argument("--output", required=True, help="folder to write (created if missing)")
    args = parser.parse_args(argv)
    try:
        output = export(args.ckpt_path, args.output)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"transfusion export: error: {error}\n")
    print(f"wrote {output / WEIGHTS} and {output / CONFIG}")
