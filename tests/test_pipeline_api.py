"""lmdeploy's pipeline API on tiny random models: prompt forms, Response fields, streaming, engine configs,
errors that leave nothing behind; and the default model answering one question."""
import time

import pytest

from lmwrap_engine import (GenerationConfig, Pipeline, Response, TurbomindEngineConfig,
                           pipeline)
from tiny_models import assert_all_blocks_free, tiny_config

GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)
PROMPTS = ["hello", "The capital of France is", "def add(a, b):", "Name three rivers"]


def assert_serves(pipe, expected: Response):
    """A normal request still works and gives the same greedy answer as before."""
    res = pipe(PROMPTS[0], gen_config=GREEDY)
    assert res.finish_reason == "length" and res.token_ids == expected.token_ids
    assert_all_blocks_free(pipe)


@pytest.fixture(scope="module")
def singles(pipe):
    """Each prompt run alone: the reference for batched and streamed runs."""
    return {p: pipe(p, gen_config=GREEDY) for p in PROMPTS}


# -- prompt forms -----------------------------------------------------------------------------

def test_str_prompt_is_one_user_message(pipe, singles):
    res = singles["hello"]
    assert isinstance(res, Response)
    ids = pipe.encode_prompt([{"role": "user", "content": "hello"}], True, True)
    assert ids == pipe.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    assert res.input_token_len == len(ids)
    as_messages = pipe([{"role": "user", "content": "hello"}], gen_config=GREEDY)
    assert isinstance(as_messages, Response)
    assert (as_messages.text, as_messages.token_ids) == (res.text, res.token_ids)


def test_do_preprocess_false_sends_the_raw_text(pipe):
    raw = pipe("hello", gen_config=GREEDY, do_preprocess=False)
    ids = pipe.tokenizer.encode("hello")
    assert raw.input_token_len == len(ids)
    by_ids = list(pipe.stream_generate(input_ids=ids, gen_config=GREEDY))
    assert raw.token_ids == [t for d in by_ids for t in d.token_ids]
    with pytest.raises(TypeError, match="do_preprocess=False"):
        pipe([{"role": "user", "content": "hello"}], gen_config=GREEDY, do_preprocess=False)


def test_batch_of_str_keeps_input_order(pipe, singles):
    results = pipe(PROMPTS, gen_config=GREEDY)
    assert isinstance(results, list) and len(results) == len(PROMPTS)
    assert [r.index for r in results] == list(range(len(PROMPTS)))
    for prompt, res in zip(PROMPTS, results):
        assert (res.text, res.token_ids, res.input_token_len) == (singles[prompt].text, singles[prompt].token_ids,
                                                                  singles[prompt].input_token_len)
    assert len({r.session_id for r in results}) == len(PROMPTS)


def test_batch_of_message_lists_and_mixed_forms(pipe, singles):
    conversations = [[{"role": "user", "content": p}] for p in reversed(PROMPTS)]
    results = pipe(conversations, gen_config=GREEDY)
    assert [r.token_ids for r in results] == [singles[p].token_ids for p in reversed(PROMPTS)]
    mixed = pipe(("hello", [{"role": "user", "content": "Name three rivers"}]), gen_config=GREEDY)
    assert [r.token_ids for r in mixed] == [singles["hello"].token_ids, singles["Name three rivers"].token_ids]
    assert pipe([], gen_config=GREEDY) == []


def test_call_infer_and_batch_infer_agree(pipe, singles):
    expected = singles["hello"].token_ids
    assert pipe.infer("hello", gen_config=GREEDY).token_ids == expected
    assert pipe.batch_infer("hello", gen_config=GREEDY).token_ids == expected
    assert [r.token_ids for r in pipe.infer(["hello"], gen_config=GREEDY)] == [expected]


@pytest.mark.parametrize("prompts", [123, None, 1.5, {"role": "user", "content": "hi"}, [1, 2], ["a", 3],
                                     [[]], [["a"]], ["a", [{"role": "user", "content": "x"}, "b"]]])
