"""The engine core: requests and sessions in, one scheduled model step at a time, deltas out.

Not thread-safe: ``EngineLoop`` drives it from one thread and funnels every call through it.

Each step's sampled tokens are appended and checked for stop ids and length at once (the next
step's schedule depends on them); turning them into text and emitting the deltas is output work.
With ``overlap_outputs`` (on CUDA) a step's output work runs after the next step's model launch,
while the GPU computes. A stop *string* found then ends its sequence one step late: the token the
sequence computed meanwhile is dropped.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, NamedTuple, Optional

from ..config import EngineConfig
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .executor import WorkerFailedError, make_runner
from .sampler import Sampler, make_generator
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus

logger = logging.getLogger("lmwrap_engine")


@dataclass
class Request:
    session_id: int
    input_ids: List[int]
    params: SamplingParams
    emit: Callable[["RequestOutput"], None]
    sequence_start: bool = True
    sequence_end: bool = True
    step: int = 0
    mm_items: list = field(default_factory=list)  # images: vl.items.MultimodalItem, offsets into input_ids


@dataclass
class RequestOutput:
    """A delta of one request; counters are cumulative for the turn."""

    text: str
    token_ids: List[int]
    num_history_tokens: int
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: Optional[str] = None
    logprobs: Optional[List[dict]] = None
    error: Optional[str] = None


@dataclass
class EngineStats:
    num_steps: int = 0
    num_requests: int = 0
    num_prompt_tokens_computed: int = 0     # history/input positions run through the model
    num_generated_tokens_computed: int = 0  # generated positions run through the model
    num_prefix_query_tokens: int = 0        # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int = 0          # ... of which the cache held
    num_preemptions: int = 0
    num_sessions_ended_idle: int = 0        # kept sessions ended by the cap or the idle timeout
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_sessions: int = 0
    num_graph_replays: int = 0              # decode steps run by CUDA graphs or the compiled CPU decode
    num_compiled_prefill_steps: int = 0     # prefill / mixed steps run by the compiled CPU prefill program

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Unsent(NamedTuple):
    """A token appended to its sequence whose text and delta are still to go out."""
    seq: Sequence
    token_id: int
    logprobs: Optional[dict]
    finish_reason: Optional[str]  # "stop" (a stop id) or "length": the turn ends with this token


@dataclass
class _Session:
    seq: Sequence
    pending: Deque[Request] = field(default_factory=deque)
    last_active: float = 0.0  # time.monotonic() when its last turn ended

    @property
    def is_idle(self) -> bool:
        return self.seq.status is SequenceStatus.IDLE and not self.pending


class LLMEngine:
    def __init__(self, model_dir: str, config: EngineConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.runner = make_runner(model_dir, config)  # tp > 1: an executor over worker processes
        self.session_len = self.runner.session_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_batch_size,
                                   max(config.max_prefill_token_num, config.max_batch_size),
                                   evict_idle_session=self._evict_idle_session,
                                   blocks_pending_release=lambda: any(u.finish_reason for u in self._unsent))
        self.sampler = Sampler()
        self.sessions: Dict[int, _Session] = {}
        self.stats = EngineStats(num_blocks=self.runner.num_blocks)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._unsent: Deque[_Unsent] = deque()
        self._next_expiry_check = 0.0
        # On CPU the model step is synchronous: overlapping would only delay every delta by a step.
        self.overlap_outputs = self.runner.device.type == "cuda"

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        # No flush needed: a turn whose last token is unsent still counts as running, so a new
        # turn of its session waits in ``pending`` until _finish starts it.
        self.stats.num_requests += 1
        req.emit = _guarded(req.emit)
        session = self.sessions.get(req.session_id)
        if session is not None and session.seq.status in (SequenceStatus.WAITING, SequenceStatus.RUNNING):
            session.pending.append(req)  # turns of one session run one after another
            return
        self._start(req)

    def _start(self, req: Request) -> None:
        session = self.sessions.get(req.session_id)
        if req.sequence_start:
            if session is not None:
                self.block_manager.free(session.seq)
            seq = Sequence(next(self._seq_ids), req.session_id)
            session = self.sessions[req.session_id] = _Session(seq, session.pending if session else deque())
        elif session is None:
            return self._reject(req, "error", f"session {req.session_id} has no history: start it with "
                                              "sequence_start=True")
        seq = session.seq
        if any(it.offset < req.step < it.end for it in seq.mm_items):
            return self._reject(req, "error", f"step {req.step} cuts an image of session {req.session_id} in two")
        if 0 < req.step < seq.num_tokens:
            self.block_manager.truncate(seq, req.step)
        elif not 0 <= req.step <= seq.num_tokens:
            return self._reject(req, "error", f"step {req.step} is outside the {seq.num_tokens} tokens "
                                              f"session {req.session_id} holds")
        total = seq.num_tokens + len(req.input_ids)
        if req.mm_items and total >= self.session_len:
            image_tokens = sum(it.length for it in req.mm_items)
            return self._reject(req, "error", f"the prompt's {total} tokens ({image_tokens} of them for "
                                              f"{len(req.mm_items)} images) reach session_len={self.session_len}")
        if not req.input_ids and req.params.max_new_tokens > 0 and seq.num_tokens == 0:
            return self._reject(req, "error", "the prompt is empty")
        if total >= self.session_len:
            return self._reject(req, "length", f"{total} tokens reach session_len={self.session_len}")
        if self.block_manager.blocks_needed(total + 1) > self.block_manager.num_blocks:
            return self._reject(req, "error", f"{total} tokens need more KV blocks than the cache's "
                                              f"{self.block_manager.num_blocks}")
        max_new = min(req.params.max_new_tokens, self.session_len - total)
        params = req.params if max_new == req.params.max_new_tokens else _with_max_new(req.params, max_new)
        prompt_ids = seq.token_ids + req.input_ids
        input_ids = req.input_ids
        if req.mm_items or seq.mm_items:
            from ..vl.inputs import attach_items
            input_ids, prompt_ids = attach_items(seq, req.input_ids, req.mm_items, self.runner.args.vocab_size)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
        matcher = None
        if params.grammar is not None:
            from ..guided import new_matcher
            matcher = new_matcher(params.grammar, params.stop_token_ids)
        seq.start_turn(input_ids, params, req.emit, next(self._arrivals), keep_session=not req.sequence_end,
                       generator=make_generator(params.seed, self.runner.device), detokenizer=detok,
                       matcher=matcher)
        if max_new == 0:
            return self._finish(seq, "length")
        # At least one token must run so the turn ends with fresh logits.
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
        self.scheduler.add(seq)

    def _reject(self, req: Request, reason: str, message: str) -> None:
        logger.warning("request on session %d rejected: %s", req.session_id, message)
        session = self.sessions.get(req.session_id)
        history = session.seq.num_tokens if session else 0
        req.emit(RequestOutput("", [], history, len(req.input_ids), 0, reason,
                               error=message if reason == "error" else None))
        if session is None:
            return
        if session.pending:
            self._start(session.pending.popleft())
        elif not session.seq.token_ids:  # a rejected first turn leaves nothing to keep
            del self.sessions[req.session_id]

    def stop_session(self, session_id: int) -> None:
        """Cancel the running turn of a session (finish_reason 'abort'); its KV is kept."""
        self.flush_outputs()
        session = self.sessions.get(session_id)
        if session is None:
            return
        for req in session.pending:
            req.emit(RequestOutput("", [], 0, len(req.input_ids), 0, "abort"))
        session.pending.clear()
        if session.seq.status in (SequenceStatus.WAITING, SequenceStatus.RUNNING):
            self.scheduler.remove(session.seq)
            self._finish(session.seq, "abort")

    def end_session(self, session_id: int) -> None:
        """Cancel whatever the session runs and free its KV cache."""
        self.stop_session(session_id)
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.block_manager.free(session.seq)

    def abort_all(self, error: str) -> None:
        """Fail every queued and running request and drop all KV: the bookkeeping may be inconsistent."""
        unsent = [u.seq for u in self._unsent]
        self._unsent.clear()
        seqs = list({id(s): s for s in self.scheduler.running + list(self.scheduler.waiting) + unsent}.values())
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        for seq in seqs:
            seq.emit(RequestOutput("", [], seq.num_history_tokens, seq.num_input_tokens, len(seq.output_ids),
                                   "error", error=error))
        for session in self.sessions.values():
            for req in session.pending:
                req.emit(RequestOutput("", [], 0, len(req.input_ids), 0, "error", error=error))
        self.sessions.clear()
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler.block_manager = self.block_manager

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._unsent)

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> None:
        batch = self.scheduler.schedule()
        for seq in self.scheduler.unschedulable:
            self._finish(seq, "error", "the request needs more KV blocks than the cache has free")
        self.scheduler.unschedulable.clear()
        if batch is None:
            self.flush_outputs()
            return
        try:
            logits = self.runner.run(batch)
            self._account(batch)
            rows = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]
            if self.overlap_outputs:
                self.flush_outputs()  # while the device computes; a stop string may end rows' turns
                still = [i for i, s in enumerate(rows) if s.status is SequenceStatus.RUNNING]
                if len(still) < len(rows):
                    logits, rows = logits[still], [rows[i] for i in still]
            sampled = self.sampler(logits, rows) if rows else None
        except WorkerFailedError:  # the engine cannot run again: the loop fails every request
            raise
        except Exception as exc:  # a failed step fails its requests, never the engine
            logger.exception("model step failed")
            self.flush_outputs()
            for seq in batch.seqs:
                if seq.status is SequenceStatus.RUNNING:
                    self.scheduler.remove(seq)
                    self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
            return
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is SequenceStatus.RUNNING:  # not ended by a stop string meanwhile
                seq.num_computed_tokens += n
                self.block_manager.cache_full_blocks(seq)
        if sampled is not None:
            for seq, token_id, logprobs in zip(rows, sampled.token_ids, sampled.logprobs):
                self._append_token(seq, token_id, logprobs)
        if not self.overlap_outputs:
            self.flush_outputs()

    def _account(self, batch: ScheduledBatch) -> None:
        st = self.stats
        st.num_steps += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            prompt_end = seq.num_history_tokens + seq.num_input_tokens
            in_prompt = max(0, min(n, prompt_end - seq.num_computed_tokens))
            st.num_prompt_tokens_computed += in_prompt
            st.num_generated_tokens_computed += n - in_prompt
        st.num_preemptions = self.scheduler.num_preemptions
        st.num_prefix_query_tokens = self.scheduler.num_prefix_query_tokens
        st.num_prefix_hit_tokens = self.scheduler.num_prefix_hit_tokens

    def _append_token(self, seq: Sequence, token_id: int, logprobs: Optional[dict]) -> None:
        """What the next schedule needs: the token in the sequence, and whether the turn ends here."""
        params = seq.params
        seq.token_ids.append(token_id)  # in the sequence (and so in a kept session's KV) even when not emitted
        seq.num_output_tokens += 1
        finish_reason = None
        if token_id in params.stop_token_ids:
            finish_reason = "stop"
        elif seq.matcher is not None and self._grammar_ends(seq, token_id):
            finish_reason = "stop"  # the grammar ended on its own stop token (the request has none)
        elif seq.num_output_tokens >= params.max_new_tokens:
            finish_reason = "length"
        if finish_reason:
            self.scheduler.remove(seq)  # runs no more; _finish completes the turn once its text is out
        self._unsent.append(_Unsent(seq, token_id, logprobs, finish_reason))

    @staticmethod
    def _grammar_ends(seq: Sequence, token_id: int) -> bool:
        """Feeds a sampled token to the turn's grammar matcher (output tokens only, once each, so a
        preempted and recomputed sequence keeps its matcher as it is); True when the grammar is done."""
        if not seq.matcher.accept_token(token_id):  # the sampler's mask makes this unreachable
            logger.warning("session %d: token %d breaks its response_format; the turn ends", seq.session_id,
                           token_id)
            return True
        return seq.matcher.is_terminated()

    def flush_outputs(self) -> None:
        """Text and deltas of the tokens appended so far; ends the turns they finish."""
        while self._unsent:
            self._send(*self._unsent[0])
            self._unsent.popleft()  # only once sent: if sending raises, abort_all still sees the sequence

    def _send(self, seq: Sequence, token_id: int, logprobs: Optional[dict], finish_reason: Optional[str]) -> None:
        params = seq.params
        if finish_reason == "stop":  # a stop id: it ends the text rather than adding to it
            text, ids = seq.detokenizer.finish(), []
            if params.include_stop_str_in_output:
                text += self.tokenizer.decode([token_id], skip_special_tokens=False)
                ids = [token_id]
                seq.output_ids.append(token_id)
            return self._finish(seq, "stop", text=text, token_ids=ids,
                                logprobs=[logprobs] if ids and logprobs is not None else None)
        seq.output_ids.append(token_id)
        text, hit_stop = seq.detokenizer.step(token_id)
        lp = [logprobs] if logprobs is not None else None
        if hit_stop:
            return self._finish(seq, "stop", text=text, token_ids=[token_id], logprobs=lp)
        if finish_reason == "length":
            return self._finish(seq, "length", text=text + seq.detokenizer.finish(), token_ids=[token_id],
                                logprobs=lp)
        seq.emit(RequestOutput(text, [token_id], seq.num_history_tokens, seq.num_input_tokens,
                               len(seq.output_ids), None, lp))

    def _finish(self, seq: Sequence, reason: str, error: Optional[str] = None, text: str = "",
                token_ids: Optional[List[int]] = None, logprobs=None) -> None:
        """Ends the turn: emits the last delta, then keeps (session) or frees the sequence's KV."""
        self.scheduler.remove(seq)
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        if error:
            logger.warning("session %d failed: %s", seq.session_id, error)
        seq.emit(RequestOutput(text, token_ids or [], seq.num_history_tokens, seq.num_input_tokens,
                               len(seq.output_ids), reason, logprobs, error))
        session = self.sessions.get(seq.session_id)
        if session is None or session.seq is not seq:
            return
        if not (seq.keep_session and reason != "error"):
            self.block_manager.free(seq)
            if not session.pending:
                del self.sessions[seq.session_id]
        seq.status = SequenceStatus.IDLE
        session.last_active = time.monotonic()
        if session.pending:
            self._start(session.pending.popleft())
        else:
            self._cap_idle_sessions()

    # -- kept sessions whose clients may never come back ----------------------------------------

    def _idle_sessions(self) -> List[tuple]:
        return sorted(((s.last_active, sid) for sid, s in self.sessions.items() if s.is_idle))

    def _cap_idle_sessions(self) -> None:
        """Past ``max_sessions`` kept sessions, end the ones idle the longest."""
        idle = self._idle_sessions()
        for _, session_id in idle[:max(0, len(idle) - self.config.max_sessions)]:
            logger.info("session %d ended: more than max_sessions=%d sessions are kept", session_id,
                        self.config.max_sessions)
            self._end_idle(session_id)

    def expire_idle_sessions(self) -> None:
        """End kept sessions idle for longer than ``session_idle_timeout`` seconds."""
        timeout = self.config.session_idle_timeout
        now = time.monotonic()
        if timeout is None or now < self._next_expiry_check:
            return
        self._next_expiry_check = now + min(1.0, timeout)  # called every step: look at most once a second
        deadline = now - timeout
        for last_active, session_id in self._idle_sessions():
            if last_active > deadline:
                break
            logger.info("session %d ended: idle for more than %g s", session_id, timeout)
            self._end_idle(session_id)

    def idle_wakeup_s(self) -> Optional[float]:
        """How long an idle engine thread may sleep before idle sessions must be checked."""
        timeout = self.config.session_idle_timeout
        return None if timeout is None else min(1.0, max(timeout, 0.01))

    def _end_idle(self, session_id: int) -> None:
        # Idle: nothing runs or waits, so no flush is needed (this may run from inside a flush).
        self.block_manager.free(self.sessions.pop(session_id).seq)
        self.stats.num_sessions_ended_idle += 1

    def session_tokens(self, session_id: int) -> int:
        """Tokens the session holds (0 when it does not exist): its next turn continues after them."""
        self.flush_outputs()
        session = self.sessions.get(session_id)
        return session.seq.num_tokens if session else 0

    def _evict_idle_session(self) -> bool:
        """Drop the KV of the least recently used idle session (it is recomputed on its next turn)."""
        idle = [s.seq for s in self.sessions.values() if s.seq.status is SequenceStatus.IDLE and s.seq.block_table]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.arrival)
        self.block_manager.free(victim)
        return True

    def snapshot_stats(self) -> dict:
        self.flush_outputs()
        st = self.stats
        st.num_free_blocks = self.block_manager.num_free_blocks
        st.num_running, st.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        st.num_sessions = len(self.sessions)
        graphs = self.runner.decode_graphs
        st.num_graph_replays = graphs.num_runs if graphs is not None else 0
        steps = getattr(self.runner, "compiled_steps", None)  # (an executor of several ranks has none)
        st.num_compiled_prefill_steps = steps.num_runs if steps is not None else 0
        return st.as_dict()


def _guarded(emit: Callable[[RequestOutput], None]) -> Callable[[RequestOutput], None]:
    """A caller's callback that raises must not take the engine thread (and every other request) down."""
    def guarded(out: RequestOutput) -> None:
        try:
            emit(out)
        except Exception:
            logger.exception("delivering a request's output failed")
    return guarded


def _with_max_new(params: SamplingParams, max_new_tokens: int) -> SamplingParams:
    from dataclasses import replace
    return replace(params, max_new_tokens=max_new_tokens)
