"""Transparent huge pages for the CPU KV cache and the model's weights.

The cache is allocated untouched (``torch.empty``) and its pages are faulted in as blocks are first
written. With 4 KiB pages one 64-token block of SmolLM2-135M (30 layers x K and V, 48 KiB each) takes
720 page faults; in a KVM guest each costs ~10 us more than a write to a page already mapped, and a
128-token prompt's first write to fresh blocks measured 15 ms slower (268 vs 253 ms to first token,
alternated in one process on a 2-core AVX-512 Xeon guest). Huge pages (2 MiB) take one fault per
2 MiB of a layer's cache, i.e. per ~40 blocks. ``madvise(MADV_HUGEPAGE)`` asks for them where the
kernel's THP setting is ``madvise`` (the common default) or ``always``; it changes nothing elsewhere.
Measured across processes on that machine: 17x fewer page faults per 128-token prompt (86 vs 1530),
first token ~20 ms sooner (236 vs 259 ms, two pairs). The price is resident memory in 2 MiB steps:
the cache's first write (the compiled CPU steps' start-up warm-up, else the first request) maps a huge
page per layer for K and V, 130 MiB of SmolLM2-135M's cache measured (``AnonHugePages``) instead of
~3 MiB; the cache's budget, and so the most it can hold, is unchanged.

The weights are already written when the model is loaded, so the copies that small-batch decode
reads (``model_runner.small_batch_weights``: 4-bit, 8-bit and bf16 copies) are collapsed into huge pages
in place (``MADV_COLLAPSE``, Linux 6.1+) rather than advised. A batch-1 step streams ~80 MB of them
for SmolLM2-135M (its 4-bit layers and 8-bit head), 20,000 4 KiB pages whose TLB misses each cost a
two-level page walk in a VM. On the 2-core Xeon guest above, with the weights in 2 MiB pages, 30
layers of torch's 4-bit kernel ran 1.05-1.10x faster, and a whole batch-1 decode 1.06x (median of 12
alternated pairs in one process). Collapsing SmolLM2-135M's 148 MiB of them took 0.46-0.50 s at load
there (158-160 MiB of pages: those they share with other allocations count too; a page the kernel
declines stays as it is).
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Iterable

import torch

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Asks Linux to back the whole huge pages inside ``t``'s storage with transparent huge pages;
    best effort (False where it cannot: not Linux, THP off or absent, a storage smaller than a page)."""
    size = huge_page_size() if sys.platform == "linux" and t.device.type == "cpu" else 0
    if size <= 0:
        return False
    start = t.untyped_storage().data_ptr()
    first = -(-start // size) * size
    end = (start + t.untyped_storage().nbytes()) // size * size
    if end <= first:
        return False
    return _madvise(first, end - first, MADV_HUGEPAGE)


@functools.lru_cache(maxsize=None)
def _libc_madvise():
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _madvise(start: int, length: int, advice: int) -> bool:
    return _libc_madvise()(start, length, advice) == 0


def collapse_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Backs every 2 MiB page that holds part of a CPU tensor in ``tensors`` with a transparent huge page
    now (the pages' contents are kept; so are other allocations sharing them). Best effort: returns
    how many bytes were collapsed (0 where Linux cannot: before 6.1, without THP, not Linux)."""
    size = huge_page_size() if sys.platform == "linux" else 0
    if size <= 0:
        return 0
    pages = set()
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided or t.untyped_storage().nbytes() == 0:
            continue
        start = t.untyped_storage().data_ptr()
        pages.update(range(start // size, (start + t.untyped_storage().nbytes() - 1) // size + 1))
    collapsed = 0
    for page in sorted(pages):  # one page per call: one that fails (no memory, say) spoils no other
        if _madvise(page * size, size, MADV_COLLAPSE):
            collapsed += size
    return collapsed