def test_wrong_prompt_types_are_type_errors(pipe, singles, prompts):
    with pytest.raises(TypeError):
        pipe(prompts, gen_config=GREEDY)
    with pytest.raises(TypeError):
        next(iter(pipe.stream_infer(prompts, gen_config=GREEDY)))
    assert_serves(pipe, singles["hello"])


def test_malformed_messages_are_value_errors(pipe, singles):
    with pytest.raises(ValueError):
        pipe([{"content": "no role"}], gen_config=GREEDY)
    with pytest.raises(ValueError):
        pipe([{"role": "user", "content": {"not": "text"}}], gen_config=GREEDY)
    assert_serves(pipe, singles["hello"])


def test_per_prompt_gen_configs(pipe, singles):
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (3, 1, 5, 2)]
    results = pipe(PROMPTS, gen_config=configs)
    assert [r.generate_token_len for r in results] == [3, 1, 5, 2]
    for prompt, res, n in zip(PROMPTS, results, (3, 1, 5, 2)):
        assert res.token_ids == singles[prompt].token_ids[:n]
    with pytest.raises(ValueError, match="3 entries for 4 prompts"):
        pipe(PROMPTS, gen_config=configs[:3])
    with pytest.raises(ValueError):
        pipe("hello", gen_config=configs)
    with pytest.raises(TypeError, match="unexpected"):
        pipe("hello", gen_config=GREEDY, top_k=3)
    with pytest.raises(NotImplementedError, match="LoRA"):
        pipe("hello", gen_config=GREEDY, adapter_name="lora")
    assert_serves(pipe, singles["hello"])


def test_use_tqdm_prints_a_progress_bar(pipe, capsys):
    pipe(PROMPTS[:3], gen_config=GenerationConfig(max_new_tokens=2), use_tqdm=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "100%" in err
    pipe(PROMPTS[:3], gen_config=GenerationConfig(max_new_tokens=2))
    assert "3/3" not in capsys.readouterr().err


# -- streaming and Response fields -----------------------------------------------------------

def test_stream_infer_deltas_add_up_to_the_batch_result(pipe):
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batch = pipe(PROMPTS, gen_config=gen)
    texts, ids, finishes, counts = [""] * 4, [[] for _ in PROMPTS], [[] for _ in PROMPTS], [[] for _ in PROMPTS]
    for delta in pipe.stream_infer(PROMPTS, gen_config=gen):
        assert isinstance(delta, Response)
        texts[delta.index] += delta.text
        ids[delta.index] += delta.token_ids
        finishes[delta.index].append(delta.finish_reason)
        counts[delta.index].append(delta.generate_token_len)
        assert delta.input_token_len == batch[delta.index].input_token_len
    for i, res in enumerate(batch):
        assert texts[i] == res.text and ids[i] == res.token_ids
        assert finishes[i][-1] == "length" and set(finishes[i][:-1]) == {None}
        assert counts[i] == list(range(1, 13))  # cumulative: one token per delta
    single = list(pipe.stream_infer("hello", gen_config=gen))
    assert {d.index for d in single} == {0} and single[-1].finish_reason == "length"


def test_response_fields(pipe, singles):
    res = singles["hello"]
    assert isinstance(res.text, str) and res.text == pipe.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    assert res.generate_token_len == len(res.token_ids) == 8
    assert res.input_token_len > 0 and res.finish_reason == "length" and res.logprobs is None and res.index == 0
    assert isinstance(res.session_id, int)
    # lmdeploy v0.6.2's positional order
    r = Response("t", 2, 3, 7, "stop", [1, 2], None, 4)
    assert (r.text, r.generate_token_len, r.input_token_len, r.session_id, r.finish_reason, r.token_ids,
            r.logprobs, r.index) == ("t", 2, 3, 7, "stop", [1, 2], None, 4)


def test_finish_reason_abort(pipe, singles):
    deltas = []
    session_id = 10**9  # far from the ids the pipeline numbers its own requests with
    for delta in pipe.stream_generate("hello", session_id=session_id,
                               gen_config=GenerationConfig(max_new_tokens=400, ignore_eos=True)):
        deltas.append(delta)
        if len(deltas) == 2:
            pipe.stop_session_nowait(session_id)
    assert deltas[-1].finish_reason == "abort"
    assert 2 <= deltas[-1].generate_token_len < 400
    assert_serves(pipe, singles["hello"])


def test_breaking_out_of_a_stream_cancels_the_rest(pipe, singles):
    gen = GenerationConfig(max_new_tokens=400, ignore_eos=True)
    before = pipe.stats()["num_generated_tokens_computed"]
    for delta in pipe.stream_infer(PROMPTS, gen_config=gen):
        break
    assert_all_blocks_free(pipe)  # every request is gone
    generated = pipe.stats()["num_generated_tokens_computed"]
    time.sleep(0.1)
    assert pipe.stats()["num_generated_tokens_computed"] == generated < before + 4 * 400
    assert_serves(pipe, singles["hello"])


def test_close_and_context_manager_stop_the_engine_thread(model_dir):
    pipe = pipeline(model_dir, tiny_config())
    thread = pipe._loop._thread
    assert thread.is_alive()
    pipe.close()
    assert not thread.is_alive()
    pipe.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):  # rather than waiting forever on a dead engine
        pipe("hello", gen_config=GREEDY)
    with pipeline(model_dir, tiny_config()) as pipe:
        assert isinstance(pipe, Pipeline)
        thread = pipe._loop._thread
        assert pipe("hello", gen_config=GREEDY).finish_reason == "length"
    assert not thread.is_alive()


