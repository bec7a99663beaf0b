"""The api_server as a real process: OpenAI clients (sync and async), lmdeploy's extra routes,
interactive sessions whose KV stays in the engine, metrics and docs."""
import asyncio
import json

import pytest
import requests

from lmwrap_engine import GenerationConfig
from serving import running_server, scrape, wait_blocks_free

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "The capital of France is"}]
PROMPT = "hello world, this is"


@pytest.fixture(scope="module")
def server(model_dir):
    # --max-sessions 2: only the session-cap test keeps more than one session.
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", "64",
                        "--cache-block-seq-len", "16", "--max-sessions", "2") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def greedy(pipe, prompt, n, do_preprocess=True, **kw):
    return pipe(prompt, gen_config=GenerationConfig(do_sample=False, max_new_tokens=n, **kw),
                do_preprocess=do_preprocess)


def test_models_lists_the_served_name(url, model_dir):
    body = requests.get(url + "/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [model_dir]
    assert body["data"][0]["owned_by"] == "lmwrap" and body["data"][0]["object"] == "model"


def test_chat_greedy_matches_the_pipeline(client, pipe, model_dir):
    ref = greedy(pipe, MESSAGES, 12)
    r = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.input_token_len
    assert r.usage.completion_tokens == ref.generate_token_len
    assert r.usage.total_tokens == ref.input_token_len + ref.generate_token_len


def test_chat_stream_with_usage(client, pipe, model_dir):
    ref = greedy(pipe, MESSAGES, 12)
    chunks = list(client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.generate_token_len
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_none_and_ends_with_done(url, model_dir):
    r = requests.post(url + "/v1/chat/completions", stream=True,
                      json={"model": model_dir, "messages": MESSAGES, "max_tokens": 4, "stream": True})
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[len(b"data: "):]) for line in lines[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_async_completions_stream_and_not(url, pipe, model_dir):
    ref = greedy(pipe, PROMPT, 10, do_preprocess=False)

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
            whole = await c.completions.create(model=model_dir, prompt=PROMPT, max_tokens=10, temperature=0)
            stream = await c.completions.create(model=model_dir, prompt=PROMPT, max_tokens=10, temperature=0,
                                                stream=True)
            parts = [chunk.choices[0].text async for chunk in stream]
            chat = await c.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=6, temperature=0)
            return whole, "".join(parts), chat
    whole, streamed, chat = asyncio.run(run())
    assert whole.choices[0].text == ref.text == streamed
    assert whole.usage.completion_tokens == ref.generate_token_len
    assert chat.choices[0].message.content == greedy(pipe, MESSAGES, 6).text


def test_stop_string_cuts_the_text(client, pipe, model_dir):
    ref = greedy(pipe, PROMPT, 24, do_preprocess=False, ignore_eos=True).text
    assert len(ref) > 8, ref
    stop = ref[4:7]
    r = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref[:ref.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_completion_tokens_and_ignore_eos(client, model_dir):
    r = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_completion_tokens=5,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_chat_logprobs_shape(client, model_dir):
    r = client.chat.completions.create(model=model_dir, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 3
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob)
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())


def test_completion_logprobs_shape(client, model_dir):
    r = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(t) <= 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_n_choices_and_seed(client, model_dir):
    kw = dict(model=model_dir, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=123, n=3,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 3 * 8
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice samples on its own
    single = client.chat.completions.create(**{**kw, "n": 1})
    assert single.choices[0].message.content == a.choices[0].message.content

    stream = client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=4, n=2, stream=True,
                                       extra_body={"ignore_eos": True})
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1]


def test_lagent_body_gets_one_line_json(url, pipe, model_dir):
    # What lagent's LMDeployClient sends (lmdeploy's APIClient posts its locals()).
    body = {"model": model_dir, "prompt": [PROMPT], "suffix": None, "temperature": 0.8, "n": 1, "max_tokens": 7,
            "stream": False, "stop": None, "top_p": 0.8, "top_k": 1, "user": None, "repetition_penalty": 1.0,
            "session_id": 2967, "ignore_eos": False, "skip_special_tokens": False,
            "kwargs": {"sequence_start": True, "sequence_end": True, "stop_words": ["<eoa>"], "timeout": 30}}
    r = requests.post(url + "/v1/completions", json=body)
    assert r.status_code == 200
    lines = r.text.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["choices"][0]["text"] == greedy(pipe, PROMPT, 7, do_preprocess=False).text
    assert requests.post(url + "/v1/completions", json=body).status_code == 200  # session 2967 was released


def test_encode_and_generate(url, pipe, model_dir):
    ids = requests.post(url + "/v1/encode", json={"input": PROMPT}).json()
    assert ids["input_ids"] == pipe.tokenizer.encode(PROMPT) and ids["length"] == len(ids["input_ids"])
    many = requests.post(url + "/v1/encode", json={"input": [PROMPT, "hi"]}).json()
    assert many["length"] == [len(i) for i in many["input_ids"]] and len(many["input_ids"]) == 2

    ref = greedy(pipe, PROMPT, 6, do_preprocess=False, ignore_eos=True)
    by_ids = requests.post(url + "/generate", json={"input_ids": ids["input_ids"], "max_tokens": 6, "top_k": 1,
                                                    "ignore_eos": True}).json()
    by_text = requests.post(url + "/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                     "ignore_eos": True, "return_logprob": True}).json()
    for out in (by_ids, by_text):
        assert out["text"] == ref.text and out["output_ids"] == ref.token_ids
        assert out["meta_info"]["prompt_tokens"] == len(ids["input_ids"])
        assert out["meta_info"]["completion_tokens"] == 6
        assert out["meta_info"]["finish_reason"] == {"type": "length"}
    assert [t for _, t in by_text["meta_info"]["output_token_logprobs"]] == ref.token_ids

    r = requests.post(url + "/generate", stream=True, json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                            "ignore_eos": True, "stream": True})
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    items = [json.loads(line[len(b"data: "):]) for line in lines[:-1]]
    assert "".join(i["text"] for i in items) == ref.text
    assert sum((i["output_ids"] for i in items), []) == ref.token_ids


