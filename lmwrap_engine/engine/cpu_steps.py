"""Prefill and mixed steps compiled by inductor on the CPU; decode-only steps go to ``cpu_graphs.py``.

Run eagerly, a 128-token prefill of SmolLM2-135M spends a fifth of its time outside the linears and
attention, in 30 layers x a dozen elementwise ops (norms, rotary, SiLU, residual adds), each one a
pass over memory plus the dispatcher. Compiled, inductor fuses them; the linears keep their
prepacked kernels. Attention, with the KV write, is one opaque op (``kernels/cpu_attention_step.py``)
that runs the eager kernels, so one program serves every step of more than ``MAX_INT4_ROWS`` tokens,
whatever its mix of decode rows and prefill chunks: the token count is the program's one dynamic
dim, and the step's metadata goes through fixed buffers. Smaller steps stay eager (the linears
branch on the row count; the program is traced for more rows).

The program is compiled at start-up, or loaded from disk (``cpu_programs.py``), like the batch-1
decode program. If compiling fails the runner warns once and runs these steps eagerly.
"""
from __future__ import annotations

import logging
import time

import torch

from . import cpu_programs
from .context import ForwardContext, StepBuffers, StepContext

logger = logging.getLogger("lmwrap_engine")


def _hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model(input_ids, positions)


class CompiledSteps:
    """Steps of more than ``MAX_INT4_ROWS`` tokens, of up to ``max_batch_size`` sequences whose block
    tables are at most ``max_blocks_per_seq`` wide, through one compiled forward."""

    def __init__(self, model: torch.nn.Module, step_context: StepContext, max_batch_size: int,
                 max_blocks_per_seq: int, device: torch.device, model_config: str = ""):
        from ..models.layers.quant_linear import MAX_INT4_ROWS
        self.model = model
        self.step_context = step_context
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.min_tokens = MAX_INT4_ROWS + 1
        self.model_config = model_config
        int32 = dict(dtype=torch.int32, device=device)
        self.buffers = StepBuffers(block_tables=torch.zeros(max_batch_size, max_blocks_per_seq, **int32),
                                   kv_lens=torch.zeros(max_batch_size, **int32),
                                   cu_seqlens_q=torch.zeros(max_batch_size + 1, **int32),
                                   counts=torch.zeros(3, **int32))
        self.program = None
        self.failed = False
        self.num_runs = 0  # steps the program ran

    def fits(self, num_tokens: int, num_seqs: int, widest_table: int) -> bool:
        return (not self.failed and num_tokens >= self.min_tokens and num_seqs <= self.max_batch_size
                and widest_table <= self.max_blocks_per_seq)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The hidden states of the step that ``ctx`` (from the runner's ``_prepare``) describes; it must
        ``fit``. Eager after a failed compile."""
        b = self.buffers
        num_decode = ctx.num_decode_tokens
        num_seqs = num_decode + ctx.prefill_kv_lens.shape[0]
        width = max(ctx.decode_block_tables.shape[1], ctx.prefill_block_tables.shape[1])
        b.block_tables[:num_decode, :width] = ctx.decode_block_tables
        b.block_tables[num_decode:num_seqs, :width] = ctx.prefill_block_tables
        b.kv_lens[:num_decode] = ctx.decode_kv_lens
        b.kv_lens[num_decode:num_seqs] = ctx.prefill_kv_lens
        b.cu_seqlens_q[:num_seqs - num_decode + 1] = ctx.prefill_cu_seqlens_q
        b.counts.copy_(torch.tensor([num_seqs, num_decode, width], dtype=torch.int32))
        for t in (input_ids, positions, ctx.slot_mapping):
            torch._dynamo.mark_dynamic(t, 0)
        traced = ForwardContext(slot_mapping=ctx.slot_mapping, num_decode_tokens=num_decode,
                                decode_block_tables=ctx.decode_block_tables, decode_kv_lens=ctx.decode_kv_lens,
                                prefill_block_tables=ctx.prefill_block_tables,
                                prefill_cu_seqlens_q=ctx.prefill_cu_seqlens_q, prefill_kv_lens=ctx.prefill_kv_lens,
                                step_buffers=b)
        with self.step_context.use(traced):
            if self.program is not None:
                self.num_runs += 1
                return self.program(self.model, input_ids, positions)
            if not self.failed:
                try:
                    return self._compile_and_run(input_ids, positions)
                except Exception as exc:  # no compiler, an inductor error: these steps run eagerly from now on
                    logger.warning("compiling the CPU prefill step failed (%s: %s); running it eagerly",
                                   type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    self.failed = True
        with self.step_context.use(ctx):
            return self.model(input_ids, positions)

    def _compile_and_run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        path = cpu_programs.program_path(self.model, self.model_config, "prefill and mixed steps")
        program, loaded = cpu_programs.load_or_compile(_hidden_states, (self.model, input_ids, positions), path)
        hidden = program(self.model, input_ids, positions)
        self.program = program
        logger.info("%s the CPU prefill step in %.1f s (%s)", "loaded" if loaded else "compiled and saved",
                    time.perf_counter() - start, path)
        return hidden

    @torch.inference_mode()
    def warm_up(self, block_size: int) -> None:
        """Compiles (or loads from disk) the program by running a prefill of ``min_tokens`` tokens into
        slots 0.., which no sequence holds yet at load time."""
        n = self.min_tokens
        device = self.buffers.kv_lens.device
        int32 = dict(dtype=torch.int32, device=device)
        blocks = -(-n // block_size)
        ctx = ForwardContext(slot_mapping=torch.arange(n, dtype=torch.int64, device=device), num_decode_tokens=0,
                             decode_block_tables=torch.zeros(0, blocks, **int32),
                             decode_kv_lens=torch.zeros(0, **int32),
                             prefill_block_tables=torch.arange(blocks, **int32).view(1, blocks),
                             prefill_cu_seqlens_q=torch.tensor([0, n], **int32),
                             prefill_kv_lens=torch.tensor([n], **int32))
        ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.run(ids, torch.arange(n, dtype=torch.int64, device=device), ctx)