# -- engine configs ---------------------------------------------------------------------------

def test_turbomind_config_selects_the_same_engine(model_dir, singles):
    config = TurbomindEngineConfig(dtype="float32", cache_block_seq_len=16, num_gpu_blocks=24)
    with pipeline(model_dir, config) as pipe:
        engine = pipe._loop.engine
        assert engine.config.block_size == 16 and engine.block_manager.block_size == 16
        assert pipe.stats()["num_blocks"] == 24
        assert pipe("hello", gen_config=GREEDY).token_ids == singles["hello"].token_ids
    with pipeline(model_dir, TurbomindEngineConfig(dtype="float32", cache_block_seq_len=32,
                                                   num_gpu_blocks=4)) as pipe:
        assert pipe._loop.engine.block_manager.block_size == 32
        assert pipe("hello", gen_config=GREEDY).token_ids == singles["hello"].token_ids


@pytest.mark.parametrize("backend", ["pytorch", "turbomind"])
def test_backend_names_are_accepted(model_dir, singles, backend):
    with pipeline(model_dir, tiny_config(), backend=backend) as pipe:
        assert pipe("hello", gen_config=GREEDY).token_ids == singles["hello"].token_ids


def test_bad_engine_configs_are_clear_errors(model_dir):
    with pytest.raises(ValueError, match="backend"):
        pipeline(model_dir, tiny_config(), backend="vllm")
    # the tiny model has 4 attention heads: tp=3 cannot split them (checked before any worker starts)
    with pytest.raises(ValueError, match="tp=3"):
        pipeline(model_dir, tiny_config(tp=3))
    with pytest.raises(ValueError, match="tp=3"):
        pipeline(model_dir, TurbomindEngineConfig(tp=3, num_gpu_blocks=4))
    with pytest.raises(ValueError, match="tp"):
        pipeline(model_dir, tiny_config(tp=0))
    with pytest.raises(NotImplementedError, match="adapters"):
        pipeline(model_dir, tiny_config(adapters={"a": "/x"}))
    with pytest.raises(ValueError, match="block_size"):
        pipeline(model_dir, tiny_config(block_size=24))
    with pytest.raises(ValueError, match="dtype"):
        pipeline(model_dir, tiny_config(dtype="int4"))
    with pytest.raises(TypeError, match="backend_config"):
        pipeline(model_dir, {"dtype": "float32"})
    with pytest.raises(TypeError, match="unexpected"):
        pipeline(model_dir, tiny_config(), tensor_parallel=2)


