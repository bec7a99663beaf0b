"""Request state: token ids and counters; the scheduler moves counters and block tables only."""
from __future__ import annotations

import enum
from typing import Callable, List, Optional

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()   # this turn is over; a kept session may start another
    IDLE = enum.auto()       # a session between turns: KV kept, nothing to run


class Sequence:
    """One session's token stream. A plain request is a session of one turn.

    Invariants: ``num_computed_tokens <= num_tokens``; ``block_table`` covers the computed tokens;
    ``token_ids[:num_computed_tokens]`` have their KV in the cache; ``block_hashes[i]`` is the chain
    hash of full computed block ``i`` (only with prefix caching; each computed once, when it fills).
    """

    def __init__(self, seq_id: int, session_id: int):
        self.seq_id = seq_id
        self.session_id = session_id
        self.token_ids: List[int] = []
        self.num_computed_tokens = 0
        self.block_table: List[int] = []
        self.block_hashes: List[int] = []
        self.in_flight_hash: Optional[int] = None  # the prompt block it was admitted to compute first
        self.status = SequenceStatus.IDLE
        self.keep_session = False
        self.arrival = 0
        # Images of the session, by offset; their placeholder token ids are pad ids (vl/inputs.py).
        self.mm_items: list = []
        self.mrope_delta = 0  # M-RoPE: how far text positions after the images are shifted
        # Per-turn state, reset by start_turn().
        self.params: Optional[SamplingParams] = None
        self.num_history_tokens = 0
        self.num_input_tokens = 0
        self.output_ids: List[int] = []
        self.num_output_tokens = 0
        self.generator = None
        self.matcher = None  # xgrammar matcher of a response_format: advances only on sampled tokens
        self.detokenizer = None
        self.emit: Optional[Callable] = None
        self.finish_reason: Optional[str] = None

    def start_turn(self, input_ids: List[int], params: SamplingParams, emit: Callable, arrival: int,
                   keep_session: bool, generator=None, detokenizer=None, matcher=None) -> None:
        self.num_history_tokens = len(self.token_ids)
        self.token_ids.extend(input_ids)
        self.num_input_tokens = len(input_ids)
        self.params = params
        self.output_ids = []
        self.num_output_tokens = 0
        self.generator = generator
        self.matcher = matcher
        self.detokenizer = detokenizer
        self.emit = emit
        self.arrival = arrival
        self.keep_session = keep_session
        self.finish_reason = None
        self.status = SequenceStatus.WAITING

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.block_table)

    def __repr__(self):
        return (f"Sequence(id={self.seq_id}, session={self.session_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.name})")
