"""Loads the model, owns the KV cache, and turns a scheduled batch into logits."""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import torch

from kernels import cpu_paged_decode

from ..config import EngineConfig
from ..loader.safetensors import iterate_weights
from ..models.config import ModelArgs
from ..models.layers.attention import PagedAttention
from ..models.layers.int8_linear import convert_int8_linears
from ..models.layers.bf16_decode_linear import Bf16DecodeLinear, convert_bf16_decode_linears
from ..models.layers.q8_weight import find_q8_lattice
from ..models.layers.quant_linear import convert_int4_linears, int4_pays_off, prepack_dense_weights
from ..models.registry import build_model
from .context import ForwardContext, StepContext
from .cpu_features import cpu_has_fast_bf16, int8_head_pays_off, physical_cores
from . import cpu_programs
from .cpu_graphs import CompiledDecode, cpu_compile_wanted
from .cpu_steps import CompiledSteps
from .host_memory import advise_huge_pages, collapse_huge_pages
from .cuda_graph import DecodeGraphs
from .scheduler import ScheduledBatch

logger = logging.getLogger("lmwrap_engine")

CPU_KV_CACHE_BYTES = 4 << 30
MAX_GRAPH_BATCH_SIZE = 512
# Decode graphs serve sequences up to this long (vLLM's max_seq_len_to_capture); longer ones run
# eagerly. It bounds the block-table width the attention grid is sized for, so a 128k session
# length does not shrink the attention's parallelism for everyone.
MAX_GRAPH_CONTEXT = 8192
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device_type: str) -> torch.device:
    if device_type == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' was asked for but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(device_type)


def resolve_dtype(dtype: str, args: ModelArgs, device: torch.device) -> torch.dtype:
    """The compute dtype: an explicit choice as given; ``'auto'`` the config's dtype on CUDA, and on CPU
    bf16 where the CPU computes it fast (AVX-512 BF16 or AMX), else fp32, whatever the config says:
    decode reads every weight each step, so bf16 halves its bytes where the hardware allows."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return _DTYPES.get(str(args.dtype).replace("torch.", ""), torch.bfloat16)


def resolve_session_len(session_len: Optional[int], args: ModelArgs) -> int:
    """The longest sequence the engine runs: ``session_len``, or the model's ``max_position_embeddings``
    when unset. A longer ``session_len`` is capped there with a warning: the rotary tables end at that
    position, and a sequence running past it would fail mid-reply."""
    limit = args.max_position_embeddings
    if session_len is not None and session_len > limit:
        logger.warning("session_len=%d is past the model's max_position_embeddings=%d: sequences stop at %d "
                       "tokens", session_len, limit, limit)
    return min(session_len or limit, limit)


def small_batch_dtype(requested: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What linears compute in for calls of a few rows (decode): ``dtype``, except under ``'auto'`` on a CPU
    that fell back to fp32 for want of fast bf16, where bf16 weights and activations serve them (decode
    reads every weight each step; torch's bf16 matrix-vector kernels are fast on AVX2 too, its bf16
    matrix products are not, so prefill and larger batches stay fp32)."""
    if requested == "auto" and device.type == "cpu" and dtype == torch.float32:
        return torch.bfloat16
    return dtype


def use_physical_cores() -> None:
    """Caps torch's intra-op threads at the physical cores this process may use: SMT siblings share a
    core's vector units, so a thread per sibling only adds contention. ``OMP_NUM_THREADS`` or a lower
    thread count the user set is left as it is."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > physical_cores():
        torch.set_num_threads(physical_cores())


def check_weight_quant(config: EngineConfig, device: torch.device) -> None:
    """Raises ``NotImplementedError`` for a ``weight_quant`` this device / parallel layout has no kernels for."""
    if config.weight_quant is None:
        return
    if device.type != "cpu":
        raise NotImplementedError(f"weight_quant={config.weight_quant!r} is implemented for the CPU only, not "
                                  f"{device.type}; leave weight_quant=None there")
    if config.tp > 1:
        raise NotImplementedError(f"weight_quant={config.weight_quant!r} is not implemented with tp > 1 "
                                  f"(got tp={config.tp}); use tp=1 or weight_quant=None")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemFree"])


def small_batch_weights(model: torch.nn.Module) -> List[torch.Tensor]:
    """The weight copies that decode steps of few rows read: every layer keeps them (4-bit, 8-bit, bf16)
    as non-persistent buffers, beside the checkpoint's own parameters."""
    return [module._buffers[name] for module in model.modules() for name in module._non_persistent_buffers_set
            if module._buffers.get(name) is not None]


