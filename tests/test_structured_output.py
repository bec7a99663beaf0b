"""Structured output (response_format, xgrammar): every constrained output parses and validates,
batched with unconstrained requests that stay exactly as they are alone; regex, json_object,
sessions, stop ids, prefix-cache hits, preemption, overlapped outputs; bad schemas are ValueErrors."""
import json
import queue
import re

import jsonschema
import pytest

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline
from tiny_models import assert_all_blocks_free, tiny_config

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
        "ok": {"type": "boolean"}}, "required": ["user", "ok"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
              "minItems": 1, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"]},
    "ranges": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99},
                                                "x": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
               "required": ["n", "x"]},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"}},
                "required": ["zip", "code"]},
}
REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[a-z]{2,5}@[a-z]{3}\.(com|org)"]
PROMPTS = [[5 + i, 17, 33 + 2 * i, 9] * (1 + i % 3) for i in range(4)]
SAMPLES = 32


def json_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


def sampled(fmt, seed, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 96), do_sample=True, temperature=1.0, top_k=0,
                            random_seed=seed, response_format=fmt, **kw)


def greedy(fmt=None, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 24), response_format=fmt, **kw)


def run(pipe, prompts, configs, session_ids=None, **submit):
    """(text, finish_reason, token ids) per request, all submitted at once (one batch)."""
    outbox: "queue.SimpleQueue" = queue.SimpleQueue()
    session_ids = session_ids or [pipe.new_session_id() for _ in prompts]
    for i, (ids, cfg) in enumerate(zip(prompts, configs)):
        pipe.submit(session_ids[i], list(ids), pipe.sampling_params(cfg, len(ids)),
                    lambda out, i=i: outbox.put((i, out)), **submit)
    texts, reasons, tokens = [""] * len(prompts), [None] * len(prompts), [[] for _ in prompts]
    remaining = len(prompts)
    while remaining:
        i, out = outbox.get(timeout=300)
        texts[i] += out.text
        tokens[i] += out.token_ids
        if out.finish_reason is not None:
            reasons[i] = out.finish_reason
            remaining -= 1
    return list(zip(texts, reasons, tokens))


def assert_valid(result, schema):
    text, reason, _ = result
    assert reason == "stop", result
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def big(model_dir):
    with pipeline(model_dir, tiny_config(num_gpu_blocks=512)) as p:
        yield p


def test_sampled_outputs_validate_and_leave_unconstrained_neighbours_unchanged(big):
    alone = run(big, PROMPTS, [greedy()] * len(PROMPTS))
    prompts, configs, schemas = list(PROMPTS), [greedy()] * len(PROMPTS), []
    for name, schema in SCHEMAS.items():
        for k in range(SAMPLES):
            prompts.append(PROMPTS[k % len(PROMPTS)])
            configs.append(sampled(json_format(schema), seed=k))
            schemas.append(schema)
    results = run(big, prompts, configs)
    assert results[:len(PROMPTS)] == alone
    assert any(reason == "length" for _, reason, _ in alone)  # they really ran on: no grammar ended them
    for result, schema in zip(results[len(PROMPTS):], schemas):
        assert_valid(result, schema)
    per_schema = [results[len(PROMPTS) + i * SAMPLES:len(PROMPTS) + (i + 1) * SAMPLES] for i in range(len(SCHEMAS))]
    assert all(len({text for text, _, _ in group}) > 1 for group in per_schema)  # sampled, not one answer
    assert_all_blocks_free(big)


def test_greedy_constrained_output_is_the_same_alone_and_batched(big):
    fmt = json_format(SCHEMAS["nested"])
    alone = run(big, PROMPTS[:1], [greedy(fmt, max_new_tokens=96)])
    batched = run(big, PROMPTS, [greedy(fmt, max_new_tokens=96)] + [greedy()] * 3)
    assert batched[0] == alone[0]
    assert_valid(alone[0], SCHEMAS["nested"])


