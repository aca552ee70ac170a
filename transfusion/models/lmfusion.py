"""Starting Transfusion from a pretrained text model (LMFusion, Shi et al. 2024).

The text model's weights (token embedding, LM head, every block's norms, attention projections and FFN,
the final norm) become the text weights of a Mixture-of-Transformers Transfusion; the image weights of each
block start as copies of them, and the patch layers from scratch. Frozen text weights keep text ability
exactly: a text-only sequence passes only through them, so its logits never change.

Frozen, the embedding and the LM head still train the rows of Transfusion's own tokens (BOI, EOI, and the specials
appended after the text model's vocabulary), so the model learns to start an image: ``SpecialRows`` holds them as
a parameter of their own beside the frozen table (so weight decay and gradient clipping cannot touch the other rows)
and merges them back into ``weight`` in state dicts, whose layout stays that of ``nn.Embedding`` / ``nn.Linear``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.models.transformer import is_image_weight


def is_text_weight(name: str) -> bool:
    """Parameters a text position passes through: all but the image weights and the patch layers."""
    return not (is_image_weight(name) or name.startswith(("patch_encoder.", "patch_decoder.")))


EXTENDABLE = ("embedding.weight", "lm_head.weight")  # may have rows past the text model's: appended special tokens


def _check_text_state(params: dict, state: dict[str, torch.Tensor]) -> None:
    """ValueError naming what of the text model's ``state`` does not fit parameters ``params`` (global shapes)."""
    unknown = sorted(set(state) - set(params))
    missing = sorted(n for n in params if is_text_weight(n) and n not in state and not n.endswith(".special_rows"))
    if unknown or missing:
        raise ValueError(f"the text model does not fit this Transfusion: unknown {unknown[:5]}, missing {missing[:5]}")
    for name, value in state.items():
        p, rows = params[name], value.shape[0]
        if value.shape[1:] != p.shape[1:] or rows > p.shape[0] or (rows != p.shape[0] and name not in EXTENDABLE):
            raise ValueError(f"text model weight {name} has shape {tuple(value.shape)}, this model {tuple(p.shape)}")


def _image_source(name: str) -> str | None:
    """The text weight an image weight starts as (LMFusion); None for other parameters."""
    if ".image." in name:
        return name.replace(".image.", ".", 1)
    return name.replace("image_norm", "norm") if "image_norm" in name else None


@torch.no_grad()
def load_text_weights(model: nn.Module, state: dict[str, torch.Tensor], image_from_text: bool = True) -> None:
    """Copy a text model's weights (our names, ``transfusion.models.llama``) into ``model``; the embedding and LM
    head may have more rows than the text model (special tokens appended to its tokenizer): those keep their
    initialisation. ``image_from_text``: the image weights start as copies of the text weights."""
    params = dict(model.named_parameters())
    _check_text_state(params, state)
    for name, value in state.items():
        params[name][:value.shape[0]].copy_(value.to(params[name].dtype))
    for layer in model.modules():  # frozen text weights: the trained rows start as loaded (or initialised)
        if isinstance(layer, SpecialRows):
            layer.special_rows.copy_(layer.weight[layer.ids])
    if image_from_text:
        for name, p in params.items():
            if _image_source(name):
                p.copy_(params[_image_source(name)])


