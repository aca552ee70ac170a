"""Hugging Face causal-LM checkpoints <-> the Transfusion text model (embedding, transformer, LM head).

The families our transformer computes exactly: ``LlamaForCausalLM`` (Llama 2/3.x, SmolLM2), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (Qwen2.5) and ``Qwen3ForCausalLM``. A folder holds ``config.json``, ``model.safetensors`` (or
shards listed in ``model.safetensors.index.json``) and a tokenizer (SentencePiece ``tokenizer.model`` or
``tokenizer.json``). Weights map one to one onto our blocks (same rotate-half RoPE):

* ``model.embed_tokens`` -> ``embedding``; ``lm_head`` (the embedding when tied) -> ``lm_head``;
* per layer: ``q_proj``, ``k_proj``, ``v_proj`` -> ``attention.wqkv`` (rows concatenated; biases too, Qwen2),
  ``q_norm``, ``k_norm`` -> ``attention.q_norm``, ``attention.k_norm`` (Qwen3), ``o_proj`` -> ``attention.wo``,
  ``gate_proj``, ``up_proj`` -> ``ffn.w13``, ``down_proj`` -> ``ffn.w2``, ``input_layernorm`` -> ``attention_norm``,
  ``post_attention_layernorm`` -> ``ffn_norm``; ``model.norm`` -> ``transformer.norm``.

Grouped-query attention, a ``head_dim`` of its own, RoPE scaling (``llama3``, ``linear``, ``dynamic``) map onto
``TransformerConfig`` switches. Refused, naming the field, since our transformer cannot compute them exactly: other
model types, activations other than SiLU, an ``o_proj`` or MLP bias (``attention_bias`` of Llama / Qwen3,
``mlp_bias``), other RoPE types (YaRN, LongRoPE) or partial rotary, a sliding window shorter than
``max_position_embeddings`` (it would change attention); on saving, the Chameleon switches (``qk_norm``,
``norm_reorder``) and switches the family cannot hold. Saving writes the family the weights came from
(``TransformerConfig.architecture``), text weights only: patch layers and Mixture-of-Transformers image weights
(``.image.``, ``image_norm``) stay behind. The vocabulary is the checkpoint's: specials our ``Tokenizer`` appends
(PAD, BOI, EOI) are not in it. Pickled checkpoints (``pytorch_model.bin``) are not read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from transfusion.models.transformer import ROPE_SCALING, TransformerConfig, is_image_weight

CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_JSON = "config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"
INDEX = "model.safetensors.index.json"  # the shards of a sharded checkpoint
ARCHITECTURE = "LlamaForCausalLM"
# model_type -> (architecture, qkv_bias, qk_rmsnorm): what each family's attention always has
FAMILIES = {"llama": (ARCHITECTURE, False, False), "mistral": ("MistralForCausalLM", False, False),
            "qwen2": ("Qwen2ForCausalLM", True, False), "qwen3": ("Qwen3ForCausalLM", False, True)}
IGNORED_LLAMA = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints store: recomputed, not loaded
TEXT_ONLY_PREFIXES = ("patch_encoder.", "patch_decoder.")  # ours, with no Llama counterpart
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")  # copied on save


def read_llama_config(directory: str | os.PathLike) -> dict:
    """``TransformerConfig`` keyword arguments plus ``vocab_size`` and ``tie_word_embeddings`` from the
    ``config.json`` of a supported family; raises ValueError naming the file and field of anything our transformer
    cannot represent."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; is {str(directory)!r} a Hugging Face model folder?")
    config = json.loads(path.read_text())

    def refuse(field: str, why: str):
        raise ValueError(f"{path}: {field}={config.get(field)!r}: {why}")

    def required(field: str):
        if config.get(field) is None:
            raise ValueError(f"{path}: {field} is missing")
        return config[field]

    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        refuse("model_type", f"not a supported causal-LM family (one of {sorted(FAMILIES)})")
    architecture, qkv_bias, qk_rmsnorm = FAMILIES[model_type]
    if config.get("architectures") not in (None, [architecture]):
        refuse("architectures", f"only [{architecture!r}] is supported for model_type {model_type!r}")
    dim, n_heads = required("hidden_size"), required("num_attention_heads")
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        refuse("num_key_value_heads", f"must divide num_attention_heads={n_heads}")
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only 'silu' (SwiGLU) is supported")
    if config.get("mlp_bias"):
        refuse("mlp_bias", "biases are not supported in the MLP (our FFN has none)")
    if config.get("attention_bias"):  # Llama and Qwen3: on o_proj too; Qwen2's q/k/v biases need no field
        refuse("attention_bias", "an o_proj bias is not supported (only q/k/v biases, as Qwen2 has)")
    head_dim = config.get("head_dim") or (dim // n_heads)
    if config.get("head_dim") is None and dim % n_heads:
        refuse("head_dim", f"is needed: hidden_size={dim} is not a multiple of num_attention_heads={n_heads}")
    max_seq_len = config.get("max_position_embeddings", 2048)
    _check_sliding_window(config, max_seq_len, refuse)
    return {
        "n_layers": required("num_hidden_layers"),
        "dim": dim,
        "n_heads": n_heads,
        "ffn_dim": required("intermediate_size"),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "max_seq_len": max_seq_len,
        **_rope(config, max_seq_len, refuse),  # rope_theta, rope_type and its parameters
        # the defaults (None / False) where the family's attention is the original one: they equal a preset's
        "n_kv_heads": None if n_kv_heads == n_heads else n_kv_heads,
        "head_width": None if dim % n_heads == 0 and head_dim == dim // n_heads else head_dim,
        "qkv_bias": qkv_bias,
        "qk_rmsnorm": qk_rmsnorm,
        "architecture": None if architecture == ARCHITECTURE else architecture,
        "vocab_size": required("vocab_size"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def _check_sliding_window(config: dict, max_seq_len: int, refuse) -> None:
    """A sliding window is accepted only where it cannot change attention: absent, or no shorter than the context."""
    window = config.get("sliding_window")
    if config["model_type"] == "mistral":  # every layer slides when sliding_window is set
        windowed = window is not None
    else:  # Qwen2/3: the layers of layer_types (transformers 5) or use_sliding_window (4) slide
        windowed = "sliding_attention" in (config.get("layer_types") or []) or bool(config.get("use_sliding_window"))
    if windowed and window is not None and window < max_seq_len:
        refuse("sliding_window", f"a sliding window shorter than max_position_embeddings={max_seq_len} changes "
                                 f"attention; our attention is causal over the whole document")


def _rope(config: dict, max_seq_len: int, refuse) -> dict:
    """``TransformerConfig``'s RoPE fields (base, ``rope_type`` and its parameters) from ``rope_parameters``
    (transformers 5) or ``rope_theta`` and ``rope_scaling`` (4)."""
    def kind_of(params: dict) -> str:
        return params.get("rope_type", params.get("type", "default"))

    for name in ("rope_parameters", "rope_scaling"):
        if kind_of(config.get(name) or {}) not in ("default", *ROPE_SCALING):
            refuse(name, f"RoPE type {kind_of(config[name])!r} is not supported (only 'default', "
                         f"{', '.join(map(repr, ROPE_SCALING))})")
    scaled = [name for name in ("rope_parameters", "rope_scaling") if kind_of(config.get(name) or {}) != "default"]
    field = scaled[0] if scaled else "rope_parameters"
    params = config.get(field) or {}
    kind = kind_of(params)
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "partial rotary embeddings are not supported")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(field, "partial rotary embeddings (partial_rotary_factor) are not supported")
    theta = params.get("rope_theta", config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta")))
    fields = {"rope_theta": float(10_000.0 if theta is None else theta), "rope_type": kind}
    missing = [k for k in ROPE_SCALING.get(kind, ()) if k not in params and k != "original_max_position_embeddings"]
    if missing:
        refuse(field, f"RoPE type {kind!r} needs {missing}")
    ours = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor", "high_freq_factor":
            "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_max_seq_len"}
    fields.update({ours[k]: params[k] for k in ROPE_SCALING.get(kind, ()) if k in params})
    if fields.get("rope_original_max_seq_len") == max_seq_len:
        fields["rope_original_max_seq_len"] = None  # the default
    return fields


def _name_map(n_layers: int, tie_word_embeddings: bool = False, qkv_bias: bool = False,
              qk_rmsnorm: bool = False) -> dict[str, tuple[str, ...]]:
    """Our tensor name -> the Hugging Face names whose rows it concatenates, in order."""
    names = {"embedding.weight": ("model.embed_tokens.weight",)}
    for i in range(n_layers):
        hf, ours = f"model.layers.{i}.", f"transformer.layers.{i}."
        names[ours + "attention_norm.weight"] = (hf + "input_layernorm.weight",)
        names[ours + "attention.wqkv.weight"] = tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv")
        if qkv_bias:
            names[ours + "attention.wqkv.bias"] = tuple(f"{hf}self_attn.{p}_proj.bias" for p in "qkv")
        if qk_rmsnorm:
            names[ours + "attention.q_norm.weight"] = (hf + "self_attn.q_norm.weight",)
            names[ours + "attention.k_norm.weight"] = (hf + "self_attn.k_norm.weight",)
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


def llama_to_transfusion(state: dict, n_layers: int, tie_word_embeddings: bool, qkv_bias: bool = False,
                         qk_rmsnorm: bool = False) -> dict:
    """Hugging Face tensors -> ours; raises ValueError naming missing or unexpected tensors."""
    names = _name_map(n_layers, tie_word_embeddings, qkv_bias, qk_rmsnorm)

    def ignored(k: str) -> bool:
        return k.endswith(IGNORED_LLAMA) or (tie_word_embeddings and k == "lm_head.weight")

    _check_names(state, {n for hf in names.values() for n in hf}, ignored, "the Llama weights")
    return {ours: state[hf[0]] if len(hf) == 1 else torch.cat([state[n] for n in hf]) for ours, hf in names.items()}


def transfusion_to_llama(state: dict, n_layers: int, cfg: TransformerConfig | None = None,
                         tie_word_embeddings: bool = False) -> dict:
    """Our text tensors -> Hugging Face names, each its own contiguous tensor (``cfg`` gives the q/k/v row split of
    grouped-query attention and the family's extra tensors; None: plain multi-head Llama); patch layers and
    Mixture-of-Transformers image weights (``.image.``, ``image_norm``) are left out; any other unknown tensor
    raises ValueError. ``tie_word_embeddings``: no ``lm_head.weight`` (the embedding serves)."""
    qkv_bias, qk_rmsnorm = (cfg.qkv_bias, cfg.qk_rmsnorm) if cfg is not None else (False, False)
    names = _name_map(n_layers, False, qkv_bias, qk_rmsnorm)

    def ignored(k: str) -> bool:
        return k.startswith(TEXT_ONLY_PREFIXES) or is_image_weight(k)

    _check_names(state, set(names), ignored, "the Transfusion weights")
    out = {}
    for ours, hf in names.items():
        tensor = state[ours].detach()
        if len(hf) == 3 and cfg is not None:  # q, k, v: H and Hkv heads of Dh rows
            parts = tensor.split([cfg.n_heads * cfg.head_dim] + 2 * [cfg.kv_heads * cfg.head_dim])
        else:
            parts = tensor.chunk(len(hf))
        for name, part in zip(hf, parts):
            out[name] = part.clone(memory_format=torch.contiguous_format)
    if tie_word_embeddings:
        del out["lm_head.weight"]
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
    """(config, state) of a supported folder: ``read_llama_config``'s dict plus ``tokenizer_path`` (the folder's
    ``tokenizer.model``, else its ``tokenizer.json``), and the weights under our names (``llama_to_transfusion``)."""
    directory = Path(directory)
    config = read_llama_config(directory)
    tokenizer = next((directory / name for name in (TOKENIZER, TOKENIZER_JSON) if (directory / name).is_file()), None)
    if tokenizer is None:
        raise FileNotFoundError(f"{str(directory)!r} has no tokenizer: neither the SentencePiece {TOKENIZER} nor the "
                                f"Hugging Face {TOKENIZER_JSON}")
    state = llama_to_transfusion(_read_weights(directory), config["n_layers"], config["tie_word_embeddings"],
                                 config["qkv_bias"], config["qk_rmsnorm"])
    return {**config, "tokenizer_path": str(tokenizer)}, state


def _family(cfg: TransformerConfig) -> tuple[str, str]:
    """(model_type, architecture) to save ``cfg`` as: the one it was loaded from, else the family its switches
    need; ValueError naming a switch the family cannot hold."""
    if cfg.qk_norm or cfg.norm_reorder:
        raise ValueError("qk_norm / norm_reorder (Chameleon) have no Llama equivalent; this model cannot be saved "
                         "as a Hugging Face causal-LM checkpoint")
    architecture = cfg.architecture or (FAMILIES["qwen2"][0] if cfg.qkv_bias else FAMILIES["qwen3"][0]
                                        if cfg.qk_rmsnorm else ARCHITECTURE)
    model_type = next((t for t, (a, _, _) in FAMILIES.items() if a == architecture), None)
    if model_type is None:
        raise ValueError(f"architecture={architecture!r} cannot be saved; supported: "
                         f"{sorted(a for a, _, _ in FAMILIES.values())}")
    _, qkv_bias, qk_rmsnorm = FAMILIES[model_type]
    for name, needed in (("qkv_bias", qkv_bias), ("qk_rmsnorm", qk_rmsnorm)):
        if getattr(cfg, name) != needed:
            raise ValueError(f"{name}={getattr(cfg, name)} cannot be saved as {architecture} (which has {needed})")
    return model_type, architecture


def _special_ids(tokenizer_path: Path) -> tuple[int | None, int | None]:
    """BOS and EOS ids: the SentencePiece model's, or (``tokenizer.json``) those of the config.json beside it."""
    if tokenizer_path.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        return (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)
    beside = tokenizer_path.parent / CONFIG
    config = json.loads(beside.read_text()) if beside.is_file() else {}
    return config.get("bos_token_id"), config.get("eos_token_id")


def llama_config(model, tokenizer_path: str | os.PathLike, tie_word_embeddings: bool = False) -> dict:
    """The ``config.json`` of a ``Transfusion`` model's text part, in its family's layout."""
    cfg = model.cfg.transformer
    model_type, architecture = _family(cfg)
    bos, eos = _special_ids(Path(tokenizer_path))
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_parameters": rope,  # transformers 5
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": model.cfg.vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = rope  # transformers 4
    if model_type in ("llama", "qwen3"):
        config["attention_bias"] = False
    if model_type == "llama":
        config["mlp_bias"] = False
    if model_type == "mistral":
        config["sliding_window"] = None
    if model_type.startswith("qwen"):
        config.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * cfg.n_layers)
    return config


def save_llama(model, tokenizer_path: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Write a ``Transfusion`` model's text part as a Hugging Face folder of its family: ``config.json``,
    ``model.safetensors`` (the LM head tied to the embedding when they are equal) and a copy of ``tokenizer_path``
    (with the tokenizer and generation configs beside it, if any)."""
    tokenizer_path, directory = Path(tokenizer_path), Path(directory)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model {str(tokenizer_path)!r} does not exist")
    tied = torch.equal(model.embedding.weight, model.lm_head.weight)
    config = llama_config(model, tokenizer_path, tie_word_embeddings=tied)
    state = transfusion_to_llama(model.state_dict(), model.cfg.transformer.n_layers, model.cfg.transformer, tied)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    name = TOKENIZER if tokenizer_path.suffix == ".model" else TOKENIZER_JSON
    beside = [f for f in SPECIAL_FILES if name == TOKENIZER_JSON and (tokenizer_path.parent / f).is_file()]
    for source, target in [(tokenizer_path, directory / name)] + [(tokenizer_path.parent / f, directory / f) for f in beside]:
        if not target.exists() or not target.samefile(source):
            shutil.copyfile(source, target)
    if name == TOKENIZER_JSON and SPECIAL_FILES[0] not in beside:  # what transformers' AutoTokenizer reads
        (directory / SPECIAL_FILES[0]).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