class ModelRunner:
    def __init__(self, model_dir: str, config: EngineConfig, tp_rank: int = 0):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.args = ModelArgs.from_hf_config(json.load(f))
        self.args.tp_rank, self.args.tp_size = tp_rank, config.tp  # tp > 1: in a worker (engine/worker.py)
        self.config = config
        self.device = resolve_device(config.device_type)
        if self.device.type == "cpu":
            if config.tp == 1:
                use_physical_cores()
            cpu_programs.pin_vec_isa()  # before anything here compiles
            cpu_paged_decode.available()  # builds the decode attention kernel here (once, ~30 s), not in a step
        self.dtype = resolve_dtype(config.dtype, self.args, self.device)
        self.small_batch_dtype = small_batch_dtype(config.dtype, self.dtype, self.device)
        check_weight_quant(config, self.device)
        self.args.disable_vision_encoder = config.disable_vision_encoder
        self.model = self._load_model(model_dir)
        self.step_context = StepContext()
        self.session_len = resolve_session_len(config.session_len, self.args)
        self.block_size = config.block_size
        self.num_blocks = self._allocate_kv_cache()
        self.decode_graphs = None
        self.compiled_steps = None  # CPU: the prefill and mixed steps
        if self.device.type == "cuda" and not config.eager_mode:
            self.decode_graphs = self.make_decode_graphs(capture=True)
        elif self.device.type == "cpu" and cpu_compile_wanted(config):
            self.decode_graphs = self.make_compiled_decode()
            self.compiled_steps = self.make_compiled_steps()

    def make_decode_graphs(self, capture: bool) -> DecodeGraphs:
        """Decode through fixed buffers: captured as CUDA graphs, or run eagerly (``capture=False``)."""
        max_batch = min(self.config.max_batch_size, MAX_GRAPH_BATCH_SIZE)
        max_blocks = -(-min(self.session_len, MAX_GRAPH_CONTEXT) // self.block_size)
        return DecodeGraphs(self.model, self.step_context, max_batch, max_blocks, self.args.hidden_size,
                            self.dtype, self.device, capture=capture)

    def make_compiled_decode(self) -> CompiledDecode:
        """Decode through an inductor-compiled forward (CPU), its batch-1 program compiled or loaded now."""
        max_batch = min(self.config.max_batch_size, MAX_GRAPH_BATCH_SIZE)
        max_blocks = -(-min(self.session_len, MAX_GRAPH_CONTEXT) // self.block_size)
        graphs = CompiledDecode(self.model, self.step_context, max_batch, max_blocks, self.args.hidden_size,
                                self.dtype, self.device, model_config=repr(self.args))
        graphs.warm_up()
        return graphs

    def make_compiled_steps(self) -> CompiledSteps:
        """Prefill and mixed steps through an inductor-compiled forward (CPU), compiled or loaded now."""
        steps = CompiledSteps(self.model, self.step_context, self.decode_graphs.max_batch_size,
                              self.decode_graphs.max_blocks_per_seq, self.device, model_config=repr(self.args))
        steps.warm_up(self.block_size)
        return steps

    def _load_model(self, model_dir: str) -> torch.nn.Module:
        # A float32 checkpoint (a converted GGUF) loads in fp32 first, so that 4-bit weights are
        # recognised before bf16 rounding blurs them (quant_linear.py).
        int4 = (self.config.load_format != "dummy" and int4_pays_off(self.device, self.small_batch_dtype)
                and str(self.args.dtype).replace("torch.", "") == "float32")
        with torch.device("meta"):
            model = build_model(self.args)
        model = model.to_empty(device=self.device).to(torch.float32 if int4 else self.dtype)
        model.tie_weights()
        with torch.no_grad():
            if self.config.load_format == "dummy":
                from ..loader.dummy import init_dummy_weights
                init_dummy_weights(model)
            else:
                # tp > 1: each rank reads only its slices of the checkpoint
                model.load_weights(iterate_weights(model_dir, lazy=self.args.tp_size > 1))
            bf16_decode = self.config.weight_quant != "int8" and self.small_batch_dtype != self.dtype
            head_q8 = None
            if int4:
                if bf16_decode and hasattr(model, "lm_head") and int8_head_pays_off():  # for a Bf16DecodeLinear head
                    head_q8 = find_q8_lattice(model.lm_head.weight)
                convert_int4_linears(model, self.dtype, self.small_batch_dtype)
                model = model.to(self.dtype)  # (the 4-bit kernel's scales keep their dtype)
            # after int4: linears kept 4-bit are no nn.Linear any more
            if self.config.weight_quant == "int8":
                convert_int8_linears(model, self.small_batch_dtype)
            elif bf16_decode:
                convert_bf16_decode_linears(model)
            if head_q8 is not None and isinstance(model.lm_head, Bf16DecodeLinear):  # after the last .to()
                model.lm_head.q8 = head_q8
                logger.info("LM head kept 8-bit (GGUF Q8_0) for the compiled batch-1 step")
            if self.device.type == "cpu":
                prepack_dense_weights(model)  # after the last .to()
                collapsed = collapse_huge_pages(small_batch_weights(model))
                if collapsed:
                    logger.info("%.0f MiB of small-batch weights in huge pages", collapsed / 2**20)
        return model.eval()

    def kv_bytes_per_token(self) -> int:
        a = self.args
        elem = 1 if self.config.quant_policy == 8 else self.dtype.itemsize
        per_head = a.head_dim * elem + (2 * self.dtype.itemsize if self.config.quant_policy == 8 else 0)
        return 2 * a.num_layers * a.local_num_kv_heads * per_head

    def _allocate_kv_cache(self) -> int:
        a = self.args
        bytes_per_block = self.kv_bytes_per_token() * self.block_size
        num_blocks = self.config.num_gpu_blocks
        if not num_blocks:
            budget = int(available_memory(self.device) * self.config.cache_max_entry_count)
            if self.device.type == "cpu":
                # Host memory is shared with everything else (vLLM's CPU backend also defaults to 4 GiB).
                budget = min(budget, CPU_KV_CACHE_BYTES)
            num_blocks = budget // bytes_per_block
            if a.tp_size > 1:  # every rank must hold the same blocks
                from .distributed import agree_min
                num_blocks = agree_min(num_blocks)
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache; lower the model size or raise "
                               "cache_max_entry_count, or set num_gpu_blocks")
        quant = self.config.quant_policy == 8
        cache_dtype = torch.uint8 if quant else self.dtype
        shape = (a.num_layers, num_blocks, self.block_size, a.local_num_kv_heads, a.head_dim)
        # torch.empty: host pages are only touched (and counted) when a block is first written, in
        # 2 MiB steps per layer where transparent huge pages are granted.
        self.k_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=cache_dtype, device=self.device)
        caches = [self.k_cache, self.v_cache]
        if quant:
            sz_shape = shape[:-1] + (2,)
            self.k_scales_zeros = torch.empty(sz_shape, dtype=self.dtype, device=self.device)
            self.v_scales_zeros = torch.empty(sz_shape, dtype=self.dtype, device=self.device)
            caches += [self.k_scales_zeros, self.v_scales_zeros]
        for cache in caches:
            advise_huge_pages(cache)  # fewer first-touch page faults on CPU; a no-op on GPU
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for i, attn in enumerate(layers):
            attn.step_context = self.step_context
            attn.k_cache, attn.v_cache = self.k_cache[i], self.v_cache[i]
            if quant:
                attn.k_scales_zeros, attn.v_scales_zeros = self.k_scales_zeros[i], self.v_scales_zeros[i]
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * bytes_per_block / 2**20)
        return num_blocks

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        input_ids: List[int] = []
        positions: List[int] = []
        slots: List[int] = []
        cu_seqlens = [0]
        kv_lens: List[int] = []
        logits_indices: List[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            cu_seqlens.append(cu_seqlens[-1] + n)
            kv_lens.append(end)
            if end == seq.num_tokens:
                logits_indices.append(cu_seqlens[-1] - 1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]

        pin = self.device.type == "cuda"

        def tensor(x, dtype=torch.int32):
            return torch.tensor(x, dtype=dtype, pin_memory=pin).to(self.device, non_blocking=True)

        block_tables = tensor(tables)
        kv_lens_t = tensor(kv_lens)
        cu_t = tensor(cu_seqlens)
        nd = batch.num_decode_seqs
        ctx = ForwardContext(
            slot_mapping=tensor(slots, torch.int64), num_decode_tokens=nd,
            decode_block_tables=block_tables[:nd], decode_kv_lens=kv_lens_t[:nd],
            prefill_block_tables=block_tables[nd:], prefill_kv_lens=kv_lens_t[nd:],
            prefill_cu_seqlens_q=cu_t[nd:] - nd)
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), ctx, tensor(logits_indices, torch.int64)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Runs one step; returns fp32 logits for the sequences whose last token was computed, in batch order."""
        if batch.copies:
            self.copy_blocks(batch.copies)
        if self._fits_decode_graphs(batch):
            out = self._run_decode_graphs(batch)
            return out if self.decode_graphs.computes_logits else self.model.compute_logits(out)
        input_ids, positions, ctx, logits_indices = self._prepare(batch)
        if any(s.mm_items for s in batch.seqs):  # images: their embeddings where they sit
            from ..vl.inputs import multimodal_inputs
            input_ids, embeds, positions = multimodal_inputs(self.model, batch, input_ids, positions,
                                                             self.args.vocab_size)
            with self.step_context.use(ctx):
                hidden = self.model(input_ids, positions, embeds)
            return self.model.compute_logits(hidden[logits_indices])
        if self._fits_compiled_steps(batch, input_ids):
            hidden = self.compiled_steps.run(input_ids, positions, ctx)
        else:
            with self.step_context.use(ctx):
                hidden = self.model(input_ids, positions)
        return self.model.compute_logits(hidden[logits_indices])

    def copy_blocks(self, pairs) -> None:
        """KV (and int8 scales) of block ``src`` into block ``dst`` for each ``(src, dst)``, all layers at once."""
        from kernels.reference import copy_blocks
        caches = [self.k_cache, self.v_cache]
        if self.config.quant_policy == 8:
            caches += [self.k_scales_zeros, self.v_scales_zeros]
        src, dst = zip(*pairs)
        copy_blocks(caches, torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))

    def _fits_decode_graphs(self, batch: ScheduledBatch) -> bool:
        graphs = self.decode_graphs
        return (graphs is not None and batch.num_decode_seqs == len(batch.seqs) <= graphs.max_batch_size
                and all(len(s.block_table) <= graphs.max_blocks_per_seq for s in batch.seqs)
                and all(s.token_ids[s.num_computed_tokens] < self.args.vocab_size for s in batch.seqs))

    def _fits_compiled_steps(self, batch: ScheduledBatch, input_ids: torch.Tensor) -> bool:
        steps = self.compiled_steps
        return (steps is not None
                and steps.fits(input_ids.shape[0], len(batch.seqs), max(len(s.block_table) for s in batch.seqs))
                and 0 <= int(input_ids.min()) and int(input_ids.max()) < self.args.vocab_size)

    def _run_decode_graphs(self, batch: ScheduledBatch) -> torch.Tensor:
        bs = self.block_size
        positions = [s.num_computed_tokens for s in batch.seqs]
        return self.decode_graphs.run(
            input_ids=[s.token_ids[p] for s, p in zip(batch.seqs, positions)],
            positions=[p + s.mrope_delta for s, p in zip(batch.seqs, positions)],
            slots=[s.block_table[p // bs] * bs + p % bs for s, p in zip(batch.seqs, positions)],
            kv_lens=[p + 1 for p in positions], block_tables=[s.block_table for s in batch.seqs])
