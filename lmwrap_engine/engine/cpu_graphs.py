"""Decode steps compiled by inductor on the CPU: the counterpart of the CUDA graphs (``cuda_graph.py``).

An eager decode step runs 30 layers x dozens of small ops, each paying Python and dispatcher
overhead that at batch 1 rivals its work. ``torch.compile`` turns the whole decode forward, LM
head included, into one generated C++ program per shape. Attention then takes the traceable,
sync-free kernels (``ForwardContext.traceable``): ``kernels/cpu_attention.py`` reads the paged
cache in place over the step's block-table width, after ``write_kv`` there puts the new KV in it
(in place: inductor fuses the write into the layer's attention kernel).

Shapes: the batch and block-table width are dynamic, so few programs serve every step: batch 1,
batches up to the int4 linears' row limit, and larger batches (the linears branch on the row
count). The table is at least ``MIN_WIDTH`` blocks wide, as inductor specialises a size of 1.
Each program is compiled ahead of time and kept on disk whole (``cpu_programs.py``), so a warm start
loads it instead of re-tracing the model and no step pays for Dynamo's guards; the kind is picked here instead. Where
that fails (an older torch), ``torch.compile`` serves, with inductor's FX graph and AOTAutograd caches
(under ``$LMWRAP_CACHE/inductor`` or ``~/.cache/lmwrap/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` is
set), so that its warm start only re-traces. If compiling fails (no C++ compiler, an inductor error) the
runner warns once and decodes eagerly. ``LMWRAP_CPU_COMPILE=0`` or ``eager_mode=True`` turn it off.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

from ..config import EngineConfig, cache_root
from . import cpu_programs
from .context import ForwardContext, StepContext
from .cuda_graph import DecodeGraphs

logger = logging.getLogger("lmwrap_engine")

MIN_WIDTH = 2


def cpu_compile_wanted(config: EngineConfig) -> bool:
    """Whether a CPU engine with this config compiles its decode steps (int8 KV and tensor parallel do not)."""
    return (not config.eager_mode and os.environ.get("LMWRAP_CPU_COMPILE", "1") != "0"
            and config.quant_policy != 8 and config.tp == 1)


def inductor_cache_dir() -> str:
    """Where compiled programs are kept: ``TORCHINDUCTOR_CACHE_DIR`` if the user set it, else under lmwrap's cache."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen  # (inductor writes its default back into the variable once it has used it)
    return os.path.join(cache_root(), "inductor")


def _decode_logits(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(model(input_ids, positions))


_compiled_decode_logits = None


def compiled_decode_logits():
    """``_decode_logits`` under ``torch.compile``, one per process: engines of the same architecture and
    shapes share its programs (the model is an argument, its parameters graph inputs)."""
    global _compiled_decode_logits
    if _compiled_decode_logits is None:
        _compiled_decode_logits = torch.compile(_decode_logits, fullgraph=True, dynamic=False,
                                                options=cpu_programs.PROGRAM_OPTIONS)
    return _compiled_decode_logits


class CompiledDecode(DecodeGraphs):
    """Decode-only batches through fixed buffers (no padding: shapes are dynamic), run by a compiled
    forward that returns fp32 logits: one program per kind of batch, kept on disk whole
    (``cpu_programs.py``; ``torch.compile`` with Dynamo's guards where that fails). After a failed
    compile it runs eagerly for good."""

    def __init__(self, model: torch.nn.Module, step_context: StepContext, max_batch_size: int,
                 max_blocks_per_seq: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 model_config: str = ""):
        super().__init__(model, step_context, max_batch_size, max(max_blocks_per_seq, MIN_WIDTH), hidden_size,
                         dtype, device, capture=False)
        self.batch_sizes = list(range(1, max_batch_size + 1))  # never padded: the KV write takes real slots only
        self.computes_logits = True
        self.failed = False
        self.model_config = model_config
        self.programs = {}  # kind of batch -> compiled program
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()

    def _traced_context(self, bs: int, width: int) -> ForwardContext:
        ctx = self._context(bs)
        ctx.decode_block_tables = self.block_tables[:bs, :width]
        ctx.traceable = True
        if bs > 1:
            for t in (ctx.slot_mapping, ctx.decode_block_tables, ctx.decode_kv_lens):
                torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(ctx.decode_block_tables, 1)
        return ctx

    def _kind(self, bs: int) -> str:
        from ..models.layers.quant_linear import MAX_INT4_ROWS
        return "1" if bs == 1 else f"2..{MAX_INT4_ROWS}" if bs <= MAX_INT4_ROWS else f">{MAX_INT4_ROWS}"

    def _program(self, kind: str, ids: torch.Tensor, pos: torch.Tensor):
        """``(program, how, where)`` for the kind: loaded from disk or compiled now (and saved), else
        ``torch.compile``'s, which compiles on its first call."""
        try:
            path = cpu_programs.program_path(self.model, self.model_config, kind)
            program, loaded = cpu_programs.load_or_compile(_decode_logits, (self.model, ids, pos), path)
            return program, "loaded" if loaded else "compiled and saved", path
        except Exception as exc:  # an older torch, a model the ahead-of-time compile cannot serialise
            logger.warning("compiling the CPU decode step ahead of time failed (%s: %s); using torch.compile",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return compiled_decode_logits(), "compiled", os.environ["TORCHINDUCTOR_CACHE_DIR"]

    def _forward(self, bs: int) -> torch.Tensor:
        if self.failed:
            return self.model.compute_logits(super()._forward(bs)[:bs])
        ids, pos = self.input_ids[:bs], self.positions[:bs]
        if bs > 1:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(pos, 0)
        ctx = self._traced_context(bs, max(self.width, MIN_WIDTH))
        kind = self._kind(bs)
        try:
            with self.step_context.use(ctx):
                program = self.programs.get(kind)
                if program is not None:
                    return program(self.model, ids, pos)
                start = time.perf_counter()
                program, how, where = self._program(kind, ids, pos)
                logits = program(self.model, ids, pos)
        except Exception as exc:  # no compiler, an inductor error: decode eagerly from now on
            logger.warning("compiling the CPU decode step failed (%s: %s); decoding eagerly",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.failed = True
            return self._forward(bs)
        self.programs[kind] = program
        logger.info("%s the CPU decode step for batch %s in %.1f s (%s)", how, kind, time.perf_counter() - start,
                    where)
        return logits

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile (or load from disk) the batch-1 program. Writes one token of KV into slot 0, which no
        sequence holds yet at load time."""
        # One eager forward first, shaped as a one-token prefill (plain torch attention; an eager decode
        # would first compile the eager path's own attention kernel, seconds): it builds the lazy tables
        # (rotary cos/sin) that the trace must not see empty.
        int32 = dict(dtype=torch.int32, device=self.input_ids.device)
        zero = torch.zeros(1, **int32)
        prefill = ForwardContext(slot_mapping=torch.zeros_like(self.input_ids[:1]), num_decode_tokens=0,
                                 decode_block_tables=self.block_tables[:0], decode_kv_lens=zero[:0],
                                 prefill_block_tables=zero.view(1, 1), prefill_cu_seqlens_q=torch.tensor([0, 1], **int32),
                                 prefill_kv_lens=torch.ones(1, **int32))
        if not self.failed:
            with self.step_context.use(prefill):
                self.model(torch.zeros_like(self.input_ids[:1]), torch.zeros_like(self.positions[:1]))
        self.run(input_ids=[0], positions=[0], slots=[0], kv_lens=[1], block_tables=[[0]])
