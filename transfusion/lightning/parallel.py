"""FSDP2 through Lightning's ``ModelParallelStrategy``: each transformer block is one sharding unit.

``FSDP2Strategy`` is ``ModelParallelStrategy`` with every process in the data-parallel dimension of the
device mesh (``ModelParallelStrategy`` defaults to one data-parallel rank per node and the devices of a
node in the tensor-parallel dimension, whose ranks see the same batch). ``fully_shard_blocks`` shards
every block, then the whole model (embedding, LM head, patch layers, final norm), so that a block's
parameters are gathered just before it runs and freed after. Tensor parallelism is not implemented.
``consolidate_checkpoint`` (``transfusion consolidate``) turns a sharded checkpoint into one file.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes of all nodes; the other arguments are ``ModelParallelStrategy``'s."""

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def fully_shard_blocks(model: nn.Module, mesh) -> None:
    """Shard ``model.transformer.layers`` block by block, then the rest of ``model``, in place, over the
    ``data_parallel`` dimension of a ``ModelParallelStrategy`` mesh."""
    from torch.distributed.fsdp import fully_shard

    if mesh.ndim == 2:
        if mesh["tensor_parallel"].size() > 1:
            raise NotImplementedError(
                f"tensor parallelism is not implemented (tensor_parallel_size={mesh['tensor_parallel'].size()}): "
                "use transfusion.lightning.parallel.FSDP2Strategy, or ModelParallelStrategy with "
                "tensor_parallel_size: 1 and data_parallel_size: <all processes>")
        mesh = mesh["data_parallel"]
    for block in model.transformer.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """Turn an FSDP2 checkpoint directory (one ``.distcp`` file of shards per rank, ``meta.pt``) into one
    ``.ckpt`` file that any strategy, ``load_from_checkpoint`` and ``--ckpt_path`` can read.

    Optimizer states are re-keyed from parameter names (the sharded format) to parameter indices in
    ``param_groups`` order (the format of a plain ``torch.optim`` state dict), so training resumes too.
    """
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, output = Path(folder), Path(output)
    if not (folder.is_dir() and (folder / "meta.pt").is_file() and (folder / ".metadata").is_file()):
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint directory (with .metadata and meta.pt)")
    dcp_to_torch_save(folder, output)
    shards = torch.load(output, map_location="cpu", weights_only=False)
    checkpoint = torch.load(folder / "meta.pt", map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = shards.pop("state_dict")
    checkpoint["optimizer_states"] = [_by_index(shards[f"optimizer_{i}"]) for i in range(len(shards))]
    torch.save(checkpoint, output)
    return output


def _by_index(optimizer_state: dict) -> dict:
    """{"state": {name: ...}, "param_groups": [{"params": [name, ...]}]} -> the same keyed 0, 1, 2, ..."""
    index = {name: i for i, name in enumerate(n for g in optimizer_state["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optimizer_state["param_groups"]]
    return {"state": {index[n]: s for n, s in optimizer_state["state"].items()}, "param_groups": groups}
