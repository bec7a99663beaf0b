"""Data-parallel replicas: ``dp`` engines (each possibly tensor-parallel) behind one ``AsyncEngine`` front.

Routing: a session stays on the replica that served it (its KV cache and prefix cache are there), so
a session's next turn prefills only its new tokens; a session seen for the first time goes to the
replica with the fewest outstanding requests (ties: the one that has taken the fewest sessions).
``/metrics`` of an api_server over a ``ReplicaSet`` reports each replica's stats (label ``replica``).
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import OrderedDict
from typing import AsyncIterator, Callable, List, Optional

from .async_engine import AsyncEngine
from .config import GenOut
from .engine.llm_engine import RequestOutput
from .engine.sampling_params import SamplingParams

# Sessions remembered for affinity (least recently used forgotten first); kept sessions are far fewer.
MAX_AFFINITY = 1 << 16


class ReplicaSet:
    """``dp`` ``AsyncEngine`` replicas of one model, used like one ``AsyncEngine`` (``generate``,
    ``submit``, sessions, stats, ``close``). Arguments: ``AsyncEngine``'s, plus ``dp``."""

    def __init__(self, model_path: Optional[str] = None, dp: int = 2, **engine_kwargs):
        if not isinstance(dp, int) or dp < 1:
            raise ValueError(f"dp must be an int >= 1, got {dp!r}")
        self.replicas: List[AsyncEngine] = []
        self._ray_group = None
        try:
            from .ray_replicas import RayReplicaGroup, uses_ray
            if uses_ray(engine_kwargs):  # each replica an engine in a Ray actor (see lmwrap_engine.ray_replicas)
                self._ray_group = RayReplicaGroup(model_path, dp, engine_kwargs)
                self.replicas = self._ray_group.replicas
            for _ in range(dp - len(self.replicas)):
                self.replicas.append(AsyncEngine(model_path, **engine_kwargs))
        except BaseException:
            self.close()
            raise
        first = self.replicas[0]
        for name in ("model_name", "model_path", "model_dir", "tokenizer", "chat_template", "eos_token_ids",
                     "session_len", "vocab_size", "device", "dtype", "num_blocks", "block_size", "engine_config",
                     "max_log_len"):
            setattr(self, name, getattr(first, name))
        self.outstanding = [0] * dp          # requests submitted to each replica and not yet finished
        self.sessions_routed = [0] * dp      # sessions each replica has been given
        self._affinity: "OrderedDict[int, int]" = OrderedDict()
        self._lock = threading.Lock()
        self._session_ids = itertools.count(1 << 32)

    # -- routing --------------------------------------------------------------------------------

    def replica_of(self, session_id: int) -> Optional[int]:
        """The replica a session is bound to (None: not seen, or forgotten)."""
        with self._lock:
            return self._affinity.get(session_id)

    def _acquire(self, session_id: int) -> int:
        with self._lock:
            i = self._affinity.get(session_id)
            if i is None:
                # a failed replica (dead Ray actor or tp worker) takes no new sessions while another can
                i = min(range(len(self.replicas)), key=lambda r: (self.replicas[r].failure is not None,
                                                                  self.outstanding[r], self.sessions_routed[r]))
                self.sessions_routed[i] += 1
                if len(self._affinity) >= MAX_AFFINITY:
                    self._affinity.popitem(last=False)
            self._affinity[session_id] = i
            self._affinity.move_to_end(session_id)
            self.outstanding[i] += 1
            return i

    def _release(self, i: int) -> None:
        with self._lock:
            self.outstanding[i] -= 1

    # -- AsyncEngine's API ----------------------------------------------------------------------

    def new_session_id(self) -> int:
        return next(self._session_ids)

    def encode_prompt(self, *args, **kwargs) -> List[int]:
        return self.replicas[0].encode_prompt(*args, **kwargs)

    def sampling_params(self, gen_config, num_tokens: int) -> SamplingParams:
        return self.replicas[0].sampling_params(gen_config, num_tokens)

    def submit(self, session_id: int, input_ids: List[int], params: SamplingParams,
               emit: Callable[[RequestOutput], None], sequence_start: bool = True, sequence_end: bool = True,
               step: int = 0) -> None:
        i = self._acquire(session_id)

        def counted(out: RequestOutput) -> None:
            if out.finish_reason is not None:
                self._release(i)
            emit(out)
        try:
            self.replicas[i].submit(session_id, input_ids, params, counted, sequence_start, sequence_end, step)
        except BaseException:
            self._release(i)
            raise

    async def generate(self, messages, session_id: Optional[int], *args, **kwargs) -> AsyncIterator[GenOut]:
        if session_id is None:
            session_id = self.new_session_id()
        i = self._acquire(session_id)
        try:
            async for out in self.replicas[i].generate(messages, session_id, *args, **kwargs):
                yield out
        finally:
            self._release(i)

    def _bound(self, session_id: int) -> Optional[AsyncEngine]:
        i = self.replica_of(session_id)
        return None if i is None else self.replicas[i]

    async def stop_session(self, session_id: int) -> None:
        self.stop_session_nowait(session_id)

    async def end_session(self, session_id: int) -> None:
        self.end_session_nowait(session_id)

    def stop_session_nowait(self, session_id: int) -> None:
        replica = self._bound(session_id)
        if replica is not None:
            replica.stop_session_nowait(session_id)

    def end_session_nowait(self, session_id: int) -> None:
        with self._lock:
            i = self._affinity.pop(session_id, None)
        if i is not None:
            self.replicas[i].end_session_nowait(session_id)

    async def session_tokens(self, session_id: int) -> int:
        replica = self._bound(session_id)
        return 0 if replica is None else await replica.session_tokens(session_id)

    async def astats(self) -> dict:
        per = await asyncio.gather(*(r.astats() for r in self.replicas))
        return self._merge(list(per))

    def stats(self) -> dict:
        """The replicas' counters summed, and each replica's under ``'replicas'`` (with ``outstanding``)."""
        return self._merge([r.stats() for r in self.replicas])

    def _merge(self, per: List[dict]) -> dict:
        total = {k: sum(s[k] for s in per) for k in per[0] if isinstance(per[0][k], (int, float))}
        with self._lock:
            for i, s in enumerate(per):
                s["outstanding"] = self.outstanding[i]
        total["replicas"] = per
        return total

    @property
    def failure(self) -> Optional[str]:
        """The first replica's reason to run no more (None while all can run)."""
        return next((f"replica {i}: {r.failure}" for i, r in enumerate(self.replicas) if r.failure), None)

    @property
    def is_closed(self) -> bool:
        return all(r.is_closed for r in self.replicas)

    def close(self) -> None:
        """Closes every replica (and their tensor-parallel workers)."""
        for r in self.replicas:
            r.close()
        if self._ray_group is not None:
            self._ray_group.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
