"""Transparent huge pages for the CPU KV cache (host_memory.py)."""
import pytest
import torch

from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine.host_memory import advise_huge_pages, huge_page_size
from lmwrap_engine.engine.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(huge_page_size() <= 0, reason="no transparent huge pages on this kernel")


def vm_flags_at(address: int) -> list:
    """The VmFlags of the mapping of this process that holds ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def first_huge_page(t: torch.Tensor) -> int:
    size = huge_page_size()
    return -(-t.untyped_storage().data_ptr() // size) * size


def test_advised_tensor_is_marked_for_huge_pages_and_a_plain_one_is_not():
    advised = torch.empty(64 * 2**20, dtype=torch.uint8)  # above glibc's largest mmap threshold: its own mapping
    plain = torch.empty(64 * 2**20, dtype=torch.uint8)
    assert advise_huge_pages(advised)
    assert "hg" in vm_flags_at(first_huge_page(advised))
    assert "hg" not in vm_flags_at(first_huge_page(plain))


def test_too_small_or_gpu_tensors_are_left_alone():
    assert not advise_huge_pages(torch.empty(1024))
    assert not advise_huge_pages(torch.empty(8 * 2**20, device="meta"))


@pytest.mark.parametrize("quant_policy", [0, 8])
def test_kv_cache_is_marked_for_huge_pages(tiny_model_dir, quant_policy):
    runner = ModelRunner(tiny_model_dir(), EngineConfig(num_gpu_blocks=65536, block_size=16, device_type="cpu",
                                                        quant_policy=quant_policy))
    caches = [runner.k_cache, runner.v_cache]
    if quant_policy:
        caches += [runner.k_scales_zeros, runner.v_scales_zeros]
    for cache in caches:
        assert cache.untyped_storage().nbytes() >= 2 * huge_page_size()  # holds a whole aligned huge page
        assert "hg" in vm_flags_at(first_huge_page(cache))