def test_session_len_limits_prompt_and_output(model_dir):
    with pipeline(model_dir, tiny_config(session_len=32)) as pipe:
        assert pipe.session_len == 32
        ids = pipe.tokenizer.encode("The capital of France is Paris. The capital of Italy is Rome. " * 3)
        assert len(ids) > 32
        at_limit = list(pipe.stream_generate(input_ids=ids[:32], gen_config=GREEDY))
        assert len(at_limit) == 1
        assert (at_limit[0].finish_reason, at_limit[0].text, at_limit[0].token_ids) == ("length", "", [])
        assert (at_limit[0].generate_token_len, at_limit[0].input_token_len) == (0, 32)
        fill = pipe("hello", gen_config=GenerationConfig(max_new_tokens=None, ignore_eos=True))
        assert fill.finish_reason == "length" and fill.input_token_len + fill.generate_token_len == 32
        clipped = pipe("hello", gen_config=GenerationConfig(max_new_tokens=500, ignore_eos=True))
        assert clipped.token_ids == fill.token_ids
        last_one = list(pipe.stream_generate(input_ids=ids[:31], gen_config=GenerationConfig(max_new_tokens=None,
                                                                                        ignore_eos=True)))
        assert last_one[-1].generate_token_len == 1 and last_one[-1].finish_reason == "length"
        assert_all_blocks_free(pipe)


def test_session_len_past_the_models_positions_is_capped_there(model_dir, caplog):
    """The rotary tables end at max_position_embeddings (1024 for the tiny model): a reply stops there with
    'length' instead of failing mid-reply at position 1024."""
    with caplog.at_level("WARNING", logger="lmwrap_engine"):
        pipe = pipeline(model_dir, tiny_config(session_len=100000, num_gpu_blocks=80))
    with pipe:
        assert pipe.session_len == 1024
        assert any("past the model's max_position_embeddings=1024" in r.getMessage() for r in caplog.records)
        out = pipe("hello", gen_config=GenerationConfig(max_new_tokens=5000, ignore_eos=True))
        assert out.finish_reason == "length" and out.input_token_len + out.generate_token_len == 1024
        assert_all_blocks_free(pipe)


def test_prompt_larger_than_the_cache_is_an_error_and_the_engine_keeps_serving(model_dir, singles):
    with pipeline(model_dir, tiny_config(num_gpu_blocks=4)) as pipe:  # 64 tokens of KV
        big = pipe.tokenizer.encode("hello world, this is a test of a tiny tokenizer for tiny models. " * 6)
        assert len(big) > 64
        res = list(pipe.stream_generate(input_ids=big, gen_config=GREEDY))
        assert len(res) == 1 and res[0].finish_reason == "error"
        assert "blocks" in res[0].text and res[0].generate_token_len == 0
        # together with a normal request, which is not disturbed
        results = pipe([pipe.tokenizer.decode(big), "hello"], gen_config=GREEDY, do_preprocess=False)
        assert results[0].finish_reason == "error"
        assert results[1].finish_reason == "length"
        assert_all_blocks_free(pipe)
        # a request that outgrows the cache while generating ends in 'error' too
        grows = pipe("hello", gen_config=GenerationConfig(max_new_tokens=200, ignore_eos=True))
        assert grows.finish_reason == "error" and 0 < grows.generate_token_len < 64
        assert_serves(pipe, singles["hello"])


def test_bad_input_ids_fail_alone(pipe, singles):
    vocab = pipe._loop.engine.runner.args.vocab_size
    for ids, error in (([1, vocab], ValueError), ([-1], ValueError), ([1, "2"], TypeError), ([1.5], TypeError)):
        with pytest.raises(error):
            list(pipe.stream_generate(input_ids=ids, gen_config=GREEDY))
        assert_serves(pipe, singles["hello"])
    empty = list(pipe.stream_generate(input_ids=[], gen_config=GREEDY))
    assert empty[-1].finish_reason == "error" and "empty" in empty[-1].text
    with pytest.raises(ValueError, match="prompt or input_ids"):
        list(pipe.stream_generate(gen_config=GREEDY))
    assert_serves(pipe, singles["hello"])
    assert pipe._loop.engine.sessions == {}  # rejected requests leave no session behind


# -- the default model ------------------------------------------------------------------------

def test_default_model_knows_the_capital_of_france():
    with pipeline() as pipe:
        res = pipe("What is the capital of France?", gen_config=GenerationConfig(max_new_tokens=24))
    assert "Paris" in res.text, res
    assert res.finish_reason in ("stop", "length")
