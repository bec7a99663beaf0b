"""The CPU attention path against plain per-sequence attention on contiguous K/V, at batch sizes where it groups rows."""
import pytest
import torch
import torch.nn.functional as F

from kernels import reference


@pytest.mark.parametrize("batch", [1, 5, 48])
def test_decode_matches_dense_attention(batch):
    gen = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, block = 8, 2, 32, 16
    lens = torch.randint(1, 200, (batch,), generator=gen)
    max_blocks = (int(lens.max()) + block - 1) // block
    num_blocks = batch * max_blocks + 1
    k_cache = torch.full((num_blocks, block, kv_heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.randperm(num_blocks - 1, generator=gen)[: batch * max_blocks].view(batch, max_blocks) + 1
    q = torch.randn(batch, heads, dim, generator=gen)
    expected = torch.empty_like(q)
    for b in range(batch):
        n = int(lens[b])
        k = torch.randn(n, kv_heads, dim, generator=gen)
        v = torch.randn(n, kv_heads, dim, generator=gen)
        slots = tables[b].repeat_interleave(block) * block + torch.arange(block).repeat(max_blocks)
        reference.fill_kv_cache(k, v, k_cache, v_cache, slots[:n])
        expected[b] = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), k.transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
            v.transpose(0, 1).repeat_interleave(heads // kv_heads, 0), scale=0.2).squeeze(1)
    got = reference.paged_decode_attention(q, k_cache, v_cache, tables.int(), lens.int(), 0.2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
