"""The inductor-compiled CPU prefill and mixed steps (engine/cpu_steps.py, kernels/cpu_attention_step.py):
parity with the eager step and with transformers, which steps take it, and the eager fallback."""
import logging

import pytest
import torch

from tiny_models import assert_all_blocks_free, load_reference, reference_greedy, tiny_config

from kernels.cpu_attention_step import paged_attention_step
from lmwrap_engine import GenerationConfig, pipeline
from lmwrap_engine.engine import cpu_programs
from lmwrap_engine.engine.context import ForwardContext


@pytest.fixture(autouse=True)
def compile_on(monkeypatch):
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "1")


def _runner(pipe):
    return pipe._loop.engine.runner


def _mixed_step():
    """Two decode rows (contexts of 10 and 4), a 6-token chunk after 3 cached tokens, a fresh 5-token
    prompt: 13 tokens, block size 4."""
    int32 = dict(dtype=torch.int32)
    tables = [[0, 1, 2], [5], [7, 8, 9], [10, 11]]
    new = [(9, 1), (3, 1), (3, 6), (0, 5)]  # (first position, tokens) per sequence
    positions = [p for start, n in new for p in range(start, start + n)]
    slots = [tables[i][p // 4] * 4 + p % 4 for i, (start, n) in enumerate(new) for p in range(start, start + n)]
    width = 3
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], **int32)
    ctx = ForwardContext(slot_mapping=torch.tensor(slots), num_decode_tokens=2,
                         decode_block_tables=padded[:2], decode_kv_lens=torch.tensor([10, 4], **int32),
                         prefill_block_tables=padded[2:], prefill_cu_seqlens_q=torch.tensor([0, 6, 11], **int32),
                         prefill_kv_lens=torch.tensor([9, 5], **int32))
    ids = torch.tensor([5, 7, 11, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24])
    return ids, torch.tensor(positions), ctx


def test_attention_step_op_matches_the_eager_kernels():
    """The op gives what the eager layer computes, writing the same KV, for decode rows and prefill
    chunks together, prefill alone and decode alone; metadata rows past its counts are ignored."""
    import kernels
    torch.manual_seed(0)
    ids, _, ctx = _mixed_step()
    t = ids.shape[0]
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    caches = [torch.randn(16, 4, 2, 8) for _ in range(2)]
    tables = torch.zeros(6, 5, dtype=torch.int32)
    tables[:4, :3] = torch.cat([ctx.decode_block_tables, ctx.prefill_block_tables])
    kv_lens = torch.tensor([10, 4, 9, 5, 99, 99], dtype=torch.int32)
    cu = torch.tensor([0, 6, 11, 99, 99, 99, 99], dtype=torch.int32)

    def eager(q, k, v, caches):
        kernels.fill_kv_cache(k, v, *caches, ctx.slot_mapping)
        decode = kernels.paged_decode_attention(q[:2], *caches, ctx.decode_block_tables, ctx.decode_kv_lens, 0.3)
        return torch.cat([decode, kernels.paged_prefill_attention(q[2:], *caches, ctx.prefill_block_tables,
                                                                  ctx.prefill_cu_seqlens_q, ctx.prefill_kv_lens, 0.3)])

    want_caches = [c.clone() for c in caches]
    want = eager(q, k, v, want_caches)
    got = paged_attention_step(q, k, v, *caches, ctx.slot_mapping, tables, kv_lens, cu,
                               torch.tensor([4, 2, 3], dtype=torch.int32), 0.3)
    torch.testing.assert_close(got, want)
    for c, w in zip(caches, want_caches):
        assert torch.equal(c, w)
    # the caches now hold every sequence's KV: each part alone reads what it read above
    prefill_only = paged_attention_step(q[2:], k[2:], v[2:], *caches, ctx.slot_mapping[2:], tables[2:],
                                        kv_lens[2:], cu, torch.tensor([2, 0, 3], dtype=torch.int32), 0.3)
    torch.testing.assert_close(prefill_only, want[2:])
    decode_only = paged_attention_step(q[:2], k[:2], v[:2], *caches, ctx.slot_mapping[:2], tables, kv_lens, cu,
                                       torch.tensor([2, 2, 3], dtype=torch.int32), 0.3)
    torch.testing.assert_close(decode_only, want[:2])


