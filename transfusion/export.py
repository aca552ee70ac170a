"""``transfusion export --ckpt_path CKPT --output DIR``: a Lightning checkpoint as a Hugging Face folder.

The module the checkpoint holds is loaded and written with its ``save_pretrained`` (``transfusion.lightning.hub``):
``model.safetensors``, ``config.json``, ``tokenizer.model`` and a model card. ``Module.from_pretrained(DIR)`` loads
it back without unpickling anything; ``push_to_hub`` publishes it. Optimizer state is not exported: to continue
training, use the checkpoint. ``--llama`` (alias ``--text_model``) writes a Transfusion model's text weights as a
Hugging Face causal-LM folder instead, in the family layout it was started from (Llama, Mistral, Qwen2, Qwen3;
``transfusion.models.llama``): what ``text_model`` starts an LMFusion-style run from, and what ``transformers`` reads.
A checkpoint with EMA weights (``transfusion.lightning.ema``) exports them; ``--weights raw`` exports the trained
weights themselves.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from transfusion.atomic import atomic_folder
from transfusion.errors import check_checkpoint_file
from transfusion.lightning.hub import CONFIG, WEIGHTS, HubMixin

# a checkpoint from a plain Trainer (no _class_path): the first class whose arguments its hyper-parameters all have
_KNOWN = {"transfusion.lightning.transfusion.TransfusionModule": ("tokenizer", "autoencoder", "patch_size"),
          "transfusion.lightning.chameleon.ChameleonModule": ("tokenizer", "autoencoder", "z_loss_weight"),
          "transfusion.lightning.autoencoder.VQAutoencoderModule": ("codebook_size",),
          "transfusion.lightning.autoencoder.AutoencoderModule": ("kl_weight",)}


def _class_path(hparams: dict) -> str:
    if "_class_path" in hparams:  # written by LightningCLI
        return hparams["_class_path"]
    for path, keys in _KNOWN.items():
        if all(k in hparams for k in keys):
            return path
    raise ValueError("cannot tell which LightningModule wrote this checkpoint (no _class_path in its hyper-parameters)")


def _load_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def export(ckpt_path: str | Path, output: str | Path, llama: bool = False, weights: str = "ema") -> Path:
    """Write the module of a Lightning checkpoint to ``output`` with ``save_pretrained`` (``llama``: its text weights
    as a Hugging Face causal-LM folder of its family); ``output``. ``weights``: a checkpoint with EMA weights
    (``transfusion.lightning.ema``) exports the first EMA's ("ema"), the raw ones ("raw") or a named EMA's."""
    ckpt_path, output = Path(ckpt_path), Path(output)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} does not exist")
    check_checkpoint_file(ckpt_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    class_path = _class_path(hparams)
    cls = _load_class(class_path)
    if not issubclass(cls, HubMixin):
        raise ValueError(f"{class_path} has no save_pretrained: only Transfusion, Chameleon and autoencoder "
                         "checkpoints can be exported")
    if weights != "ema" and not checkpoint.get("ema"):
        raise ValueError(f"--weights {weights}: {ckpt_path} holds no EMA weights, only its raw ones (the default)")
    module = cls.load_from_checkpoint(ckpt_path, map_location="cpu", **({"eval_weights": weights}
                                                                       if checkpoint.get("ema") else {}))
    if llama:
        from transfusion.models.llama import save_llama

        if not class_path.endswith("TransfusionModule"):
            raise ValueError(f"--llama exports a Transfusion model's text weights; {ckpt_path} holds a {class_path}")
        with atomic_folder(output, "Llama folder") as folder:  # whole or not at all, as save_pretrained
            save_llama(module.model, module.tokenizer.path, folder)
    else:
        module.save_pretrained(output)
    return output


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="transfusion export", description="Export the weights of a checkpoint as "
                                     "safetensors, with config.json (and tokenizer.model) beside them.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `transfusion fit`")
    parser.add_argument("--output", required=True, help="folder to write (created if missing)")
    parser.add_argument("--llama", "--text_model", dest="llama", action="store_true", help="a Transfusion model's "
                        "text weights as a Hugging Face causal-LM folder in the layout of the family it started from "
                        "(Llama, Mistral, Qwen2, Qwen3: config.json, model.safetensors, the tokenizer), for "
                        "--model.init_args.text_model or transformers")
    parser.add_argument("--weights", default="ema", help="for a checkpoint with EMA weights: ema (the first EMA's, "
                        "the default), raw (the trained weights themselves) or an EMA's name, e.g. ema_0.9999")
    args = parser.parse_args(argv)
    try:
        output = export(args.ckpt_path, args.output, llama=args.llama, weights=args.weights)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"transfusion export: error: {error}\n")
    print(f"wrote {output / WEIGHTS} and {output / CONFIG}")
