"""FSDP2 through Lightning's ``ModelParallelStrategy``: each transformer block is one sharding unit.

``FSDP2Strategy`` is ``ModelParallelStrategy`` with every process in the data-parallel dimension of the
device mesh (``ModelParallelStrategy`` defaults to one data-parallel rank per node and the devices of a
node in the tensor-parallel dimension, whose ranks see the same batch). ``fully_shard_blocks`` shards
every block, then the whole model (embedding, LM head, patch layers, final norm), so that a block's
parameters are gathered just before it runs and freed after. Tensor parallelism is not implemented.
``consolidate_checkpoint`` (``transfusion consolidate``) turns a sharded checkpoint into one file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemWriter

from transfusion.atomic import free_space, full_disk_error
from transfusion.errors import DiskFullError
from transfusion.lightning.checkpoint import kept


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes of all nodes; the other arguments are ``ModelParallelStrategy``'s."""

    def __init__(self, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """A sharded checkpoint whole or not at all: every rank writes into ``.NAME.tmp/`` beside it, and rank 0
        renames that over ``NAME`` once all have succeeded; a full disk on any rank keeps the previous one and
        raises ``DiskFullError`` on every rank (``transfusion.atomic``). One file (``save_distributed_checkpoint:
        false``) goes through the CheckpointIO, atomic already."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        kept_before = kept(path)  # for the message, as things stand before writing
        tmp = path.with_name(f".{path.name}.tmp")  # one name for all ranks; not "*.ckpt": never taken for one
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier("sharded checkpoint")
        error = None
        try:
            self._save_shards(checkpoint, tmp)
        except BaseException as caught:  # DCP's CheckpointException is one; every rank learns of it, none waits
            if isinstance(caught, (KeyboardInterrupt, SystemExit)):
                raise
            error = caught
        full = full_disk_error(error)
        outcomes = [None] * self.world_size
        outcome = None if error is None else (full.errno, full.strerror) if full is not None else (None, str(error))
        torch.distributed.all_gather_object(outcomes, outcome)
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if failed:
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None and full is None:
                raise error  # an internal error: its own traceback
            rank, (code, reason) = failed[0]
            message = f"checkpoint {path} not written: {reason} on rank {rank} ({free_space(path)}); {kept_before}"
            if code is not None:
                raise DiskFullError(code, message) from error
            raise RuntimeError(message) from error
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            if old.is_file():
                old.unlink()
        self.barrier("sharded checkpoint renamed")

    def _save_shards(self, checkpoint: dict[str, Any], folder: Path) -> None:
        """What ``ModelParallelStrategy`` writes (each rank's shards, then ``meta.pt`` from rank 0), with a writer
        whose out-of-space errors reach the other ranks with their errno."""
        from torch.distributed.checkpoint import save

        folder.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict"),
                 **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
        save(state, storage_writer=_ShardWriter(folder))
        if self.global_rank == 0:
            torch.save(checkpoint, folder / "meta.pt")  # Lightning's name for the rest of the checkpoint


class _ShardWriter(FileSystemWriter):
    """``FileSystemWriter`` whose out-of-space error stays one: ``torch.save`` hides it behind the zip writer's
    ``RuntimeError``, whose cause is lost when the error is sent to the coordinating rank."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as error:
            if full := full_disk_error(error):
                raise OSError(full.errno, full.strerror) from error
            raise


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
