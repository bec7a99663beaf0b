"""The AVX2 4-bit matrix-vector op (kernels/cpu_int4_gemv.py) against its torch reference."""
import os
import time

import pytest
import torch

from kernels import cpu_int4_gemv

pytestmark = pytest.mark.skipif(not cpu_int4_gemv.load(), reason="needs an x86 CPU with AVX2 and a C++ compiler")


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    step = (torch.rand(n, k // 32, generator=g) * 0.02 - 0.01).half().float()  # Q4_0 steps may be negative
    minimum = (-torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    return q, step, minimum


@pytest.mark.parametrize("n, k", [(32, 32), (128, 64), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_gemv_matches_the_fp32_reference(n, k, rows):
    q, step, minimum = _weights(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    got = cpu_int4_gemv.gemv(x, *cpu_int4_gemv.pack(q, step, minimum))
    want = cpu_int4_gemv.reference(x, q, step, minimum)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5 * k ** 0.5, rtol=1e-5)


def test_pack_puts_eight_features_of_one_input_in_a_word():
    q, step, minimum = _weights(64, 64)
    packed, scales, mins = cpu_int4_gemv.pack(q, step, minimum)
    assert packed.shape == (2, 64, 4) and packed.dtype == torch.int32
    word = packed[1, 5, 2].item() & 0xFFFFFFFF  # tile 1, input 5, features 32 + 16 .. 32 + 23
    assert [(word >> (4 * j)) & 15 for j in range(8)] == q[48:56, 5].tolist()
    assert torch.equal(scales.view(torch.float16)[1, 1].float(), step[32:64, 1])
    assert torch.equal(mins.view(torch.float32)[0, 0], minimum[:32, 0])


def test_gemv_inside_a_compiled_function_and_bad_input_is_refused():
    q, step, minimum = _weights(64, 64)
    packed = cpu_int4_gemv.pack(q, step, minimum)
    x = torch.randn(1, 64)
    compiled = torch.compile(lambda x: cpu_int4_gemv.gemv(torch.relu(x), *packed) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * cpu_int4_gemv.reference(torch.relu(x), q, step, minimum),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_int4_gemv.gemv(x.bfloat16(), *packed)
    with pytest.raises(RuntimeError, match="packed"):
        cpu_int4_gemv.gemv(torch.randn(1, 96), *packed)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.write_text(""); fresh.write_text("")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    cpu_int4_gemv._drop_stale_lock(str(stale))
    cpu_int4_gemv._drop_stale_lock(str(fresh))
    cpu_int4_gemv._drop_stale_lock(str(tmp_path / "missing"))
    assert not stale.exists() and fresh.exists()
