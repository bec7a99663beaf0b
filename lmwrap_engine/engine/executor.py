"""Tensor-parallel executors: ``tp`` ranks in worker processes, driven by the engine in this process.

The engine's scheduler and block manager run once, here; each step the executor sends the batch's
metadata to every rank, the ranks run the model (all-reducing inside it), and rank 0's logits come
back for sampling, which happens once, here. ``make_runner`` gives the engine a plain in-process
``ModelRunner`` for ``tp=1`` (no extra process, no collective).

A rank that dies or fails makes the executor fail: it stops every other rank and raises
``WorkerFailedError`` on this and every later step, so every waiting request gets that error.
"""
from __future__ import annotations

import json
import logging
import os
import time
from multiprocessing.connection import wait
from typing import List, Optional

import torch

from ..config import EngineConfig
from ..models.config import ModelArgs
from ..models.layers.linear import check_tp
from .model_runner import check_weight_quant, resolve_device, resolve_dtype, resolve_session_len
from .scheduler import ScheduledBatch
from .worker import StepInput, worker_main

logger = logging.getLogger("lmwrap_engine")


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or failed: the engine cannot run any more steps."""


class WorkerStartError(WorkerFailedError, ValueError):
    """A rank could not start (bad model folder, weights that do not fit, ...); the message says which and why.
    A ``ValueError`` too, so it reads like the same mistake at ``tp=1``."""


def make_runner(model_dir: str, config: EngineConfig):
    """The engine's model runner: in this process for ``tp=1``, else an executor over ``tp`` ranks."""
    if config.tp == 1:
        from .model_runner import ModelRunner
        return ModelRunner(model_dir, config)
    _reject_vision_model(model_dir, config.tp)
    if config.distributed_executor_backend == "ray":
        from .ray_executor import RayExecutor
        return RayExecutor(model_dir, config)
    return MultiprocExecutor(model_dir, config)


def _reject_vision_model(model_dir: str, tp: int) -> None:
    # The ranks receive token ids only, not images or their cached embeddings.
    from ..vl.registry import is_vision_model
    with open(os.path.join(model_dir, "config.json")) as f:
        archs = json.load(f).get("architectures") or [""]
    if is_vision_model(archs[0]):
        raise NotImplementedError(f"tp={tp} is not supported for vision-language models ({archs[0]}) yet; "
                                  "use tp=1, or --dp for more replicas")


class ExecutorBase:
    """What the engine reads of a runner, for an executor whose ranks hold the model."""

    decode_graphs = None  # captured per rank, inside the workers

    def __init__(self, model_dir: str, config: EngineConfig):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.args = ModelArgs.from_hf_config(json.load(f))
        a = self.args
        check_tp(a.num_heads, a.num_kv_heads, config.tp)
        for name, n in (("intermediate_size", a.intermediate_size), ("num_attention_heads * head_dim",
                                                                     a.num_heads * a.head_dim)):
            if n % config.tp:
                raise ValueError(f"{name}={n} is not divisible by tp={config.tp}; pick a tp that divides it")
        self.config = config
        self.device = resolve_device(config.device_type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", 0)
        check_weight_quant(config, self.device)  # before any rank starts
        self.dtype = resolve_dtype(config.dtype, self.args, self.device)
        self.session_len = resolve_session_len(config.session_len, self.args)
        self.block_size = config.block_size
        self.failed: Optional[str] = None


class MultiprocExecutor(ExecutorBase):
    """``config.tp`` worker processes (``torch.multiprocessing``, spawn) in one gloo/NCCL group on this machine."""

    def __init__(self, model_dir: str, config: EngineConfig):
        super().__init__(model_dir, config)
        import torch.multiprocessing as mp

        from .distributed import free_port

        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs, self.conns = [], []
        try:
            for rank in range(config.tp):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=worker_main, name=f"lmwrap-tp{rank}", daemon=True,
                                   args=(rank, config.tp, init_method, model_dir, config, child))
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
            try:
                ready = self._collect()
            except WorkerFailedError as exc:
                raise WorkerStartError(str(exc)) from None
        except BaseException:
            self.close()
            raise
        self.num_blocks = ready[0]["num_blocks"]
        self.pids = [r["pid"] for r in ready]
        logger.info("tensor parallel: %d ranks (pids %s), %d KV blocks each", config.tp, self.pids,
                    self.num_blocks)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Runs one step on every rank; rank 0's fp32 logits of the sequences whose last token was computed."""
        logits = self._broadcast(("step", StepInput.of(batch)))[0]
        return torch.from_numpy(logits).to(self.device)

    def call(self, name: str) -> List:
        """Every rank's answer to a worker call (``'param_bytes'``, ``'kv_cache_bytes'``)."""
        return self._broadcast(("call", name))

    def _broadcast(self, msg) -> List:
        if self.failed:
            raise WorkerFailedError(self.failed)
        try:
            for conn in self.conns:
                conn.send(msg)
        except (OSError, EOFError):
            pass  # a dead worker: _collect reports which
        return self._collect()

    def _collect(self) -> List:
        """One answer from every rank; a rank that errs or exits first fails the executor."""
        results, pending = [None] * len(self.conns), dict(enumerate(self.conns))
        while pending:
            sentinels = {self.procs[r].sentinel: r for r in pending}
            for ready in wait(list(pending.values()) + list(sentinels)):
                rank = sentinels.get(ready)
                if rank is None:
                    rank = next(r for r, c in pending.items() if c is ready)
                    try:
                        status, value = ready.recv()
                    except (EOFError, OSError):
                        status, value = "error", None
                    if status == "ok":
                        results[rank] = value
                        del pending[rank]
                        continue
                    self._fail(value or self._death(rank))
                elif rank in pending and not self.conns[rank].poll():
                    self._fail(self._death(rank))
        return results

    def _death(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(1.0)
        return (f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}; "
                "the engine cannot continue")

    def _fail(self, message: str) -> None:
        logger.error("%s", message)
        self.failed = message
        self.close()
        raise WorkerFailedError(message)

    def close(self) -> None:
        """Stops every worker (asks, then terminates, then kills): no process is left behind."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, EOFError):
                pass
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []
        if not self.failed:
            self.failed = "the engine is closed"
