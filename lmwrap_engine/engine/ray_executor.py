"""The Ray executor (``distributed_executor_backend='ray'``): one Ray actor per tensor-parallel rank, in
a placement group on the running Ray cluster (``ray start --head``; address from ``RAY_ADDRESS``), so
ranks can sit on several nodes. The ranks form the same torch.distributed group as the worker
processes of ``MultiprocExecutor`` (rendezvous at rank 0's node); Ray only places them and carries
each step's metadata and rank 0's logits.
"""
from __future__ import annotations

import logging
import os

import torch

from ..config import EngineConfig
from .executor import ExecutorBase, WorkerFailedError, WorkerStartError
from .scheduler import ScheduledBatch
from .worker import StepInput

logger = logging.getLogger("lmwrap_engine")

PLACEMENT_TIMEOUT_S = 120


class _Rank:
    """The actor of one rank (``ray.remote`` is applied when the executor starts, so Ray is imported lazily)."""

    def __init__(self, rank: int, world_size: int, model_dir: str, config):
        self.rank, self.world_size, self.model_dir, self.config = rank, world_size, model_dir, config
        self.runner = None

    def rendezvous(self) -> str:
        import ray

        from .distributed import free_port
        ip = ray.util.get_node_ip_address()
        return f"tcp://{ip}:{free_port(ip)}"

    def start(self, init_method: str) -> dict:
        from .worker import start_rank
        self.runner = start_rank(self.rank, self.world_size, init_method, self.model_dir, self.config)
        return {"num_blocks": self.runner.num_blocks, "pid": os.getpid()}

    def handle(self, kind: str, payload):
        from .worker import handle
        return handle(self.runner, self.rank, kind, payload)

    def stop(self) -> None:
        from .distributed import destroy_distributed
        destroy_distributed()


class RayExecutor(ExecutorBase):
    """``config.tp`` Ray actors, one bundle (a GPU, or a CPU) each, in one placement group."""

    def __init__(self, model_dir: str, config: EngineConfig):
        super().__init__(model_dir, config)
        try:
            import ray
        except ImportError:
            raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'lmwrap[ray]'") from None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:  # attach to the running cluster, never start one
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False,
                     logging_level=logging.WARNING)
        self.actors, self.pg = [], None
        try:
            gpu = self.device.type == "cuda"
            bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
            self.pg = placement_group([dict(bundle) for _ in range(config.tp)], strategy="PACK")
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_Rank)
            self.actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                               self.pg, placement_group_bundle_index=rank)).remote(rank, config.tp, model_dir, config)
                           for rank in range(config.tp)]
            init_method = ray.get(self.actors[0].rendezvous.remote())
            try:
                ready = self._gather([a.start.remote(init_method) for a in self.actors])
            except WorkerFailedError as exc:
                raise WorkerStartError(str(exc)) from None
        except BaseException:
            self.close()
            raise
        self.num_blocks = ready[0]["num_blocks"]
        self.pids = [r["pid"] for r in ready]
        logger.info("tensor parallel on Ray: %d actors, %d KV blocks each", config.tp, self.num_blocks)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        logits = self._broadcast("step", StepInput.of(batch))[0]
        return torch.tensor(logits, device=self.device)  # a copy: the received array is read-only

    def call(self, name: str) -> list:
        return self._broadcast("call", name)

    def _broadcast(self, kind: str, payload) -> list:
        if self.failed:
            raise WorkerFailedError(self.failed)
        payload = self._ray.put(payload)  # once in the object store, not once per actor
        return self._gather([a.handle.remote(kind, payload) for a in self.actors])

    def _gather(self, refs) -> list:
        """Every actor's result; the first actor that dies or raises fails the executor (not waiting for
        the others, which may be stuck in a collective with it)."""
        ray = self._ray
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done)
            except Exception as exc:
                rank = refs.index(done[0])
                message = (f"tensor-parallel worker rank {rank} (Ray actor) failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}; the engine cannot continue")
                logger.error("%s", message)
                self.failed = message
                self.close()
                raise WorkerFailedError(message) from None
        return ray.get(list(refs))

    def close(self) -> None:
        """Kills the actors, removes the placement group, and disconnects (the cluster keeps running)."""
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
            self._owns_connection = False
        if not self.failed:
            self.failed = "the engine is closed"
