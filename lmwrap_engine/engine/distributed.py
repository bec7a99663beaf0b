"""The torch.distributed process group of one tensor-parallel worker (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import datetime
import socket

import torch

# A collective waiting this long for a peer has lost it; the driver notices a dead worker much sooner.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Joins this process to the group as ``rank`` (the default group: one group per worker process)."""
    import torch.distributed as dist
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT, **kwargs)


def agree_min(n: int) -> int:
    """The smallest ``n`` over all ranks (e.g. KV blocks: every rank must hold the same number)."""
    import torch.distributed as dist
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def destroy_distributed() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
