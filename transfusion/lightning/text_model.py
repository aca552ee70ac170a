"""LMFusion's start from a pretrained text model (Shi et al. 2024): a Hugging Face Llama-layout folder gives
``TransfusionModule`` its transformer shape and tokenizer when the module is built (``text_model_settings``) and
its text weights at the start of a fresh ``fit`` (``load_text_model``); the options that go with it are checked
together (``check_text_options``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

from transfusion.data.tokenizer import find_tokenizer
from transfusion.models.llama import load_llama, read_llama_config
from transfusion.models.lmfusion import load_text_weights, load_text_weights_sharded
from transfusion.models.transformer import TransformerConfig


@dataclass(frozen=True)
class TextModelSettings:
    transformer: dict  # the TransformerConfig fields of the text model's shape
    tokenizer: str  # the module's tokenizer option, else the text model's tokenizer.model (or tokenizer.json)
    vocab_size: int  # the text model's vocabulary: the embedding is at least this large


def check_text_options(text_model: str | None, init_from: str | None, freeze_text: bool, text_lr: float | None,
                       modality_experts: bool) -> None:
    """The options about pretrained text weights that contradict each other, named (before any file is read)."""
    if freeze_text and not modality_experts:
        raise ValueError("freeze_text needs modality_experts: true (a dense model would train only its patch layers)")
    if freeze_text and text_lr is not None:
        raise ValueError("model option text_lr is for text weights that train: it has no use with freeze_text")
    if text_model is not None and init_from:
        raise ValueError("model options text_model and init_from both give the starting weights: set one")


def text_model_settings(text_model: str, tokenizer: str | None, preset: str | None,
                        transformer: dict | None) -> TextModelSettings:
    """The shape, tokenizer and vocabulary that ``text_model`` (a folder with ``config.json``) gives the module;
    ``preset`` / ``transformer`` may only restate its shape."""
    shape = read_llama_config(text_model)
    vocab_size = shape.pop("vocab_size")
    shape.pop("tie_word_embeddings", None)
    if preset is not None or transformer:  # they may describe the text model's shape, not another one
        asked = TransformerConfig.from_name(preset or "debug", **(transformer or {}))
        differs = {k: (getattr(asked, k), v) for k, v in shape.items() if getattr(asked, k) != v}
        if differs:
            raise ValueError(f"model options preset/transformer differ from the shape of text_model "
                             f"{text_model!r} (option, text model): {differs}; leave them out")
    return TextModelSettings(dict(shape), tokenizer or str(find_tokenizer(text_model)), vocab_size)


def load_text_model(model: nn.Module, directory: str, image_weights_from_text: bool) -> None:
    """The text model's weights as ``model``'s text weights (``transfusion.models.lmfusion``); sharded (FSDP2)
    parameters are read on rank 0 and broadcast."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        load_text_weights_sharded(model, lambda: load_llama(directory)[1], image_weights_from_text)
    else:
        load_text_weights(model, load_llama(directory)[1], image_weights_from_text)
    rank_zero_info(f"text weights from {directory}" + (" (image weights copied from them)"
                                                        if image_weights_from_text else ""))
