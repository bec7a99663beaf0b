"""Transparent huge pages for the CPU KV cache and the small-batch weights (host_memory.py)."""
import mmap

import pytest
import torch

from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine.host_memory import advise_huge_pages, collapse_huge_pages, huge_page_size
from lmwrap_engine.engine import model_runner
from lmwrap_engine.engine.model_runner import ModelRunner, small_batch_weights

pytestmark = pytest.mark.skipif(huge_page_size() <= 0, reason="no transparent huge pages on this kernel")


def smaps_field_at(address: int, field: str) -> list:
    """A field of the mapping of this process that holds ``address`` (from /proc/self/smaps), split."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == field + ":":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def vm_flags_at(address: int) -> list:
    return smaps_field_at(address, "VmFlags")


def huge_kib_at(address: int) -> int:
    """How much of the mapping that holds ``address`` is backed by transparent huge pages (KiB)."""
    return int(smaps_field_at(address, "AnonHugePages")[0])


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


def test_collapse_backs_tensors_with_huge_pages_and_keeps_their_values():
    # A fresh anonymous mapping: memory this process used before may already sit in huge pages.
    buffer = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    collapsed = torch.frombuffer(buffer, dtype=torch.float32)
    collapsed.copy_(torch.randn(collapsed.numel()))
    expected = collapsed.clone()
    before = huge_kib_at(collapsed.data_ptr()) * 1024
    if before >= collapsed.nbytes - 2 * huge_page_size():
        pytest.skip("fresh memory already comes in huge pages here (THP 'always')")
    done = collapse_huge_pages([collapsed])
    if done == 0:
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux 6.1+)")
    assert done >= collapsed.nbytes - huge_page_size()
    assert huge_kib_at(collapsed.data_ptr()) * 1024 - before >= collapsed.nbytes - 2 * huge_page_size()
    assert torch.equal(collapsed, expected)
    assert collapse_huge_pages([torch.empty(64 * 2**20, device="meta")]) == 0


def test_runner_collapses_its_small_batch_weights(tiny_model_dir, monkeypatch):
    if collapse_huge_pages([torch.ones(2 * 2**20)]) == 0:
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux 6.1+)")
    calls = []

    def recording(tensors):
        tensors = list(tensors)
        calls.append(({t.data_ptr() for t in tensors}, collapse_huge_pages(tensors)))
        return calls[-1][1]
    monkeypatch.setattr(model_runner, "collapse_huge_pages", recording)
    runner = ModelRunner(tiny_model_dir(), EngineConfig(num_gpu_blocks=64, block_size=16, device_type="cpu",
                                                        weight_quant="int8", eager_mode=True))
    weights = small_batch_weights(runner.model)
    assert torch.int8 in {w.dtype for w in weights}  # the int8 linears' copies are among them
    (passed, done), = calls
    assert passed == {w.data_ptr() for w in weights} and done > 0
    for w in weights:
        assert huge_kib_at(w.data_ptr()) > 0
