"""Data-parallel replicas as Ray actors (``--dp N`` with ``distributed_executor_backend='ray'``).

Each replica is an ``AsyncEngine`` hosted in one async Ray actor, placed on the running Ray cluster
(address from ``RAY_ADDRESS``). With ``tp > 1`` the replica actor's engine starts its own ``RayExecutor``
(its tp ranks are further actors, owned by the replica actor, so they die with it). The front (the
api_server's process) keeps only a tokenizer and the chat template: it encodes prompts, routes them
(``ReplicaSet``) and streams each request's ``RequestOutput`` deltas back from the actor through a Ray
streaming generator (``num_returns="streaming"``). A replica actor that dies fails its requests with
``finish_reason='error'`` and sets ``failure`` (the server's ``/health`` answers 503).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from dataclasses import replace
from typing import Callable, List, Optional

from .async_engine import AsyncEngine, eos_token_ids, load_tokenizer, to_engine_config
from .engine.llm_engine import RequestOutput
from .engine.sampling_params import SamplingParams

logger = logging.getLogger("lmwrap_engine")

START_TIMEOUT_S = 600
WATCH_INTERVAL_S = 2.0
WATCH_TIMEOUT_S = 30.0


def uses_ray(engine_kwargs: dict) -> bool:
    """Whether ``AsyncEngine`` kwargs ask for the Ray executor (then replicas are Ray actors)."""
    cfg = engine_kwargs.get("backend_config")
    return getattr(cfg, "distributed_executor_backend", "mp") == "ray"


class _ReplicaActor:
    """The actor hosting one replica's ``AsyncEngine`` (``ray.remote`` is applied lazily)."""

    def __init__(self, model_path, engine_kwargs: dict):
        self.engine = AsyncEngine(model_path, **engine_kwargs)

    def info(self) -> dict:
        e = self.engine
        return {"pid": os.getpid(), "session_len": e.session_len, "vocab_size": e.vocab_size,
                "device": str(e.device), "dtype": e.dtype, "num_blocks": e.num_blocks, "block_size": e.block_size,
                "model_args": e.model_args, "last_stats": e.stats()}

    async def stream(self, session_id, input_ids, params, sequence_start, sequence_end, step):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.engine.submit(session_id, input_ids, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                           sequence_start, sequence_end, step)
        try:
            while True:  # one streamed object per batch of the deltas ready now (not one per token)
                outs = [await queue.get()]
                while not queue.empty():
                    outs.append(queue.get_nowait())
                yield outs
                if outs[-1].finish_reason is not None:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.engine.stop_session_nowait(session_id)
            raise

    def stop_session(self, session_id: int) -> None:
        self.engine.stop_session_nowait(session_id)

    def end_session(self, session_id: int) -> None:
        self.engine.end_session_nowait(session_id)

    async def session_tokens(self, session_id: int) -> int:
        return await self.engine.session_tokens(session_id)

    async def stats(self) -> dict:
        return await self.engine.astats()

    def failure(self) -> Optional[str]:
        return self.engine.failure

    def close(self) -> None:
        self.engine.close()


