"""LMDeployPipeline on lmwrap_engine with a tiny random model: generate, batch, stream_chat,
sessions, gen params, errors, the async variant and build_llm."""
import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest

from lmwrap import AsyncLMDeployPipeline, LLMError, LMDeployPipeline, ModelStatusCode, build_llm
from meta_templates import CHATML_META

GREEDY = dict(max_new_tokens=12, top_k=1, temperature=0)
PROMPTS = ['The capital of France is', 'hello world, this', 'Name three rivers:', 'def add(a, b):']
DIALOG = [dict(role='system', content='You are terse.'), dict(role='user', content='Name a river.')]


@pytest.fixture(scope='module')
def model_path(tiny_model_dir):
    return tiny_model_dir('llama')


@pytest.fixture(scope='module')
def llm(model_path):
    # float32: greedy output that must not depend on batching or prefix-cache hits (bf16 may flip near-ties)
    llm = LMDeployPipeline(model_path, meta_template=CHATML_META, pipeline_cfg=dict(dtype='float32'), **GREEDY)
    yield llm
    llm.close()


def test_generate_str_in_str_out_list_in_list_out(llm):
    text = llm.generate(PROMPTS[0])
    texts = llm.generate(PROMPTS)
    assert isinstance(text, str) and text
    assert isinstance(texts, list) and len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)


def test_batch_equals_one_by_one_when_greedy(llm):
    batched = llm.generate(PROMPTS)
    one_by_one = [llm.generate(p) for p in PROMPTS]
    assert batched == one_by_one
    assert len(set(batched)) > 1  # different prompts really gave different answers


def test_default_does_not_apply_the_engines_chat_template(llm):
    prompt = PROMPTS[1]
    plain = llm.generate(prompt)
    templated = llm.generate(prompt, do_preprocess=True)
    gen_config, _ = llm._request_config(llm._gen_params({}))
    assert plain == llm.model.batch_infer(prompt, gen_config, do_preprocess=False).text
    assert templated == llm.model.batch_infer(prompt, gen_config, do_preprocess=True).text
    assert plain != templated


def test_chat_builds_the_prompt_with_the_meta_template(llm):
    prompt = '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a river.<|im_end|>\n' \
             '<|im_start|>assistant\n'
    assert llm.template_parser(DIALOG) == prompt
    assert llm.chat(DIALOG) == llm.generate(prompt)
    assert llm.chat([DIALOG, DIALOG[1:]]) == llm.generate([prompt, llm.template_parser(DIALOG[1:])])


def test_stop_words_cut_at_the_first_occurrence(llm):
    full = llm.generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.index(stop)]
    assert llm.generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True, stop_words=[stop]) == expected
    assert llm.generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True, stop_words=stop) == expected
    *_, (status, streamed, _) = llm.stream_generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True,
                                                    stop_words=[stop])
    assert status == ModelStatusCode.END and streamed == expected
    kept = llm.generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True, stop_words=[stop],
                        include_stop_str_in_output=True)
    assert kept == expected + stop


