"""Compiled CPU programs (decode steps, the prefill step) kept on disk whole, so that a warm start does
not trace the model again.

``torch.compile``'s own caches (inductor's FX graph cache, AOTAutograd's) keep the generated code, but
every new process still traces the model with Dynamo to find it: about 6 s for SmolLM2-135M's 30
layers on a 2-core AVX-512 EPYC, the largest part of a warm start. torch's ahead-of-time compile
(``torch.compile(fn).aot_compile``) gives a program that is saved whole (Dynamo's bytecode and the
inductor code) and loads in about a second (the first in a process also imports torch's compiler,
~2 s; SmolLM2-135M's batch-1 program on that EPYC: 0.8 s, 3.2 s with the imports).

A loaded program runs without Dynamo's guards (the checks of the shapes, dtypes and attributes it was
traced under, run before every call): the caller picks the program by its own batch kind, and a file
is only used by a model whose every traced-in fact matches its name, a digest of: torch, Python, the
CPU's capability (torch's, and the instruction set inductor generates for), lmwrap's source, the
decode attention it calls (``kernels/cpu_paged_decode.py``'s op where that is built, else inductor's), the
model's config, its module tree, the shape, stride and dtype of every tensor its modules hold (the
KV cache included), and the caller's ``kind``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Tuple

import torch

from kernels import cpu_compiled, cpu_paged_decode

from ..config import cache_root

logger = logging.getLogger("lmwrap_engine")

_SOURCE_DIGEST = None
UNUSED_DAYS = 14
# Inductor re-checks the size and stride of every input and extern-kernel output on each call: ~600
# checks per SmolLM2-135M step, 0.4 ms of a 10.5 ms batch-1 step on a 2-core Xeon (A/B in one process).
# What they guard is fixed here: every module tensor's shape is in the file's name, and the caller's
# buffers have the traced shapes (only the dims marked dynamic vary).
PROGRAM_OPTIONS = {"size_asserts": False}


def programs_dir() -> str:
    """``$LMWRAP_CACHE/decode-programs``, else ``~/.cache/lmwrap/decode-programs`` (the prefill program too;
    the name predates it)."""
    return os.path.join(cache_root(), "decode-programs")


def _source_digest() -> str:
    """Of every Python file of lmwrap_engine and kernels: any change to what a trace may inline."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import kernels
        h = hashlib.sha256()
        for package in (pathlib.Path(__file__).parents[1], pathlib.Path(kernels.__file__).parent):
            for path in sorted(package.rglob("*.py")):
                h.update(str(path.relative_to(package.parent)).encode())
                h.update(path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def _tensors_signature(model: torch.nn.Module) -> str:
    """Shape, stride, dtype and device of every tensor each module holds (parameters, buffers and plain
    attributes such as the KV cache), and every module's type and ``repr`` of its own settings."""
    lines = []
    for name, module in model.named_modules():
        lines.append(f"{name}: {type(module).__qualname__}({module.extra_repr()})")
        held = {**module._parameters, **module._buffers,
                **{k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}}
        for key, t in sorted(held.items()):
            if t is not None:
                lines.append(f"  {key}: {tuple(t.shape)} {t.stride()} {t.dtype} {t.device}")
    return "\n".join(lines)


def vec_isa() -> str:
    """The instruction set inductor generates CPU code for (``str(pick_vec_isa())``), without its probes.

    Inductor's first ``pick_vec_isa()`` in a process compiles a probe for each instruction set the CPU
    reports and loads it in a child Python, to learn which ones the compiler and loader handle: 1.5 s of
    a 10 s warm start on a 2-core Xeon. That answer depends only on torch, the compiler and the CPU, so
    it is kept on disk under their digest. A later process that finds every set the CPU reports
    recorded as passing tells inductor so (``config.cpp.vec_isa_ok``), which skips the probes and picks
    what they would; if one failed, the probes run every time, as without the record. (x86 only.)
    """
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa
    if platform.machine() not in ("x86_64", "AMD64") or inductor_config.cpp.vec_isa_ok is not None:
        return str(cpu_vec_isa.pick_vec_isa())
    flags = cpu_vec_isa.x86_isa_checker()
    reported = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                if all(flag in flags for flag in str(isa).split())]
    h = hashlib.sha256()
    for part in (torch.__version__, sys.executable, os.environ.get("CXX", ""), os.environ.get("PATH", ""),
                 *reported):
        h.update(part.encode())
        h.update(b"\0")
    folder = os.path.join(cache_root(), "vec-isa")
    record = os.path.join(folder, f"{h.hexdigest()[:32]}.txt")
    if os.path.exists(record):
        with open(record) as f:
            if f.read().split("\n") == reported:
                inductor_config.cpp.vec_isa_ok = True
        return str(cpu_vec_isa.pick_vec_isa())
    picked = str(cpu_vec_isa.pick_vec_isa())  # runs the probes
    try:
        os.makedirs(folder, exist_ok=True)
        partial = f"{record}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            f.write("\n".join(str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()))
        os.replace(partial, record)
    except OSError:  # a read-only cache: the next process probes again
        pass
    return picked


