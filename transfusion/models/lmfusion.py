"""Starting Transfusion from a pretrained text model (LMFusion, Shi et al. 2024).

The text model's weights (token embedding, LM head, every block's norms, attention projections and FFN,
the final norm) become the text weights of a Mixture-of-Transformers Transfusion; the image weights of each
block start as copies of them, and the patch layers from scratch. Frozen text weights keep text ability
exactly: a text-only sequence passes only through them, so its logits never change.

Frozen, the embedding and the LM head still train the rows of Transfusion's own tokens (BOI, EOI, and the specials
appended after the text model's vocabulary), so the model learns to start an image: ``SpecialRows`` holds them as
a parameter of their own beside the frozen table (so weight decay and gradient clipping cannot touch the other rows)
and merges them back into ``weight`` in state dicts, whose layout stays that of ``nn.Embedding`` / ``nn.Linear``.

Under FSDP2 the text model is read on rank 0 and broadcast (``load_text_weights_sharded``), and ``SpecialRows`` is
made before the model is sharded, so its rows are parameters FSDP2 knows.
"""

from __future__ import annotations

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
    (``set_model_state_dict(broadcast_from_rank0=True)``), so only rank 0 holds the whole text model in memory.
    Rank 0's errors are raised on every rank. ``SpecialRows`` take the loaded table's rows (``_split``)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    params = dict(model.named_parameters())
    rank0 = dist.get_rank() == 0
    # the embedding and LM head rows past the text model's keep their initialisation: gathered (a collective), kept
    current = {n: _full(params[n]) for n in EXTENDABLE}  # on rank 0 only
    current = {n: t.cpu() for n, t in current.items()} if rank0 else {}
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
    """A frozen embedding table or LM head (``weight``, (V, D)) whose rows ``ids`` train, as ``special_rows``.

    Under FSDP2 it is made before sharding (on the meta device, ``freeze_text_weights``): after ``to_empty``,
    ``reset_index`` rebuilds its index buffers and ``init_special_rows`` sets the rows; state dicts merge and split
    sharded (DTensor) tensors through their full value."""

    def __init__(self, layer: nn.Embedding | nn.Linear, ids):
        super().__init__()
        from torch.distributed.tensor import DTensor

        if isinstance(layer.weight, DTensor):
            raise NotImplementedError("SpecialRows of a sharded (FSDP2) layer: make it before sharding")
        if getattr(layer, "bias", None) is not None or getattr(layer, "padding_idx", None) is not None:
            raise ValueError("SpecialRows takes a bias-free nn.Linear or an nn.Embedding without padding_idx")
        self.is_embedding = isinstance(layer, nn.Embedding)
        self.weight = layer.weight.requires_grad_(False)
        self.special_ids = sorted(set(int(i) for i in ids))
        if not self.special_ids or self.special_ids[0] < 0 or self.special_ids[-1] >= self.weight.shape[0]:
            raise ValueError(f"special rows {self.special_ids} must be non-empty rows of a table of "
                             f"{self.weight.shape[0]}")
        device = self.weight.device
        self.register_buffer("ids", torch.empty(len(self.special_ids), dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("row_of", torch.empty(self.weight.shape[0], dtype=torch.long, device=device),
                             persistent=False)  # id -> its row in special_rows, -1 for frozen ids
        self.reset_index()
        self.special_rows = nn.Parameter(self.weight.detach()[self.ids].clone())
        self.register_state_dict_post_hook(self._merge)
        self.register_load_state_dict_pre_hook(self._split)

    @torch.no_grad()
    def reset_index(self) -> None:
        """Fill ``ids`` and ``row_of`` (again after ``to_empty``, which leaves buffers uninitialised)."""
        if self.ids.is_meta:
            return
        self.ids.copy_(torch.tensor(self.special_ids))
        self.row_of.fill_(-1).index_copy_(0, self.ids, torch.arange(len(self.special_ids), device=self.ids.device))

    @torch.no_grad()
    def init_special_rows(self) -> None:
        """``special_rows`` = the table's rows ``ids`` (sharded or not)."""
        _assign(self.special_rows, _full(self.weight)[self.ids.to(self.weight.device)])

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
        rows, weight = state_dict.pop(prefix + "special_rows"), state_dict[prefix + "weight"]
        merged = _full(weight).detach().index_copy(0, module.ids.to(weight.device), _full(rows).detach())
        state_dict[prefix + "weight"] = _like(merged, weight)

    @staticmethod
    def _split(module, state_dict, prefix, *args) -> None:
        """``special_rows`` from the loaded ``weight`` (a checkpoint holds them there; under FSDP2 the loader adds
        the current ``special_rows`` too, which the checkpoint's rows replace)."""
        if prefix + "weight" in state_dict:
            weight = state_dict[prefix + "weight"]
            rows = _full(weight)[module.ids.to(weight.device)]
            state_dict[prefix + "special_rows"] = _like(rows, module.special_rows)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor: gathered from every rank if it is sharded (a DTensor: all ranks must call)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard if ``like`` is a DTensor (every rank holds ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, sharded or not."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        param.to_local().copy_(_like(full, param).to_local())
    else:
        param.copy_(full)


def freeze_text_weights(model: nn.Module, special_ids=()) -> int:
    """Stop training the text weights but for the embedding and LM head rows of ``special_ids`` (``SpecialRows``);
    returns how many parameters stay trainable. Under FSDP2, call it before sharding (FSDP2 manages the parameters
    it sharded: none can be added after)."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        p.requires_grad_(not is_text_weight(name) or name.endswith(".special_rows"))
    if len(special_ids):
        for name in ("embedding", "lm_head"):
            layer = getattr(model, name)
            if not isinstance(layer, SpecialRows):
                if isinstance(layer.weight, DTensor):
                    raise NotImplementedError("freeze_text_weights of a sharded (FSDP2) model: call it before "
                                              "fully_shard")
                setattr(model, name, SpecialRows(layer, special_ids))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
