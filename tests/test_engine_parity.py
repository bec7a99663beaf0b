"""Engine vs transformers on the same tiny random weights: logits, then greedy tokens through the full engine."""
import pytest
import torch

from tiny_models import ARCHS, load_reference, reference_greedy

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline
from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine.block_manager import BlockManager
from lmwrap_engine.engine.model_runner import ModelRunner
from lmwrap_engine.engine.scheduler import ScheduledBatch
from lmwrap_engine.engine.sequence import Sequence

PROMPTS = [
    "hello world",
    "The capital of France is Paris. The capital of Italy is",
    "def add(a, b):\n    return a + b\n# numbers 0 1 2 3",
    "Name three rivers: the Nile, the Amazon and the Yangtze. Unicode: café, naïve, 你好世界",
    "a",
    "tiny models for a tiny tokenizer, this is a test of a test of a test",
]
GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)


LLAMA3_ROPE = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   rope_theta=500000.0, tie_word_embeddings=True)
CASES = [(arch, {}) for arch in ARCHS] + [("llama", LLAMA3_ROPE)]
CASE_IDS = list(ARCHS) + ["llama3-rope-tied"]


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def arch_case(request, tiny_model_dir):
    arch, overrides = request.param
    path = tiny_model_dir(arch, **overrides)
    ref = load_reference(path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    prompts_ids = [tok.encode(p) for p in PROMPTS]
    expected = [reference_greedy(ref, ids, GREEDY.max_new_tokens)[len(ids):] for ids in prompts_ids]
    return arch, path, ref, prompts_ids, expected


def run_prefill_logits(runner: ModelRunner, ids, chunks):
    """All-position logits of one sequence, fed to the runner in the given chunk sizes."""
    bm = BlockManager(runner.num_blocks, runner.block_size)
    seq = Sequence(0, 0)
    seq.token_ids = list(ids)
    out = []
    for n in chunks:
        assert bm.allocate_slots(seq, n)
        input_ids, positions, ctx, _ = runner._prepare(ScheduledBatch([seq], [n], int(n == 1)))
        with torch.no_grad(), runner.step_context.use(ctx):
            hidden = runner.model(input_ids, positions)
        out.append(runner.model.compute_logits(hidden))
        seq.num_computed_tokens += n
    return torch.cat(out)


def test_logits_match_transformers(arch_case):
    arch, path, ref, prompts_ids, _ = arch_case
    runner = ModelRunner(path, EngineConfig(dtype="float32", num_gpu_blocks=32, block_size=16, device_type="cpu"))
    ids = prompts_ids[3]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    for chunks in ([len(ids)], [5, 1, len(ids) - 6], [1] * len(ids)):
        got = run_prefill_logits(runner, ids, chunks)
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4, msg=f"{arch} chunks={chunks}")


def _generate(path, prompts_ids, config, tok_prompts=None):
    with pipeline(path, config) as pipe:
        outs = [None] * len(prompts_ids)
        # token-id prompts through the engine, all in flight together
        gens = [pipe.stream_generate(input_ids=ids, gen_config=GREEDY) for ids in prompts_ids]
        # round-robin so every request is submitted before any finishes
        live = [iter(g) for g in gens]
        texts = [[] for _ in gens]
        for i, g in enumerate(live):
            texts[i].append(next(g))
        for i, g in enumerate(live):
            texts[i].extend(g)
        for i, deltas in enumerate(texts):
            outs[i] = [t for d in deltas for t in d.token_ids]
            assert deltas[-1].finish_reason == "length"
        stats = pipe.stats()
    return outs, stats


def test_greedy_alone(arch_case):
    arch, path, _, prompts_ids, expected = arch_case
    for ids, exp in zip(prompts_ids[:2], expected[:2]):
        got, _ = _generate(path, [ids], PytorchEngineConfig(dtype="float32", num_gpu_blocks=64, block_size=16))
        assert got[0] == exp, arch


def test_greedy_batched_mixed_lengths(arch_case):
    arch, path, _, prompts_ids, expected = arch_case
    got, stats = _generate(path, prompts_ids, PytorchEngineConfig(dtype="float32", num_gpu_blocks=128, block_size=16))
    assert got == expected, arch
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_greedy_chunked_prefill(arch_case):
    arch, path, _, prompts_ids, expected = arch_case
    cfg = PytorchEngineConfig(dtype="float32", num_gpu_blocks=128, block_size=16, max_prefill_token_num=7,
                              max_batch_size=4)
    got, stats = _generate(path, prompts_ids, cfg)
    assert got == expected, arch
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_greedy_prefix_caching(arch_case):
    arch, path, _, prompts_ids, expected = arch_case
    cfg = PytorchEngineConfig(dtype="float32", num_gpu_blocks=128, block_size=4, enable_prefix_caching=True)
    with pipeline(path, cfg) as pipe:
        for round_ in range(2):
            for ids, exp in zip(prompts_ids, expected):
                got = [t for d in pipe.stream_generate(input_ids=ids, gen_config=GREEDY) for t in d.token_ids]
                assert got == exp, (arch, round_)
        stats = pipe.stats()
    assert stats["num_prefix_hit_tokens"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_greedy_with_preemption(arch_case):
    arch, path, _, prompts_ids, expected = arch_case
    # 12 blocks of 4 tokens cannot hold six sequences of up to ~40 tokens at once.
    cfg = PytorchEngineConfig(dtype="float32", num_gpu_blocks=12, block_size=4)
    got, stats = _generate(path, prompts_ids, cfg)
    assert got == expected, arch
    assert stats["num_preemptions"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
