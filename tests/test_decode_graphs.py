"""Decode through the CUDA-graph input buffers (padding to a ladder of batch sizes), checked on CPU.

On CPU the buffers are run eagerly instead of replayed; everything else — padding rows, stale
block-table columns, falling back to the eager path for batches too large — is the code the GPU runs.
"""
import pytest

from tiny_models import ARCHS, assert_all_blocks_free, load_reference, reference_greedy, tiny_config

from lmwrap_engine import GenerationConfig, pipeline
from lmwrap_engine.engine.cuda_graph import DecodeGraphs, graph_batch_sizes

PROMPTS = ["hello world", "The capital of France is Paris. The capital of Italy is", "a",
           "def add(a, b):\n    return a + b\n# numbers 0 1 2 3 4 5 6 7 8 9", "Name three rivers:",
           "tiny models for a tiny tokenizer, this is a test of a test"]
OUTPUT_LENS = [9, 3, 14, 6, 11, 1]  # the batch shrinks step by step, so the padding changes



@pytest.mark.parametrize("max_batch, expected", [(1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]),
                                                 (40, [1, 2, 4, 8, 16, 32, 40]),
                                                 (128, [1, 2, 4, 8] + list(range(16, 129, 16)))])
def test_batch_size_ladder(max_batch, expected):
    assert graph_batch_sizes(max_batch) == expected


def attach_buffers(pipe, max_batch_size, max_blocks_per_seq=64):
    runner = pipe._loop.engine.runner
    runner.decode_graphs = DecodeGraphs(runner.model, runner.step_context, max_batch_size, max_blocks_per_seq,
                                        runner.args.hidden_size, runner.dtype, runner.device, capture=False)
    return runner.decode_graphs


def test_runner_sizes_graphs_from_its_config(tiny_model_dir):
    with pipeline(tiny_model_dir("llama"), tiny_config(max_batch_size=40, session_len=100, block_size=16)) as pipe:
        graphs = pipe._loop.engine.runner.make_decode_graphs(capture=False)
        assert graphs.batch_sizes == [1, 2, 4, 8, 16, 32, 40]
        assert graphs.max_blocks_per_seq == 7  # ceil(100 / 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_decode_is_token_identical_to_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    ref = load_reference(path)
    # max_batch_size 4 < 6 prompts: steps with 5-6 decode rows take the eager path, the rest the buffers.
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        graphs = attach_buffers(pipe, max_batch_size=4)
        configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]
        got = pipe(PROMPTS, gen_config=configs, do_preprocess=False)
        assert graphs.num_runs >= 10
        assert_all_blocks_free(pipe)
    for prompt, n, res in zip(PROMPTS, OUTPUT_LENS, got):
        ids = pipe.tokenizer.encode(prompt)
        assert res.token_ids == reference_greedy(ref, ids, n)[len(ids):], (arch, prompt)


def test_padding_rows_write_no_kv_and_sessions_continue(tiny_model_dir):
    """Turn 2 of a session decodes over KV written through the buffers; it equals a fresh eager run."""
    path = tiny_model_dir("llama")
    gen = GenerationConfig(max_new_tokens=7, ignore_eos=True)
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        sess = pipe.chat("hello world", gen_config=gen)
        sess = pipe.chat("The capital of France", session=sess, gen_config=gen)
        eager = sess.response.token_ids
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        graphs = attach_buffers(pipe, max_batch_size=8)
        other = pipe.chat("a different conversation runs beside it", gen_config=gen)
        sess = pipe.chat("hello world", gen_config=gen)
        sess = pipe.chat("The capital of France", session=sess, gen_config=gen)
        assert sess.response.token_ids == eager
        assert graphs.num_runs > 0
        other.close()
        sess.close()
        assert_all_blocks_free(pipe)


def test_int8_kv_cache_through_buffers_matches_eager(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]
    with pipeline(path, tiny_config(quant_policy=8)) as pipe:
        eager = [r.token_ids for r in pipe(PROMPTS, gen_config=configs)]
    with pipeline(path, tiny_config(quant_policy=8)) as pipe:
        graphs = attach_buffers(pipe, max_batch_size=8)
        assert [r.token_ids for r in pipe(PROMPTS, gen_config=configs)] == eager
        assert graphs.num_runs > 0


def test_sequences_longer_than_the_graphs_context_decode_eagerly(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = ["a", "hello world", "The capital of France is Paris. The capital of Italy is"]
    gen = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (14, 8, 3)]  # the long one ends first
    with pipeline(path, tiny_config(block_size=4)) as pipe:
        eager = [r.token_ids for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
        graphs = attach_buffers(pipe, max_batch_size=8, max_blocks_per_seq=3)  # 12 tokens
        assert [r.token_ids for r in pipe(prompts, gen_config=gen, do_preprocess=False)] == eager
        runs = graphs.num_runs
        assert 0 < runs < 13  # only while every sequence in the batch fits in 12 tokens
        assert [r.token_ids for r in pipe(prompts[2:], gen_config=gen[2:], do_preprocess=False)] == eager[2:]
        assert graphs.num_runs == runs  # never fits
        assert_all_blocks_free(pipe)