@torch.no_grad()
def load_text_weights_sharded(model: nn.Module, read_state: Callable[[], dict[str, torch.Tensor]],
                              image_from_text: bool = True) -> None:
    """``load_text_weights`` for a model sharded by FSDP2 (DTensor parameters), on every process: ``read_state``
    runs on rank 0 only, which broadcasts each tensor and every rank keeps its shard
    (``set_model_state_dict(broadcast_from_rank0=True)``), so one process at a time holds the text model in
    memory. Rank 0's errors are raised on every rank. Frozen special rows (``SpecialRows``) are not supported."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, SpecialRows) for m in model.modules()):
        raise NotImplementedError("load_text_weights_sharded of a model with SpecialRows")
    params = dict(model.named_parameters())
    rank0 = dist.get_rank() == 0
    # the embedding and LM head rows past the text model's keep their initialisation: gathered whole (all ranks)
    current = {n: (params[n].full_tensor() if isinstance(params[n], DTensor) else params[n]).cpu() for n in EXTENDABLE}
    full, error = {}, None
    if rank0:
        try:
            state = read_state()
            _check_text_state(params, state)
            for name, value in state.items():
                dtype = params[name].dtype
                full[name] = (torch.cat([value.to(dtype), current[name][value.shape[0]:]]) if name in EXTENDABLE
                              else value.to(dtype))
            if image_from_text:
                full.update({n: full[_image_source(n)] for n in params if _image_source(n)})
        except Exception as e:  # noqa: BLE001  (re-raised on every rank, so none waits for a broadcast)
            error = f"{type(e).__name__}: {e}"
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ValueError(f"loading the text model (rank 0): {message[0]}")
    del current
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))  # the patch layers keep theirs


class SpecialRows(nn.Module):
    """A frozen embedding table or LM head (``weight``, (V, D)) whose rows ``ids`` train, as ``special_rows``."""

    def __init__(self, layer: nn.Embedding | nn.Linear, ids):
        super().__init__()
        from torch.distributed.tensor import DTensor

        if isinstance(layer.weight, DTensor):
            raise NotImplementedError("SpecialRows of a sharded (FSDP2) layer")
        if getattr(layer, "bias", None) is not None or getattr(layer, "padding_idx", None) is not None:
            raise ValueError("SpecialRows takes a bias-free nn.Linear or an nn.Embedding without padding_idx")
        self.is_embedding = isinstance(layer, nn.Embedding)
        self.weight = layer.weight.requires_grad_(False)
        ids = torch.as_tensor(sorted(set(int(i) for i in ids)), dtype=torch.long, device=self.weight.device)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.weight.shape[0]:
            raise ValueError(f"special rows {ids.tolist()} must be non-empty rows of a table of {self.weight.shape[0]}")
        self.register_buffer("ids", ids, persistent=False)
        row_of = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=ids.device)
        self.register_buffer("row_of", row_of.index_copy(0, ids, torch.arange(len(ids), device=ids.device)),
                             persistent=False)  # id -> its row in special_rows, -1 for frozen ids
        self.special_rows = nn.Parameter(self.weight.detach()[ids].clone())
        self.register_state_dict_post_hook(self._merge)
        self.register_load_state_dict_pre_hook(self._split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:  # tokens (...) -> (..., D): special ids from special_rows
            row = self.row_of[x]
            special = F.embedding(row.clamp_min(0), self.special_rows)
            return torch.where((row >= 0).unsqueeze(-1), special, F.embedding(x, self.weight))
        logits = F.linear(x, self.weight)  # hidden (..., D) -> (..., V): the special columns from special_rows
        return logits.index_copy(-1, self.ids, F.linear(x, self.special_rows).to(logits.dtype))

    @staticmethod
    def _merge(module, state_dict, prefix, local_metadata) -> None:
        """State dicts hold one ``weight`` with the special rows in place, as the layer it replaced had."""
        rows = state_dict.pop(prefix + "special_rows")
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"].detach().index_copy(0, module.ids, rows.detach())

    @staticmethod
    def _split(module, state_dict, prefix, *args) -> None:
        if prefix + "weight" in state_dict and prefix + "special_rows" not in state_dict:
            weight = state_dict[prefix + "weight"]
            state_dict[prefix + "special_rows"] = weight[module.ids.to(weight.device)]


def freeze_text_weights(model: nn.Module, special_ids=()) -> int:
    """Stop training the text weights but for the embedding and LM head rows of ``special_ids`` (``SpecialRows``);
    returns how many parameters stay trainable."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        p.requires_grad_(not is_text_weight(name) or name.endswith(".special_rows"))
    sharded = any(isinstance(getattr(model, n).weight, DTensor) for n in ("embedding", "lm_head"))
    if sharded and len(special_ids):  # FSDP2 manages the parameters it sharded: no new ones after it
        warnings.warn("freeze_text with a sharded model (FSDP2): the special tokens' rows stay frozen too")
    elif len(special_ids):
        for name in ("embedding", "lm_head"):
            layer = getattr(model, name)
            if not isinstance(layer, SpecialRows):
                setattr(model, name, SpecialRows(layer, special_ids))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