def test_stream_chat_yields_cumulative_text_then_end(llm):
    items = list(llm.stream_chat(DIALOG, max_new_tokens=16, ignore_eos=True))
    statuses = [status for status, _, _ in items]
    texts = [text for _, text, _ in items]
    assert statuses[-1] is ModelStatusCode.END and set(statuses[:-1]) == {ModelStatusCode.STREAM_ING}
    assert len(items) > 2
    assert all(a and b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, never empty
    assert all(extra is None for _, _, extra in items)  # as lagent's LMDeploy wrappers
    assert texts[-1] == llm.chat(DIALOG, max_new_tokens=16, ignore_eos=True)


def test_stream_never_shows_half_a_stop_word(llm):
    full = llm.generate(PROMPTS[3], max_new_tokens=32, ignore_eos=True)
    # A stop word that starts like the answer's middle but never completes: its start is held back
    # while streaming, then shown at the end.
    stop = full[10:14] + '\x00never'
    items = list(llm.stream_generate(PROMPTS[3], max_new_tokens=32, ignore_eos=True, stop_words=[stop]))
    assert items[-1] == (ModelStatusCode.END, full, None)
    for _, text, _ in items[:-1]:
        assert not text.endswith(full[10:14]) or len(text) < 14


def settled_count(llm, name='num_generated_tokens_computed'):
    """An engine counter once it stops moving (nothing runs any more)."""
    count = llm.model.stats()[name]
    while True:
        time.sleep(0.3)
        latest = llm.model.stats()[name]
        if latest == count:
            return count
        count = latest


def test_closing_a_stream_early_stops_the_request(llm):
    before = settled_count(llm)
    stream = llm.stream_generate(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
    assert next(stream)[0] == ModelStatusCode.STREAM_ING
    stream.close()
    assert settled_count(llm) - before < 100
    assert llm.generate(PROMPTS[0]) == llm.generate([PROMPTS[0]])[0]  # the engine is fine afterwards


def test_per_call_overrides_leave_the_defaults_alone(llm):
    short = llm.generate(PROMPTS[0], max_new_tokens=3, ignore_eos=True)
    longer = llm.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    assert longer.startswith(short) and len(longer) > len(short)
    assert llm.gen_params['max_new_tokens'] == GREEDY['max_new_tokens']
    assert llm.update_gen_params(top_p=0.5)['top_p'] == 0.5 and llm.gen_params['top_p'] == 0.8


def test_do_sample_follows_lagent(llm, model_path):
    # lmdeploy >= 0.6 branch of lagent: without do_sample, sample when top_k > 1 or temperature > 0.
    def do_sample(**overrides):
        return llm._request_config(llm._gen_params(overrides))[0].do_sample
    assert do_sample() is False  # top_k=1, temperature=0
    assert do_sample(top_k=40) is True and do_sample(temperature=0.7) is True
    assert do_sample(top_k=40, do_sample=False) is False
    greedy = llm.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    sampled = llm.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, top_k=40, temperature=1.0,
                           random_seed=7)
    assert sampled == llm.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, top_k=40, temperature=1.0,
                                   random_seed=7)
    assert sampled != greedy


def test_a_session_keeps_its_kv_cache_across_calls(llm):
    session_id = 4242
    first = llm.generate('<|im_start|>user\nName three rivers:<|im_end|>\n<|im_start|>assistant\n',
                         session_id=session_id, sequence_end=False, max_new_tokens=8, ignore_eos=True)
    assert first
    turn = '<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n'
    num_turn_tokens = len(llm.model.tokenizer.encode(turn, add_special_tokens=False))
    before = llm.model.stats()
    second = llm.generate(turn, session_id=session_id, sequence_start=False, sequence_end=False,
                          max_new_tokens=8, ignore_eos=True)
    after = llm.model.stats()
    assert second
    computed = after['num_prompt_tokens_computed'] - before['num_prompt_tokens_computed']
    # Only the new turn (plus the last answer token, which was sampled but never fed) is prefilled.
    assert num_turn_tokens <= computed <= num_turn_tokens + 1
    items = list(llm.stream_generate('<|im_end|>\n<|im_start|>user\nOne more.<|im_end|>\n<|im_start|>assistant\n',
                                     session_id=session_id, sequence_start=False, sequence_end=True,
                                     max_new_tokens=4, ignore_eos=True))
    assert items[-1][0] == ModelStatusCode.END and items[-1][1]
    # The session ended with that call: continuing it is an error, not an empty answer.
    with pytest.raises(LLMError, match='has no history'):
        llm.generate('more', session_id=session_id, sequence_start=False)
    status, text, _ = list(llm.stream_generate('more', session_id=session_id, sequence_start=False))[-1]
    assert status < 0 and status == ModelStatusCode.SERVER_ERR and text == ''


def test_end_session_frees_a_kept_session(llm):
    llm.generate('hello world', session_id=77, sequence_end=False, max_new_tokens=2)
    free_before = llm.model.stats()['num_free_blocks']
    llm.end_session(77)
    assert llm.model.stats()['num_free_blocks'] > free_before
    with pytest.raises(LLMError):
        llm.generate('again', session_id=77, sequence_start=False)


def test_bad_values_raise_in_generate_and_are_negative_statuses_in_stream_chat(llm, caplog):
    with pytest.raises(ValueError, match='top_p'):
        llm.generate(PROMPTS[0], top_p=5.0)
    items = list(llm.stream_chat(DIALOG, top_p=5.0))
    assert items == [(ModelStatusCode.SESSION_INVALID_ARG, '', None)]
    assert items[0][0].value < 0
    assert 'top_p' in caplog.text