def pin_vec_isa() -> str:
    """The instruction set picked for this process (``vec_isa()``, without repeating inductor's probes), with
    inductor's vector width pinned to it (``kernels.cpu_compiled.pin_vector_width``: its FX graph cache
    would otherwise hand one set's code to a process limited to another)."""
    picked = vec_isa()
    cpu_compiled.pin_vector_width()
    return picked


def program_path(model: torch.nn.Module, model_config: str, kind: str) -> str:
    """Where the program for ``model`` (configured by ``model_config``, e.g. ``repr(ModelArgs)``) and
    batch ``kind`` is kept."""
    h = hashlib.sha256()
    attention = "kernel" if cpu_paged_decode.available() else "compiled"  # which one the trace calls
    for part in (torch.__version__, sys.version, torch.backends.cpu.get_cpu_capability(), vec_isa(),
                 _source_digest(), model_config, _tensors_signature(model), kind, attention):
        h.update(part.encode())
        h.update(b"\0")
    return os.path.join(programs_dir(), f"decode-{h.hexdigest()[:32]}.bin")


def load_or_compile(fn: Callable, example_args: Tuple[Any, ...], path: str) -> Tuple[Callable, bool]:
    """``(program, loaded)``: ``fn`` compiled for ``example_args`` (fullgraph, static shapes except the
    dims marked dynamic), read from ``path`` when it holds one, else compiled and written there.
    A file that does not load (another torch wrote it, a truncated write) is compiled over."""
    from torch._dynamo.aot_compile import AOTCompiledFunction
    if os.path.exists(path):
        try:
            from torch._dynamo import convert_frame
            from torch._guards import CompileContext, compile_context
            with open(path, "rb") as f, compile_context(CompileContext(convert_frame.get_compile_id({}))):
                program = AOTCompiledFunction.deserialize(f.read(), f_globals=fn.__globals__)
            program.disable_guard_check()
            os.utime(path)  # in use: kept by the pruning below
            return program, True
        except Exception as exc:
            logger.warning("could not load the compiled CPU program %s (%s: %s); compiling it again",
                           path, type(exc).__name__, exc)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=PROGRAM_OPTIONS)
    program = compiled.aot_compile((example_args, {}))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        program.save_compiled_function(path)
        _prune(os.path.dirname(path))
    except Exception as exc:  # a read-only cache: the program still serves this process
        logger.warning("could not save the compiled CPU program to %s (%s: %s)", path, type(exc).__name__, exc)
    program.disable_guard_check()
    return program, False


def _prune(folder: str) -> None:
    """Removes programs neither written nor loaded for ``UNUSED_DAYS`` (an older lmwrap's, a model's
    gone): each source change or model shape adds files of a few MB."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for entry in os.scandir(folder):
        try:
            if entry.name.startswith("decode-") and entry.stat().st_mtime < cutoff:
                os.remove(entry.path)
        except OSError:  # another process removed it first
            pass
