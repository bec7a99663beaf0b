"""``lmwrap bench latency|throughput --compare llama.cpp``: llama.cpp (through ``llama-cpp-python``) on
the same GGUF file, the same prompts, the same threads, greedy, EOS ignored.

``llama-cpp-python`` is an optional extra (``pip install llama-cpp-python``, it compiles llama.cpp);
without it, or when the model is not a GGUF file, the comparison says so and is skipped.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import List, Optional, Sequence, Tuple


def gguf_file(model: Optional[str]) -> Optional[str]:
    """The .gguf file behind the bench's model argument (the default model when omitted), else None."""
    from .bench_agents import _llama_cpp_gguf  # the same rule as bench agents' comparison
    return _llama_cpp_gguf(model)[0]


def open_llama(model: Optional[str], n_ctx: int, threads: int):
    """A ``llama_cpp.Llama`` on the model's GGUF, or ``(None, why)`` when it cannot run."""
    path = gguf_file(model)
    if path is None:
        return None, "the model is not a .gguf file (llama.cpp needs one)"
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install llama-cpp-python)"
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    return llm, f"llama.cpp {getattr(llama_cpp, '__version__', '?')} on {os.path.basename(path)}, {threads} threads"


def _greedy(llm) -> int:
    return int(llm.sample(top_k=1, top_p=1.0, min_p=0.0, temp=0.0))


def _generate(llm, ids: Sequence[int], n: int) -> Tuple[float, float]:
    """Greedy ``n`` tokens after ``ids``; returns (seconds to the first token, seconds for the rest)."""
    llm.reset()  # no reuse of an earlier prompt's KV
    start = time.perf_counter()
    llm.eval(list(ids))
    token = _greedy(llm)
    first = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([token])
        token = _greedy(llm)
    return first - start, time.perf_counter() - first


def latency(model: Optional[str], prompts: List[List[int]], output_len: int, threads: int) -> str:
    """The bench latency line for llama.cpp: median TTFT and median decode tok/s, one run per prompt."""
    llm, what = open_llama(model, max(len(ids) for ids in prompts) + output_len + 8, threads)
    if llm is None:
        return f"llama.cpp    : skipped, {what}"
    _generate(llm, prompts[0][:16], 4)  # warm-up
    ttfts, rates = [], []
    for ids in prompts:
        ttft, rest = _generate(llm, ids, output_len)
        ttfts.append(ttft)
        rates.append((output_len - 1) / max(rest, 1e-9))
    return (f"llama.cpp    : time to first token {statistics.median(ttfts) * 1e3:7.1f} ms   "
            f"decode {statistics.median(rates):7.1f} tok/s   ({what})")


def throughput(model: Optional[str], workload, threads: int) -> str:
    """The bench throughput line for llama.cpp: the workload's requests one after another
    (llama-cpp-python serves one sequence at a time)."""
    longest = max(len(ids) + n for ids, n in workload)
    llm, what = open_llama(model, longest + 8, threads)
    if llm is None:
        return f"llama.cpp    : skipped, {what}"
    _generate(llm, workload[0][0][:16], 2)  # warm-up
    start = time.perf_counter()
    for ids, n in workload:
        _generate(llm, ids, n)
    secs = time.perf_counter() - start
    toks = sum(n for _, n in workload)
    return f"llama.cpp    : {secs:8.2f} s  {toks / secs:9.1f} output tok/s  (sequential; {what})"