def test_malformed_calls_raise_clear_errors(llm):
    with pytest.raises(TypeError, match=r"unknown generation parameter\(s\) \['max_tokens'\]"):
        llm.generate(PROMPTS[0], max_tokens=3)
    with pytest.raises(ValueError, match='empty prompt'):
        llm.generate('')
    with pytest.raises(ValueError, match='empty prompt'):
        llm.generate(['ok', ''])
    with pytest.raises(TypeError, match='a prompt must be a str or a list of str'):
        llm.generate(42)
    with pytest.raises(TypeError, match='a prompt must be a str or a list of str'):
        llm.generate([DIALOG])
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        llm.chat([dict(role='robot', content='beep')])
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        llm.stream_chat([dict(role='robot', content='beep')])
    with pytest.raises(TypeError, match='a message must be a dict'):
        llm.chat([dict(role='user', content='hi'), ('assistant', 'x')])
    with pytest.raises(TypeError, match='chat takes a list of messages'):
        llm.chat(dict(role='user', content='hi'))
    with pytest.raises(ValueError, match='empty dialog'):
        llm.chat([])
    with pytest.raises(TypeError, match='not a list of dialogs'):
        llm.stream_chat([DIALOG, DIALOG])
    with pytest.raises(ValueError, match='pass one prompt'):
        llm.generate(PROMPTS, session_id=3)
    with pytest.raises(TypeError, match='stop_words'):
        llm.generate(PROMPTS[0], stop_words=[''])


def test_constructor_errors_come_before_the_model_loads(model_path):
    with pytest.raises(ValueError, match="unknown meta template 'vicuna'"):
        LMDeployPipeline(model_path, meta_template='vicuna')
    with pytest.raises(ValueError, match=r"unknown pipeline_cfg option\(s\) \['cache_size'\]"):
        LMDeployPipeline(model_path, pipeline_cfg=dict(cache_size=3))
    with pytest.raises(TypeError, match='unexpected keyword'):
        LMDeployPipeline(model_path, temprature=0)


def test_build_llm_with_auto_template_and_a_prompt_that_fills_the_session(model_path, llm):
    built = build_llm(dict(type='LMDeployPipeline', path=model_path, meta_template='auto',
                           pipeline_cfg=dict(session_len=32, dtype='float32'), **GREEDY))
    try:
        assert type(built) is LMDeployPipeline
        assert built.template_parser.meta_template is CHATML_META  # picked from the folder's chat template
        short = [dict(role='user', content='hi')]
        assert built.chat(short, max_new_tokens=4) == llm.chat(short, max_new_tokens=4)
        long_prompt = 'The capital of France is Paris. ' * 8
        with pytest.raises(LLMError, match='leaves no room') as info:
            built.generate(long_prompt)
        assert info.value.status == ModelStatusCode.SESSION_OUT_OF_LIMIT
        assert list(built.stream_generate(long_prompt)) == [(ModelStatusCode.SESSION_OUT_OF_LIMIT, '', None)]
        assert built.generate('hello', max_new_tokens=4)  # short prompts still work
    finally:
        built.close()
    assert build_llm(llm) is llm


def test_build_llm_resolves_names_paths_and_classes():
    from lmwrap import _resolve_type
    assert _resolve_type('LMDeployPipeline') is LMDeployPipeline
    assert _resolve_type('lmwrap.LMDeployPipeline') is LMDeployPipeline  # lagent 0.5's create_object form
    assert _resolve_type('lmwrap.pipeline.AsyncLMDeployPipeline') is AsyncLMDeployPipeline
    assert _resolve_type(LMDeployPipeline) is LMDeployPipeline
    with pytest.raises(ValueError, match="unknown llm type 'GPT5'"):
        build_llm(dict(type='GPT5'))
    with pytest.raises(ValueError, match='needs a "type"'):
        build_llm(dict(path='x'))
    with pytest.raises(ValueError, match="cannot import llm type 'lmwrap.Nope'"):
        build_llm(dict(type='lmwrap.Nope'))
    with pytest.raises(TypeError, match='config dict'):
        build_llm('LMDeployPipeline')