def interactive(url, **body):
    r = requests.post(url + "/v1/chat/interactive", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_interactive_session_keeps_its_kv(url):
    sid = 101
    first = interactive(url, prompt="Name three rivers", session_id=sid, interactive_mode=True,
                        request_output_len=8, top_k=1)
    assert first["history_tokens"] == 0 and first["input_tokens"] > 0
    before = scrape(url)
    second = interactive(url, prompt="and two more", session_id=sid, interactive_mode=True, request_output_len=8,
                         top_k=1)
    after = scrape(url)
    # The second turn continues after the first: only its own tokens are prefilled.
    assert second["history_tokens"] >= first["input_tokens"] + first["tokens"]
    computed = after["lmwrap_engine_prompt_tokens_computed_total"] - before["lmwrap_engine_prompt_tokens_computed_total"]
    assert second["input_tokens"] <= computed <= second["input_tokens"] + 1
    assert after["lmwrap_num_sessions"] == 1 and after["lmwrap_kv_cache_blocks_used"] > 0

    ended = interactive(url, prompt="", session_id=sid, request_output_len=0)
    assert ended["finish_reason"] == "stop"
    m = wait_blocks_free(url)
    assert m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_sessions"] == 0
    again = interactive(url, prompt="hello", session_id=sid, interactive_mode=False, request_output_len=2)
    assert again["history_tokens"] == 0  # a fresh session, ended after this turn
    assert wait_blocks_free(url)["lmwrap_num_sessions"] == 0


def test_interactive_stream_is_ndjson(url):
    r = requests.post(url + "/v1/chat/interactive", stream=True,
                      json={"prompt": "hi", "session_id": 102, "stream": True, "request_output_len": 5,
                            "ignore_eos": True})
    items = [json.loads(line) for line in r.iter_lines() if line]
    assert all(set(i) == {"text", "tokens", "input_tokens", "history_tokens", "finish_reason"} for i in items)
    assert items[-1]["finish_reason"] == "length" and items[-1]["tokens"] == 5
    assert [i["finish_reason"] for i in items[:-1]] == [None] * (len(items) - 1)


def test_interactive_cancel_stops_the_turn(url):
    sid = 103
    r = requests.post(url + "/v1/chat/interactive", stream=True,
                      json={"prompt": "hi", "session_id": sid, "stream": True, "interactive_mode": True,
                            "request_output_len": 900, "ignore_eos": True})
    lines = r.iter_lines()
    assert json.loads(next(line for line in lines if line))["finish_reason"] is None
    assert interactive(url, prompt="", session_id=sid, cancel=True)["finish_reason"] == "stop"
    items = [json.loads(line) for line in lines if line]
    assert items[-1]["finish_reason"] == "abort" and items[-1]["tokens"] < 900
    interactive(url, prompt="", session_id=sid, request_output_len=0)
    assert wait_blocks_free(url)["lmwrap_kv_cache_blocks_used"] == 0


def test_session_cap_ends_the_oldest(url):
    for sid in (201, 202, 203):  # the server keeps at most 2 sessions
        interactive(url, prompt=f"session {sid}", session_id=sid, interactive_mode=True, request_output_len=3)
    assert scrape(url)["lmwrap_num_sessions"] == 2
    assert interactive(url, prompt="again", session_id=203, interactive_mode=True,
                       request_output_len=2)["history_tokens"] > 0
    assert interactive(url, prompt="again", session_id=201, interactive_mode=True,
                       request_output_len=2)["history_tokens"] == 0  # it was ended: starts over
    for sid in (201, 202, 203):
        interactive(url, prompt="", session_id=sid, request_output_len=0)
    m = wait_blocks_free(url)
    assert m["lmwrap_num_sessions"] == 0 and m["lmwrap_kv_cache_blocks_used"] == 0


def test_metrics_count_requests_and_tokens(url, model_dir):
    before = scrape(url)
    requests.post(url + "/v1/completions", json={"model": model_dir, "prompt": PROMPT, "max_tokens": 3,
                                                 "ignore_eos": True})
    after = scrape(url)
    assert after["lmwrap_generation_tokens_total"] - before["lmwrap_generation_tokens_total"] == 3
    assert after["lmwrap_prompt_tokens_total"] > before["lmwrap_prompt_tokens_total"]
    assert after["lmwrap_e2e_request_latency_seconds_count"] == before["lmwrap_e2e_request_latency_seconds_count"] + 1
    assert after["lmwrap_time_to_first_token_seconds_count"] == before["lmwrap_time_to_first_token_seconds_count"] + 1
    assert after["lmwrap_kv_cache_blocks_total"] == 64 and after["lmwrap_kv_cache_blocks_used"] == 0
    assert 0 <= after["lmwrap_prefix_cache_hit_rate"] <= 1


def test_docs_cors_and_health(url):
    assert requests.get(url + "/health").status_code == 200
    assert requests.get(url + "/docs").status_code == 200
    paths = requests.get(url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive", "/generate"} <= set(paths)
    r = requests.options(url + "/v1/models", headers={"Origin": "http://example.com",
                                                      "Access-Control-Request-Method": "GET"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.com")
    assert wait_blocks_free(url)["lmwrap_kv_cache_blocks_used"] == 0
