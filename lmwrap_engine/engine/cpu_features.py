"""What the host CPU offers the engine: its instruction-set flags, whether bf16 is fast, its cores.

torch picks its CPU kernels by ``ATEN_CPU_CAPABILITY`` (and oneDNN by ``ONEDNN_MAX_CPU_ISA``); a
process limited to AVX2 that way has no fast bf16 even on a CPU that has it, so it is treated as
the AVX2-only CPU it emulates.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import FrozenSet, Iterable

# The flags that decide CPU speed in our kernels, in the order they are reported.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def torch_cpu_capability() -> str:
    """The instruction set torch's CPU kernels were dispatched to (``avx512``, ``avx2``, ...)."""
    import torch
    try:
        return torch.backends.cpu.get_cpu_capability().lower()
    except AttributeError:
        return "unknown"


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX, and torch allowed to use them: without them CPU bf16 matmuls are emulated
    and far slower than fp32."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    return any(flag in cpu_flags() for flag in FAST_BF16_FLAGS)


def int8_head_pays_off() -> bool:
    """Whether the LM head's int8 multiply-sum (``models/layers/q8_weight.py``) beats its bf16 copy here: where
    torch's (and so inductor's) CPU kernels run AVX-512. With AVX2 code inductor loads the int8 values 8 at
    a time, and ``Vectorized<int8_t>``'s partial load goes through a scalar copy on the stack: 22.6 ms
    against 4.8 ms for the bf16 copy (49152 x 576, 2 threads, ``ATEN_CPU_CAPABILITY=avx2`` on the AVX-512
    Xeon), which made a whole batch-1 step 2.5x slower."""
    return torch_cpu_capability() == "avx512"


def physical_cores(cpus: Iterable[int] = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores among ``cpus`` (default: the CPUs this process may run on); SMT siblings count once."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    cores = set()
    for cpu in cpus:
        topology = f"{sysfs}/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as f:
                package = f.read().strip()
            with open(f"{topology}/core_id") as f:
                cores.add((package, f.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def describe_cpu() -> str:
    """One line naming the CPU, its speed-relevant flags, torch's kernel ISA and the threads in use."""
    import torch
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = " ".join(f for f in REPORTED_FLAGS if f in cpu_flags()) or "none of " + " ".join(REPORTED_FLAGS)
    return (f"{model}, {physical_cores()} physical cores; flags: {flags}; torch kernels: "
            f"{torch_cpu_capability()}; {torch.get_num_threads()} intra-op threads")