class RayReplica:
    """The front's handle of one replica actor, used like an ``AsyncEngine`` by ``ReplicaSet``."""

    # Prompt encoding, sampling parameters and the request stream are AsyncEngine's own code over the
    # attributes set here; only ``submit`` and the session/stats calls go to the actor.
    encode_prompt = AsyncEngine.encode_prompt
    sampling_params = AsyncEngine.sampling_params
    generate = AsyncEngine.generate
    stop_session = AsyncEngine.stop_session
    end_session = AsyncEngine.end_session
    new_session_id = AsyncEngine.new_session_id
    vision_processor = AsyncEngine.vision_processor

    def __init__(self, ray, actor, front: dict, info: dict, pump_loop: asyncio.AbstractEventLoop, index: int):
        self._ray, self.actor, self.index, self._pump_loop = ray, actor, index, pump_loop
        self.__dict__.update(front)
        self.__dict__.update(info)
        self.pid = info["pid"]
        self._vision_processor = None
        self._session_ids = itertools.count(1 << 32)
        self._failed: Optional[str] = None
        self._closed = False

    # -- the parts of AsyncEngine that go to the actor -------------------------------------------

    def submit(self, session_id: int, input_ids: List[int], params: SamplingParams,
               emit: Callable[[RequestOutput], None], sequence_start: bool = True, sequence_end: bool = True,
               step: int = 0) -> None:
        """Sends the request to the replica actor; a pump task calls ``emit`` with each delta it streams back."""
        if self._closed:
            from .async_engine import EngineClosedError
            raise EngineClosedError()
        if self._failed:
            raise RuntimeError(self._failed)
        bad = next((t for t in input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"input_ids must be token ids in [0, {self.vocab_size}), got {bad}")
        gen = self.actor.stream.options(num_returns="streaming").remote(
            session_id, input_ids, params, sequence_start, sequence_end, step)
        asyncio.run_coroutine_threadsafe(self._pump(gen, emit), self._pump_loop)

    async def _pump(self, gen, emit) -> None:
        try:
            async for ref in gen:
                outs = await ref
                for out in outs:
                    emit(out)
                if outs[-1].finish_reason is not None:
                    return
            raise RuntimeError("the replica actor's stream ended without a finished output")
        except Exception as exc:
            message = "the engine is closed" if self._closed else self._fail(exc)
            emit(RequestOutput("", [], 0, 0, 0, finish_reason="error", error=message))

    def _open_stream(self, aio_loop=None):
        from .async_engine import EngineClosedError, OutputStream
        if self._closed:
            raise EngineClosedError()
        return OutputStream(self.stop_session_nowait, aio_loop)

    def stop_session_nowait(self, session_id: int) -> None:
        if not self._closed and not self._failed:
            self.actor.stop_session.remote(session_id)

    def end_session_nowait(self, session_id: int) -> None:
        if not self._closed and not self._failed:
            self.actor.end_session.remote(session_id)

    async def session_tokens(self, session_id: int) -> int:
        """0 once the replica failed (its sessions' KV cache is gone; the next turn fails with the reason)."""
        if self._failed:
            return 0
        try:
            return await self.actor.session_tokens.remote(session_id)
        except Exception as exc:
            self._fail(exc)
            return 0

    async def astats(self) -> dict:
        """The actor's engine stats; a failed replica's last ones."""
        if not self._failed and not self._closed:
            try:
                self.last_stats = await self.actor.stats.remote()
            except Exception as exc:
                self._fail(exc)
        return dict(self.last_stats)

    def stats(self) -> dict:
        if not self._failed and not self._closed:
            try:
                self.last_stats = self._ray.get(self.actor.stats.remote())
            except Exception as exc:
                self._fail(exc)
        return dict(self.last_stats)

    def _fail(self, exc: BaseException) -> str:
        message = (f"replica {self.index} (Ray actor) failed: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}; it serves no more requests")
        if self._failed is None and not self._closed:
            logger.error("%s", message)
            self._failed = message
        return self._failed or message

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def failure(self) -> Optional[str]:
        """Why this replica can run no more (its actor died, or its engine's tp worker did); None while it can."""
        return None if self._closed else self._failed

    def close(self) -> None:
        """Closes the replica's engine (its tp ranks) and kills the actor."""
        if self._closed:
            return
        self._closed = True
        try:
            self._ray.get(self.actor.close.remote(), timeout=30)
        except Exception:
            pass
        try:
            self._ray.kill(self.actor)
        except Exception:
            pass


class RayReplicaGroup:
    """Starts ``dp`` replica actors on the running Ray cluster; ``close`` kills them and disconnects."""

    def __init__(self, model_path, dp: int, engine_kwargs: dict):
        try:
            import ray
        except ImportError:
            raise ImportError("replicas on Ray need Ray: pip install 'lmwrap[ray]'") from None
        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:  # attach to the running cluster, never start one
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False,
                     logging_level=logging.WARNING)
        self.replicas: List[RayReplica] = []
        self._aio = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aio.run_forever, name="lmwrap-ray-replicas", daemon=True)
        self._thread.start()
        actors = []
        try:
            config = to_engine_config(engine_kwargs.get("backend_config"), engine_kwargs.get("backend"))
            if engine_kwargs.get("tp", 1) != 1:
                config = replace(config, tp=engine_kwargs["tp"])
            gpu = config.device_type == "cuda" or (config.device_type == "auto" and _has_cuda())
            # tp=1: the actor runs the model itself; tp>1: its tp rank actors hold the devices.
            own = config.tp == 1
            actor_cls = ray.remote(num_cpus=1 if own else 0, num_gpus=1 if own and gpu else 0)(_ReplicaActor)
            # the front's PYTHONPATH (a source checkout) also for the actors
            path = os.environ.get("PYTHONPATH")
            opts = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}} if path else {}
            actors = [actor_cls.options(max_concurrency=1000, **opts).remote(model_path, engine_kwargs)
                      for _ in range(dp)]
            infos = ray.get([a.info.remote() for a in actors], timeout=START_TIMEOUT_S)
            front = _front(model_path, config, **engine_kwargs)
            for i, (actor, info) in enumerate(zip(actors, infos)):
                info = dict(info, device=torch_device(info["device"]))
                self.replicas.append(RayReplica(ray, actor, front, info, self._aio, i))
        except BaseException:
            for a in actors[len(self.replicas):]:
                try:
                    ray.kill(a)
                except Exception:
                    pass
            self.close()
            raise
        self._monitor = asyncio.run_coroutine_threadsafe(self._watch(), self._aio)
        logger.info("%d replicas on Ray (actor pids %s)", dp, [r.pid for r in self.replicas])

    async def _watch(self) -> None:
        """Asks each replica actor every ``WATCH_INTERVAL_S`` whether it can run: a dead actor (or an engine
        whose tp rank died) sets the replica's ``failure`` even while no request is on it."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for r in self.replicas:
                if r._closed or r._failed:
                    continue
                try:
                    failed = await asyncio.wait_for(r.actor.failure.remote(), WATCH_TIMEOUT_S)
                except asyncio.TimeoutError:
                    continue  # busy, not dead (a dead actor's call fails at once)
                except Exception as exc:
                    r._fail(exc)
                    continue
                if failed and not r._closed and r._failed is None:
                    logger.error("%s", failed)
                    r._failed = failed

    def close(self) -> None:
        """Closes and kills every replica actor, stops the pump thread, and disconnects (the cluster keeps running)."""
        for r in self.replicas:
            r.close()
        if self._aio.is_running():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._aio).result(10)
            except Exception:
                pass
            self._aio.call_soon_threadsafe(self._aio.stop)
            self._thread.join(10)
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_connection = False


async def _cancel_tasks() -> None:
    """Cancels the pump loop's tasks (the watcher, streams still pumping) and waits for them."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _front(model_path, config, model_name=None, backend=None, backend_config=None, chat_template_config=None,
           max_log_len=None, tp: int = 1, **kwargs) -> dict:
    """What the front needs to encode prompts and build sampling parameters (no model weights)."""
    from .chat_template import ChatTemplateConfig, get_chat_template
    from .model_path import DEFAULT_MODEL, resolve_model_path
    if kwargs:
        raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
    if chat_template_config is not None and not isinstance(chat_template_config, ChatTemplateConfig):
        raise TypeError("chat_template_config must be a ChatTemplateConfig")
    if tp != 1:
        config = replace(config, tp=tp)
    model_dir = resolve_model_path(model_path, config.download_dir, config.revision)
    tokenizer = load_tokenizer(model_dir)
    return {"max_log_len": max_log_len, "engine_config": config, "model_path": model_path,
            "model_name": model_name or (os.fspath(model_path) if model_path is not None else DEFAULT_MODEL),
            "model_dir": model_dir, "tokenizer": tokenizer,
            "chat_template": get_chat_template(model_path or model_dir, tokenizer, chat_template_config),
            "eos_token_ids": eos_token_ids(model_dir, tokenizer)}


def torch_device(name: str):
    import torch
    return torch.device(name)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()
