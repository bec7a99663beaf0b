"""One tensor-parallel rank: a ``ModelRunner`` holding its shard of the weights and KV heads, running
the steps the driver (the engine's scheduler, once, in the parent process) sends it.

Messages on the worker's pipe: the driver sends ``("step", StepInput)``, ``("call", name)`` or ``None``
(exit); the worker answers each with ``("ok", result)`` or ``("error", text)`` and exits after an
error (a rank that failed a step can no longer take part in the group's collectives).
"""
from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from typing import List, Tuple

from .scheduler import ScheduledBatch

logger = logging.getLogger("lmwrap_engine")


class _Window:
    """The token ids a step needs of one sequence (from ``offset`` on), indexed like the whole list."""

    __slots__ = ("offset", "ids")

    def __init__(self, offset: int, ids: List[int]):
        self.offset, self.ids = offset, ids

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.ids[key.start - self.offset: key.stop - self.offset]
        return self.ids[key - self.offset]


class _SeqView:
    """What ``ModelRunner`` reads of a ``Sequence``."""

    __slots__ = ("token_ids", "num_computed_tokens", "num_tokens", "block_table", "mm_items", "mrope_delta")

    def __init__(self, start: int, ids: List[int], num_tokens: int, block_table: List[int]):
        self.token_ids = _Window(start, ids)
        self.num_computed_tokens = start
        self.num_tokens = num_tokens
        self.block_table = block_table
        # Images never reach the ranks: vision-language models run at tp=1 only (executor.make_runner).
        self.mm_items = ()
        self.mrope_delta = 0


@dataclass
class StepInput:
    """A scheduled batch as the ranks need it: per sequence its start, the ids it computes this step,
    its length and block table (the metadata every rank gets each step)."""

    seqs: List[Tuple[int, List[int], int, List[int]]]
    num_new_tokens: List[int]
    num_decode_seqs: int
    copies: List[Tuple[int, int]]

    @classmethod
    def of(cls, batch: ScheduledBatch) -> "StepInput":
        seqs = [(s.num_computed_tokens, s.token_ids[s.num_computed_tokens: s.num_computed_tokens + n],
                 s.num_tokens, list(s.block_table)) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        return cls(seqs, list(batch.num_new_tokens), batch.num_decode_seqs, list(batch.copies))

    def batch(self) -> ScheduledBatch:
        return ScheduledBatch([_SeqView(*s) for s in self.seqs], self.num_new_tokens, self.num_decode_seqs,
                              self.copies)


def start_rank(rank: int, world_size: int, init_method: str, model_dir: str, config):
    """Joins the group as ``rank`` on this process's device and loads the rank's shard: its ``ModelRunner``."""
    import torch

    from .distributed import init_distributed
    from .model_runner import ModelRunner, resolve_device

    device = resolve_device(config.device_type)
    if device.type == "cuda":  # Ray gives an actor one visible GPU; worker processes see them all
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    elif "OMP_NUM_THREADS" not in os.environ:  # ranks share the physical cores
        from .cpu_features import physical_cores
        torch.set_num_threads(max(1, physical_cores() // world_size))
    torch.set_grad_enabled(False)
    init_distributed(rank, world_size, init_method, device)
    return ModelRunner(model_dir, config, tp_rank=rank)


def handle(runner, rank: int, kind: str, payload):
    """One driver message: a step (rank 0 returns the logits as a numpy array) or a call."""
    if kind == "step":
        logits = runner.run(payload.batch())
        return logits.float().cpu().numpy() if rank == 0 else None
    return _call(runner, payload)


def worker_main(rank: int, world_size: int, init_method: str, model_dir: str, config, conn) -> None:
    """The worker process: join the group, load this rank's shard, then serve steps until told to stop
    or the driver goes away (its pipe closes)."""
    from .distributed import destroy_distributed

    try:
        runner = start_rank(rank, world_size, init_method, model_dir, config)
        conn.send(("ok", {"num_blocks": runner.num_blocks, "pid": os.getpid()}))
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the driver is gone
                break
            if msg is None:
                break
            conn.send(("ok", handle(runner, rank, *msg)))
    except BaseException as exc:  # reported to the driver, which fails every request and stops the others
        text = f"tensor-parallel worker rank {rank} failed: {type(exc).__name__}: {exc}"
        logger.error("%s\n%s", text, traceback.format_exc())
        try:
            conn.send(("error", text))
        except (OSError, EOFError):
            pass
    finally:
        destroy_distributed()


def _call(runner, name: str):
    if name == "param_bytes":  # tied parameters once
        return sum(p.numel() * p.element_size() for p in runner.model.parameters())
    if name == "kv_cache_bytes":
        return runner.k_cache.numel() * runner.k_cache.element_size() * 2
    raise ValueError(f"unknown worker call {name!r}")
