"""Hugging Face Llama checkpoints <-> the Transfusion text model (embedding, transformer, LM head).

A Llama folder holds ``config.json``, ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``)
and the tokenizer (SentencePiece ``tokenizer.model`` or Hugging Face ``tokenizer.json``). Weights map one to one
onto our blocks (same rotate-half RoPE):

* ``model.embed_tokens`` -> ``embedding``; ``lm_head`` (the embedding when tied) -> ``lm_head``;
* per layer: ``q_proj``, ``k_proj``, ``v_proj`` -> ``attention.wqkv`` (rows concatenated), ``o_proj`` ->
  ``attention.wo``, ``gate_proj``, ``up_proj`` -> ``ffn.w13``, ``down_proj`` -> ``ffn.w2``, ``input_layernorm`` ->
  ``attention_norm``, ``post_attention_layernorm`` -> ``ffn_norm``; ``model.norm`` -> ``transformer.norm``.

Refused, since our transformer cannot compute them exactly: other model types, grouped-query attention
(``num_key_value_heads`` != ``num_attention_heads``), activations other than SiLU, RoPE scaling, biases, a
``head_dim`` other than ``hidden_size / num_attention_heads``; on saving, the Chameleon switches (``qk_norm``,
``norm_reorder``). Only text weights are saved: patch layers and Mixture-of-Transformers image weights (``.image.``,
``image_norm``) stay behind.
The vocabulary is the checkpoint's: specials our ``Tokenizer`` appends (PAD, BOI, EOI) are not in it.
Pickled checkpoints (``pytorch_model.bin``) are not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transfusion.data.tokenizer import Tokenizer, find_tokenizer
from transfusion.models.transformer import is_image_weight

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.model"
INDEX = "model.safetensors.index.json"  # the shards of a sharded checkpoint
ARCHITECTURE = "LlamaForCausalLM"
IGNORED_LLAMA = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints store: recomputed, not loaded
TEXT_ONLY_PREFIXES = ("patch_encoder.", "patch_decoder.", "diffusion.")  # ours, with no Llama counterpart


def read_llama_config(directory: str | os.PathLike) -> dict:
    """``TransformerConfig`` keyword arguments plus ``vocab_size`` and ``tie_word_embeddings`` from a Llama
    ``config.json``; raises ValueError naming the file and field of anything our transformer cannot represent."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; is {str(directory)!r} a Hugging Face Llama folder?")
    config = json.loads(path.read_text())

    def refuse(field: str, why: str):
        raise ValueError(f"{path}: {field}={config.get(field)!r}: {why}")

    def required(field: str):
        if config.get(field) is None:
            raise ValueError(f"{path}: {field} is missing")
        return config[field]

    if config.get("model_type") != "llama":
        refuse("model_type", "not a Llama model (model_type 'llama' expected)")
    if config.get("architectures") not in (None, [ARCHITECTURE]):
        refuse("architectures", f"only [{ARCHITECTURE!r}] is supported")
    dim, n_heads = required("hidden_size"), required("num_attention_heads")
    if config.get("num_key_value_heads", n_heads) not in (None, n_heads):
        refuse("num_key_value_heads", f"grouped-query attention (num_attention_heads={n_heads}) is not supported; "
                                      f"our attention has as many key/value heads as query heads")
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only 'silu' (SwiGLU) is supported")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            refuse(field, "biases are not supported (our linear layers have none)")
    if config.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        refuse("head_dim", f"must be hidden_size / num_attention_heads = {dim} / {n_heads}")
    return {
        "n_layers": required("num_hidden_layers"),
        "dim": dim,
        "n_heads": n_heads,
        "ffn_dim": required("intermediate_size"),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(config, refuse),
        "max_seq_len": config.get("max_position_embeddings", 2048),
        "vocab_size": required("vocab_size"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def _rope_theta(config: dict, refuse) -> float:
    """The RoPE base of a plain (unscaled) RoPE: ``rope_parameters`` (transformers 5) or ``rope_theta``."""
    if config.get("rope_scaling") and _rope_type(config["rope_scaling"]) != "default":
        refuse("rope_scaling", "RoPE scaling is not supported")
    params = config.get("rope_parameters") or {}
    if _rope_type(params) != "default":
        refuse("rope_parameters", "RoPE scaling is not supported (only rope_type 'default')")
    return float(params.get("rope_theta", config.get("rope_theta", 10_000.0)))


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _name_map(n_layers: int, tie_word_embeddings: bool = False) -> dict[str, tuple[str, ...]]:
    """Our tensor name -> the Llama names whose rows it concatenates, in order."""
    names = {"embedding.weight": ("model.embed_tokens.weight",)}
    for i in range(n_layers):
        hf, ours = f"model.layers.{i}.", f"transformer.layers.{i}."
        names[ours + "attention_norm.weight"] = (hf + "input_layernorm.weight",)
        names[ours + "attention.wqkv.weight"] = tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv")
        names[ours + "attention.wo.weight"] = (hf + "self_attn.o_proj.weight",)
        names[ours + "ffn_norm.weight"] = (hf + "post_attention_layernorm.weight",)
        names[ours + "ffn.w13.weight"] = (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        names[ours + "ffn.w2.weight"] = (hf + "mlp.down_proj.weight",)
    names["transformer.norm.weight"] = ("model.norm.weight",)
    names["lm_head.weight"] = ("model.embed_tokens.weight",) if tie_word_embeddings else ("lm_head.weight",)
    return names


def _check_names(have, needed: set[str], ignored, what: str) -> None:
    missing = sorted(needed - set(have))
    unexpected = sorted(k for k in have if k not in needed and not ignored(k))
    if missing or unexpected:
        raise ValueError(f"{what} do not fit the Llama mapping: missing {missing}, unexpected {unexpected}")


def llama_to_transfusion(state: dict, n_layers: int, tie_word_embeddings: bool) -> dict:
    """Llama (``LlamaForCausalLM``) tensors -> ours; raises ValueError naming missing or unexpected tensors."""
    names = _name_map(n_layers, tie_word_embeddings)

    def ignored(k: str) -> bool:
        return k.endswith(IGNORED_LLAMA) or (tie_word_embeddings and k == "lm_head.weight")

    _check_names(state, {n for hf in names.values() for n in hf}, ignored, "the Llama weights")
    return {ours: state[hf[0]] if len(hf) == 1 else torch.cat([state[n] for n in hf]) for ours, hf in names.items()}


def transfusion_to_llama(state: dict, n_layers: int) -> dict:
    """Our text tensors -> Llama names (untied ``lm_head``), each its own contiguous tensor; patch layers and
    Mixture-of-Transformers image weights (``.image.``, ``image_norm``) are left out; any other unknown tensor
    raises ValueError."""
    names = _name_map(n_layers)

    def ignored(k: str) -> bool:
        return k.startswith(TEXT_ONLY_PREFIXES) or is_image_weight(k)

    _check_names(state, set(names), ignored, "the Transfusion weights")
    out = {}
    for ours, hf in names.items():
        for name, part in zip(hf, state[ours].detach().chunk(len(hf))):
            out[name] = part.clone(memory_format=torch.contiguous_format)
    return out


def _read_weights(directory: Path) -> dict:
    if (directory / WEIGHTS).is_file():
        return load_file(directory / WEIGHTS)
    if (directory / INDEX).is_file():
        shards = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise FileNotFoundError(f"{str(directory)!r} has neither {WEIGHTS} nor {INDEX} (pickled checkpoints such as "
                            f"pytorch_model.bin are not read: convert them to safetensors)")


def load_llama(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(config, state) of a Llama folder: ``read_llama_config``'s dict plus ``tokenizer_path`` (the folder's
    ``tokenizer.model`` or ``tokenizer.json``), and the weights under our names (``llama_to_transfusion``)."""
    directory = Path(directory)
    config = read_llama_config(directory)
    tokenizer = find_tokenizer(directory)  # tokenizer.model, else tokenizer.json
    state = llama_to_transfusion(_read_weights(directory), config["n_layers"], config["tie_word_embeddings"])
    return {**config, "tokenizer_path": str(tokenizer)}, state


def llama_config(model, tokenizer_path: str | os.PathLike) -> dict:
    """The ``config.json`` (a ``LlamaConfig``) of a ``Transfusion`` model's text part."""
    cfg = model.cfg.transformer
    if cfg.qk_norm or cfg.norm_reorder:
        raise ValueError("qk_norm / norm_reorder (Chameleon) have no Llama equivalent; this model cannot be saved "
                         "as a Llama checkpoint")
    tokenizer = Tokenizer(tokenizer_path)
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": model.cfg.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "dtype": dtype,
    }


def save_llama(model, tokenizer_path: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Write a ``Transfusion`` model's text part as a Llama folder: ``config.json``, ``model.safetensors`` and a
    copy of the tokenizer (``tokenizer.model``, or ``tokenizer.json`` and its ``tokenizer_config.json``)."""
    tokenizer_path, directory = Path(tokenizer_path), Path(directory)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model {str(tokenizer_path)!r} does not exist")
    config = llama_config(model, tokenizer_path)
    state = transfusion_to_llama(model.state_dict(), model.cfg.transformer.n_layers)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    Tokenizer(tokenizer_path).save(directory)  # tokenizer.model, or tokenizer.json and tokenizer_config.json