def test_compiled_mixed_step_matches_the_eager_step(tiny_model_dir):
    with pipeline(tiny_model_dir("llama"), tiny_config(block_size=4)) as pipe:
        runner = _runner(pipe)
        steps = runner.compiled_steps
        assert steps is not None and steps.program is not None and not steps.failed  # compiled at start-up
        ids, positions, ctx = _mixed_step()
        assert steps.fits(ids.shape[0], 4, 3)
        torch.manual_seed(0)
        runner.k_cache.normal_()
        runner.v_cache.normal_()
        with torch.inference_mode():
            with runner.step_context.use(ctx):
                want = runner.model(ids, positions)
            runs = steps.num_runs
            got = steps.run(ids, positions, ctx)
            assert steps.num_runs == runs + 1
            # fewer sequences and a narrower table through the same buffers: the prefill chunks alone
            one = ForwardContext(slot_mapping=ctx.slot_mapping[2:], num_decode_tokens=0,
                                 decode_block_tables=ctx.decode_block_tables[:0], decode_kv_lens=ctx.decode_kv_lens[:0],
                                 prefill_block_tables=ctx.prefill_block_tables, prefill_cu_seqlens_q=ctx.prefill_cu_seqlens_q,
                                 prefill_kv_lens=ctx.prefill_kv_lens)
            with runner.step_context.use(one):
                want_prefill = runner.model(ids[2:], positions[2:])
            got_prefill = steps.run(ids[2:], positions[2:], one)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_prefill, want_prefill, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_prefill, want[2:], atol=1e-4, rtol=1e-4)


def test_prefills_and_mixed_steps_run_compiled_and_match_transformers(tiny_model_dir):
    """Three prompts (62, 2 and 35 tokens) in one step, then the fourth's remainder after a prefix-cache
    hit beside three decode rows (a mixed step): greedy tokens as transformers', every block returned."""
    path = tiny_model_dir("llama")
    ref = load_reference(path)
    prompts = ["the sea " * 12, "a b", "numbers 0 1 2 3 4 5 6 7 8 9 " * 3, "the sea " * 12 + "and the sky"]
    lens = [12, 9, 5, 7]
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in lens]
    with pipeline(path, tiny_config(block_size=4, enable_prefix_caching=True)) as pipe:
        steps = _runner(pipe).compiled_steps
        got = [r.token_ids for r in pipe(prompts, gen_config=configs, do_preprocess=False)]
        assert steps.num_runs >= 2 and not steps.failed
        stats = pipe.stats()
        assert stats["num_prefix_hit_tokens"] > 0 and stats["num_compiled_prefill_steps"] == steps.num_runs
        assert_all_blocks_free(pipe)
    for prompt, n, tokens in zip(prompts, lens, got):
        ids = pipe.tokenizer.encode(prompt)
        assert tokens == reference_greedy(ref, ids, n)[len(ids):]


def test_a_failed_compile_warns_once_and_runs_the_steps_eagerly(tiny_model_dir, monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler found")

    monkeypatch.setattr(cpu_programs, "load_or_compile", no_compiler)
    path = tiny_model_dir("llama")
    ref = load_reference(path)
    prompt = "numbers 0 1 2 3 4 5 6 7 8 9"
    with caplog.at_level(logging.WARNING, logger="lmwrap_engine"):
        with pipeline(path, tiny_config(block_size=4)) as pipe:
            steps = _runner(pipe).compiled_steps
            assert steps.failed and not steps.fits(100, 1, 1)
            got = pipe([prompt] * 2, gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True),
                       do_preprocess=False)
    assert len([r for r in caplog.records if "prefill step failed" in r.getMessage()]) == 1
    ids = pipe.tokenizer.encode(prompt)
    assert all(r.token_ids == reference_greedy(ref, ids, 4)[len(ids):] for r in got)


def test_switched_off_with_the_decode_programs(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LMWRAP_CPU_COMPILE", "0")
    with pipeline(tiny_model_dir("llama"), tiny_config()) as pipe:
        assert _runner(pipe).compiled_steps is None