def test_regex_outputs_fullmatch(big):
    configs = [sampled({"type": "regex_schema", "regex_schema": rx}, seed=k) for rx in REGEXES for k in range(8)]
    results = run(big, [PROMPTS[k % 4] for k in range(len(configs))], configs)
    for k, (text, reason, _) in enumerate(results):
        assert reason == "stop" and re.fullmatch(REGEXES[k // 8], text), (REGEXES[k // 8], text, reason)


def test_json_object_parses_to_an_object(big):
    configs = [sampled({"type": "json_object"}, seed=k, max_new_tokens=256) for k in range(8)]
    results = run(big, [PROMPTS[k % 4] for k in range(8)], configs)
    finished = [text for text, reason, _ in results if reason == "stop"]
    assert finished
    for text in finished:
        assert isinstance(json.loads(text), dict)


def test_grammar_ends_without_stop_ids_and_with_explicit_ones(big):
    schema = SCHEMAS["enum"]
    no_eos = run(big, PROMPTS[:2], [greedy(json_format(schema), ignore_eos=True, max_new_tokens=64)] * 2)
    stop_id = run(big, PROMPTS[:2], [greedy(json_format(schema), stop_token_ids=[7], max_new_tokens=64)] * 2)
    stop_word = run(big, PROMPTS[:2], [greedy(json_format(schema), stop_words=["<|im_end|>"], max_new_tokens=64)] * 2)
    for result in no_eos + stop_id + stop_word:
        assert_valid(result, schema)
    # The grammar's own end token is not part of the output.
    assert [t for t, _, _ in no_eos] == [t for t, _, _ in stop_id] == [t for t, _, _ in stop_word]


def test_session_turns_each_follow_their_own_format(big):
    sid = big.new_session_id()
    first = run(big, [PROMPTS[0]], [greedy(json_format(SCHEMAS["array"]), max_new_tokens=64)], [sid],
                sequence_end=False)
    assert_valid(first[0], SCHEMAS["array"])
    second = run(big, [PROMPTS[1]], [greedy({"type": "regex_schema", "regex_schema": REGEXES[0]})], [sid],
                 sequence_start=False, sequence_end=True)
    assert second[0][1] == "stop" and re.fullmatch(REGEXES[0], second[0][0])
    assert_all_blocks_free(big)


def test_prefix_cache_hits_still_validate(big):
    prompt = [3 + (i * 7) % 300 for i in range(80)]  # several full blocks
    fmt = json_format(SCHEMAS["pattern"])
    first = run(big, [prompt], [greedy(fmt, max_new_tokens=64)])
    hits = big.stats()["num_prefix_hit_tokens"]
    again = run(big, [prompt], [greedy(fmt, max_new_tokens=64)])
    assert big.stats()["num_prefix_hit_tokens"] - hits >= 64
    assert again == first
    assert_valid(first[0], SCHEMAS["pattern"])


def test_preempted_and_recomputed_requests_resume_their_grammar(model_dir, big):
    schema = {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,8}$"}, "minItems": 6, "maxItems": 6}
    prompts = [[9 + i] * 20 for i in range(6)]
    configs = [greedy(json_format(schema), max_new_tokens=160)] * 6
    reference = run(big, prompts, configs)
    with pipeline(model_dir, tiny_config(num_gpu_blocks=12, block_size=16)) as small:
        results = run(small, prompts, configs)
        stats = small.stats()
        assert stats["num_preemptions"] > 0
        # Generated positions were computed again: requests were preempted after their grammar advanced.
        assert stats["num_generated_tokens_computed"] > sum(len(ids) for _, _, ids in results)
        assert_all_blocks_free(small)
    for result in results:
        assert_valid(result, schema)
    assert results == reference


def test_overlapped_outputs_give_the_same_constrained_results(model_dir, big):
    configs = [greedy(json_format(SCHEMAS["nested"]), max_new_tokens=96), greedy(),
               greedy({"type": "regex_schema", "regex_schema": REGEXES[2]}), greedy(stop_words=["e"])]
    reference = run(big, PROMPTS, configs)
    with pipeline(model_dir, tiny_config(num_gpu_blocks=128)) as overlapped:
        overlapped._loop.engine.overlap_outputs = True
        assert run(overlapped, PROMPTS, configs) == reference


@pytest.mark.parametrize("fmt, problem", [
    (json_format({"type": "foo"}), "Unsupported type"),
    (json_format({"type": "integer", "minimum": 5, "maximum": 1}), "minimum greater than maximum"),
    ({"type": "regex_schema", "regex_schema": "(ab"}, "parenthesis"),
])
def test_uncompilable_schema_is_a_value_error_naming_the_problem(big, fmt, problem):
    with pytest.raises(ValueError, match=f"response_format.*{problem}"):
        big.sampling_params(GenerationConfig(response_format=fmt), 4)
    with pytest.raises(ValueError, match=problem):
        big("hello", gen_config=GenerationConfig(response_format=fmt))
    assert big("hello", gen_config=greedy(max_new_tokens=4)).finish_reason == "length"  # still serving


def test_grammars_are_compiled_once_per_schema(big):
    from lmwrap_engine.guided.grammar import _compiler
    compiler = _compiler(big.tokenizer, big.vocab_size)
    fmt = json_format({"type": "object", "properties": {"only_here": {"type": "integer"}}})
    before = compiler.num_compiled
    a = big.sampling_params(GenerationConfig(response_format=fmt), 4).grammar
    b = big.sampling_params(GenerationConfig(response_format=json.loads(json.dumps(fmt))), 4).grammar
    assert a is b and compiler.num_compiled == before + 1


def test_lmdeploy_pipeline_adapter_takes_response_format(model_dir):
    from lmwrap import LMDeployPipeline
    from meta_templates import CHATML_META
    llm = LMDeployPipeline(model_dir, meta_template=CHATML_META, max_new_tokens=64, top_k=1, temperature=0,
                           pipeline_cfg=tiny_config())
    try:
        text = llm.generate("Name a colour.", response_format=json_format(SCHEMAS["enum"]))
        jsonschema.validate(json.loads(text), SCHEMAS["enum"])
    finally:
        llm.close()


@pytest.mark.slow
def test_default_model_answers_valid_json_for_every_schema():
    """On the default model (SmolLM2-135M): the issue's trip schema and every schema above, 32 sampled
    answers each, batched with unconstrained greedy prompts whose replies are what they are alone."""
    trip = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city", "days"]}
    schemas = {"trip": trip, **SCHEMAS}
    plain = ["Name three rivers.", "What is 2 + 2?"]
    plain_config = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    with pipeline(backend_config=PytorchEngineConfig(dtype="float32")) as pipe:  # batch-invariant greedy
        alone = [r.text for r in pipe(plain, gen_config=plain_config)]
        prompts, configs = list(plain), [plain_config] * len(plain)
        for schema in schemas.values():
            prompts += ["Plan a trip. Answer in JSON."] * SAMPLES
            configs += [GenerationConfig(max_new_tokens=96, do_sample=True, random_seed=k,
                                         response_format=json_format(schema)) for k in range(SAMPLES)]
        results = pipe(prompts, gen_config=configs)
    assert [r.text for r in results[:len(plain)]] == alone
    for i, schema in enumerate(schemas.values()):
        for r in results[len(plain) + i * SAMPLES:len(plain) + (i + 1) * SAMPLES]:
            assert r.finish_reason == "stop", r
            jsonschema.validate(json.loads(r.text), schema)


def test_the_grammar_wins_over_bans_and_min_new_tokens(big):
    fmt = {"type": "regex_schema", "regex_schema": "(ab|cd)"}
    plain = run(big, PROMPTS[:1], [greedy(fmt)])[0]
    assert plain[1] == "stop" and plain[0] in ("ab", "cd")
    banned = run(big, PROMPTS[:1], [greedy(fmt, bad_words=["a", "b", "c", "d", "ab", "cd"])])[0]
    early = run(big, PROMPTS[:1], [greedy(fmt, min_new_tokens=10)])[0]
    for text, reason, _ in (banned, early):
        assert reason == "stop" and text in ("ab", "cd")


def test_logprobs_come_with_constrained_tokens(big):
    fmt = json_format(SCHEMAS["enum"])
    base = run(big, PROMPTS[:2], [greedy(fmt, max_new_tokens=64)] * 2)
    outbox: "queue.SimpleQueue" = queue.SimpleQueue()
    big.submit(big.new_session_id(), PROMPTS[0], big.sampling_params(greedy(fmt, max_new_tokens=64, logprobs=2), 4),
               outbox.put)
    outs = []
    while not outs or outs[-1].finish_reason is None:
        outs.append(outbox.get(timeout=60))
    assert "".join(o.text for o in outs) == base[0][0]
    ids = [t for o in outs for t in o.token_ids]
    logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(logprobs) == len(ids) and all(t in lp for t, lp in zip(ids, logprobs))


def test_torch_mask_path_equals_xgrammar_kernel():
    """The torch path (every device but CPU) against xgrammar's CPU kernel, on random bitmasks."""
    import torch
    import xgrammar as xgr
    from lmwrap_engine.guided.grammar import _apply_torch
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    scores = torch.randn(6, vocab, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    idx = [0, 2, 3, 5]
    expected = scores.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=idx, backend="cpu")
    assert torch.equal(_apply_torch(scores, bitmask, idx), expected)
    assert torch.equal(expected[1], scores[1]) and expected[0].isneginf().sum() > 100


def test_stop_ids_past_the_vocab_are_ignored_by_the_grammar(big):
    fmt = json_format(SCHEMAS["enum"])
    result = run(big, PROMPTS[:1], [greedy(fmt, ignore_eos=True, stop_token_ids=[10**6], max_new_tokens=64)])
    assert_valid(result[0], SCHEMAS["enum"])
    assert_all_blocks_free(big)


def test_bench_json_format_keeps_the_workload_token_for_token(big):
    """`lmwrap bench throughput --response-format json`: every request still runs to its output length."""
    from lmwrap_engine.bench import RESPONSE_FORMATS, make_workload, run_engine
    workload = make_workload(list(range(3, 300)), 6, (8, 24), (16, 48), seed=0)
    reasons: dict = {}
    _, tokens = run_engine(big, workload, RESPONSE_FORMATS["json"], reasons)
    assert reasons == {"length": len(workload)} and tokens == sum(n for _, n in workload)
