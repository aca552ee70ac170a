"""One process of the data-parallel VQ test (tests/test_vq.py)."""

import torch
import torch.distributed as dist

from transfusion.models.vq import VectorQuantizer


def replica(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, dim=4, usage_decay=0.5, dead_code_threshold=0.1)
    torch.manual_seed(100 + rank)  # each process sees different latents and draws different replacements
    for _ in range(3):
        z = torch.randn(2, 4, 2, 2) + rank
        q(z)
        q.reset_dead_codes(z)
    torch.save({"codebook": q.codebook.weight.detach(), "usage": q.usage}, f"{out}/{rank}.pt")
    dist.destroy_process_group()