def test_async_pipeline_matches_the_sync_one(model_path, llm):
    async_llm = AsyncLMDeployPipeline(model_path, meta_template=CHATML_META, pipeline_cfg=dict(dtype='float32'),
                                      **GREEDY)

    async def first_item_then_stop():
        before = settled_count(async_llm)
        stream = async_llm.stream_generate(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
        item = await stream.__anext__()
        await stream.aclose()
        return item, settled_count(async_llm) - before

    async def run():
        one = await async_llm.generate(PROMPTS[0])
        many = await async_llm.generate(PROMPTS)
        concurrent = await asyncio.gather(*(async_llm.chat([dict(role='user', content=p)]) for p in PROMPTS[:2]))
        streamed = [item async for item in async_llm.stream_chat(DIALOG, max_new_tokens=12, ignore_eos=True)]
        raw = [item async for item in async_llm.stream_generate(PROMPTS[1], max_new_tokens=6, ignore_eos=True)]
        stopped_early = await first_item_then_stop()
        return one, many, concurrent, streamed, raw, stopped_early

    try:
        one, many, concurrent, streamed, raw, (first, num_generated) = asyncio.run(run())
        assert first[0] == ModelStatusCode.STREAM_ING
        assert num_generated < 100  # closing the stream stopped the 200-token request
    finally:
        async_llm.close()
    assert one == llm.generate(PROMPTS[0])
    assert many == llm.generate(PROMPTS)
    assert concurrent == [llm.chat([dict(role='user', content=p)]) for p in PROMPTS[:2]]
    assert streamed == list(llm.stream_chat(DIALOG, max_new_tokens=12, ignore_eos=True))
    assert raw == list(llm.stream_generate(PROMPTS[1], max_new_tokens=6, ignore_eos=True))


def test_async_sessions_errors_and_a_lagent_style_model_name(model_path):
    # lagent's configs name models ('internlm2-chat-7b'); the engine's template is matched from it.
    async_llm = AsyncLMDeployPipeline(model_path, model_name='internlm2-chat-7b', meta_template=CHATML_META,
                                      **GREEDY)
    assert type(async_llm.model.chat_template).__name__ == 'InternLM2ChatTemplate'

    async def run():
        await async_llm.generate('hello world', session_id=9, sequence_end=False, max_new_tokens=2)
        before = async_llm.model.stats()['num_prompt_tokens_computed']
        continued = await async_llm.generate(' more', session_id=9, sequence_start=False, max_new_tokens=2)
        computed = async_llm.model.stats()['num_prompt_tokens_computed'] - before
        bad = [item async for item in async_llm.stream_chat(DIALOG, top_p=5.0)]
        with pytest.raises(ValueError, match='top_p'):
            await async_llm.generate(PROMPTS[0], top_p=5.0)
        with pytest.raises(LLMError, match='has no history'):
            await async_llm.generate('x', session_id=9, sequence_start=False)  # ended by the last call
        with pytest.raises(TypeError, match='unknown generation parameter'):
            await async_llm.chat(DIALOG, temprature=0)
        return continued, computed, bad

    try:
        continued, computed, bad = asyncio.run(run())
    finally:
        async_llm.close()
    assert continued and computed <= 3  # ' more' (+ the last answer token), not the whole history
    assert bad == [(ModelStatusCode.SESSION_INVALID_ARG, '', None)]


def test_the_thread_bridge_streams_fails_and_stops_like_the_iterator():
    from lmwrap.base import _iterate_in_thread

    closed = []

    def numbers(fail_at=None):
        try:
            for i in range(100):
                if i == fail_at:
                    raise ValueError(f'failed at {i}')
                yield i
        finally:
            closed.append(threading.get_ident())

    async def run():
        everything = [i async for i in _iterate_in_thread(lambda: numbers())]
        with pytest.raises(ValueError, match='failed at 3'):
            [i async for i in _iterate_in_thread(lambda: numbers(fail_at=3))]
        first = None
        bridge = _iterate_in_thread(lambda: numbers())
        async for first in bridge:
            break
        await bridge.aclose()
        for _ in range(200):  # the worker notices the stop at its next item and closes the iterator there
            if len(closed) == 3:
                break
            await asyncio.sleep(0.01)
        return everything, first

    everything, first = asyncio.run(run())
    assert everything == list(range(100)) and first == 0
    assert len(closed) == 3 and threading.get_ident() not in closed


def test_lmwrap_imports_without_torch():
    code = (
        'import sys\n'
        'class Block:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        '        if name.split(".")[0] in ("torch", "lmwrap_engine", "transformers", "lagent"):\n'
        '            raise ImportError("blocked " + name)\n'
        'sys.meta_path.insert(0, Block())\n'
        'import lmwrap, meta_templates\n'
        'from lmwrap import build_llm, BaseLLM, ModelStatusCode, LMTemplateParser\n'
        'try:\n'
        '    build_llm(dict(type="LMDeployPipeline", path="x"))\n'
        'except ImportError as e:\n'
        '    print("lazy", e)\n'
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'lazy blocked lmwrap_engine'
