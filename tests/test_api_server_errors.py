"""Bad input against a real api_server: the right 4xx and an OpenAI-style body, never a 5xx, the server
stays healthy and every KV block goes back to the pool."""
import json

import pytest
import requests

from serving import running_server, wait_blocks_free

KEY = "k2"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 65536
SESSION_LEN = 1024
NUM_BLOCKS, BLOCK_SIZE = 32, 16  # 512 tokens: less than a session may hold


@pytest.fixture(scope="module")
def url(model_dir):
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", str(NUM_BLOCKS),
                        "--cache-block-seq-len", str(BLOCK_SIZE), "--api-keys", "k1,k2", "k3",
                        "--session-len", str(SESSION_LEN), "--max-request-bytes", str(MAX_BODY),
                        "--disable-fastapi-docs") as (url, _):
        yield url
        # whatever came before, the server is healthy and holds nothing
        assert requests.get(url + "/health").status_code == 200
        m = wait_blocks_free(url)
        assert m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_sessions"] == 0


@pytest.fixture(scope="module")
def model(model_dir):
    return model_dir


def post(url, path, body=None, headers=AUTH, **kw):
    return requests.post(url + path, json=body, headers=headers, **kw)


def assert_error(r, status, param=None, message=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["object"] == "error" and body["type"] == "invalid_request_error" and body["code"] == status
    assert body["param"] == param, body
    if message is not None:
        assert message in body["message"], body
    return body


UNAUTHORIZED = {"detail": {"error": {"message": "Please request with valid api key!", "type": "invalid_request_error",
                                     "param": None, "code": "invalid_api_key"}}}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "k2"},
                                     {"Authorization": "Basic k2"}])
def test_missing_or_wrong_key_is_401(url, model, headers):
    for method, path, body in [("get", "/v1/models", None), ("post", "/v1/completions",
                                                           {"model": model, "prompt": "hi"}),
                               ("post", "/v1/chat/interactive", {"prompt": "hi"}), ("post", "/generate",
                                                                                  {"prompt": "hi"})]:
        r = requests.request(method, url + path, json=body, headers=headers)
        assert r.status_code == 401 and r.json() == UNAUTHORIZED


def test_unknown_route_and_disabled_docs_are_404(url):
    for path in ("/docs", "/openapi.json", "/v1/nothing"):
        assert_error(requests.get(url + path, headers=AUTH), 404)
    assert_error(requests.get(url + "/v1/completions", headers=AUTH), 405)


def test_every_key_works_and_health_is_open(url):
    assert requests.get(url + "/health").status_code == 200
    for key in ("k1", "k2", "k3"):
        assert requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


CHAT_CASES = [
    # (overrides of a valid body, expected param)
    ({"messages": 5}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"max_tokens": "x"}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"n": "two"}, "n"),
    ({"n": 1000}, "n"),
    ({"stream": "maybe"}, "stream"),
    ({"seed": "x"}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"session_id": -7}, "session_id"),
    ({"session_id": "abc"}, "session_id"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "regex_schema", "regex_schema": "("}}, "response_format"),
    ({"min_p": 2}, "min_p"),
]


@pytest.mark.parametrize("override,param", CHAT_CASES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(CHAT_CASES)])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_parameters_are_400_naming_them(url, model, override, param, stream):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
    assert_error(post(url, "/v1/chat/completions", {**body, **override}), 400, param)


COMPLETION_CASES = [
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 10 ** 9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"logprobs": 99}, "logprobs"),
    ({"logprobs": "x"}, "logprobs"),
    ({"echo": "x"}, "echo"),
    ({"top_k": 1.5}, "top_k"),
    ({"ignore_eos": "perhaps"}, "ignore_eos"),
]


@pytest.mark.parametrize("override,param", COMPLETION_CASES,
                         ids=[f"{p}-{i}" for i, (_, p) in enumerate(COMPLETION_CASES)])
def test_bad_completion_parameters_are_400_naming_them(url, model, override, param):
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    assert_error(post(url, "/v1/completions", {**body, **override}), 400, param)


def test_missing_model_is_400_and_unknown_model_404(url, model):
    assert_error(post(url, "/v1/completions", {"prompt": "hi"}), 400, "model")
    for path, body in [("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
        assert_error(post(url, path, {**body, "model": "gpt-4"}), 404, "model", "The model `gpt-4` does not exist.")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate", "/v1/chat/interactive",
                                  "/v1/encode"])
def test_malformed_or_non_object_json_is_400(url, path):
    headers = {**AUTH, "Content-Type": "application/json"}
    for data in ['{"model": "x", "prompt": ', "[1, 2]", '"text"', "", "\xff\xfe"]:
        r = requests.post(url + path, data=data.encode("latin-1"), headers=headers)
        assert_error(r, 400)


def test_other_bad_bodies(url, model):
    assert_error(post(url, "/generate", {"prompt": "hi", "input_ids": [1]}), 400, "prompt")
    assert_error(post(url, "/generate", {}), 400, "prompt")
    assert_error(post(url, "/generate", {"input_ids": [10 ** 6]}), 400, "input_ids")
    assert_error(post(url, "/generate", {"input_ids": ["a"]}), 400, "input_ids")
    assert_error(post(url, "/generate", {"prompt": "hi", "max_tokens": -2}), 400, "max_tokens")
    assert_error(post(url, "/generate", {"prompt": "hi", "stop_token_ids": [-3]}), 400, "stop_token_ids")
    assert_error(post(url, "/v1/chat/interactive", {"prompt": "hi", "request_output_len": "many"}), 400,
                 "request_output_len")
    assert_error(post(url, "/v1/chat/interactive", {"prompt": "hi", "cancel": True}), 400, "session_id")
    assert_error(post(url, "/v1/chat/interactive", {"prompt": "hi", "image_url": "http://x/y.png"}), 400,
                 "image_url")
    assert_error(post(url, "/v1/encode", {"input": 5}), 400, "input")
    assert_error(post(url, "/v1/embeddings", {"input": "hi", "model": model}), 400)


def test_over_long_prompt_is_400(url, model):
    long_text = "hello world " * SESSION_LEN
    cases = [("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long_text}]},
              "messages"),
             ("/v1/chat/completions", {"model": model, "messages": long_text, "stream": True}, "messages"),
             ("/v1/completions", {"model": model, "prompt": long_text}, "prompt"),
             ("/v1/completions", {"model": model, "prompt": list(range(SESSION_LEN))}, "prompt"),
             ("/generate", {"prompt": long_text}, "prompt"),
             ("/v1/chat/interactive", {"prompt": long_text, "session_id": 5}, "prompt")]
    for path, body, param in cases:
        assert_error(post(url, path, body), 400, param, "session length")


def test_prompt_larger_than_the_cache_is_400(url, model):
    ids = [5] * (NUM_BLOCKS * BLOCK_SIZE + 10)
    assert len(ids) < SESSION_LEN
    r = post(url, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 2})
    assert_error(r, 400, None, "KV blocks")
    r = post(url, "/generate", {"input_ids": ids, "max_tokens": 2, "stream": True}, stream=True)
    lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]" and json.loads(lines[0][len(b"data: "):])["error"]["code"] == 400


def test_body_over_the_limit_is_413(url, model):
    big = {"model": model, "prompt": "x" * (MAX_BODY + 10)}
    assert_error(post(url, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: the limit still holds while the body arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]
    assert_error(requests.post(url + "/v1/completions", data=chunks(),
                               headers={**AUTH, "Content-Type": "application/json"}), 413)


def test_busy_session_is_400(url, model):
    sid = 77
    stream = post(url, "/v1/chat/interactive", {"prompt": "hi", "session_id": sid, "stream": True,
                                                 "request_output_len": 400, "ignore_eos": True}, stream=True)
    lines = stream.iter_lines()
    assert json.loads(next(line for line in lines if line))["finish_reason"] is None
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "session_id": sid, "max_tokens": 2}
    assert_error(post(url, "/v1/chat/completions", body), 400, "session_id", f"The session_id `{sid}` is occupied.")
    assert_error(post(url, "/v1/chat/interactive", {"prompt": "x", "session_id": sid}), 400, "session_id",
                 "is occupied")
    stream.close()
    m = wait_blocks_free(url)
    assert m["lmwrap_kv_cache_blocks_used"] == 0
    assert post(url, "/v1/chat/completions", body).status_code == 200  # free again once the stream is gone


def test_one_shot_request_does_not_wipe_a_kept_session(url, model):
    sid = 78
    r = post(url, "/v1/chat/interactive", {"prompt": "hi", "session_id": sid, "interactive_mode": True,
                                           "request_output_len": 2})
    assert r.status_code == 200
    assert_error(post(url, "/v1/completions", {"model": model, "prompt": "x", "session_id": sid}), 400,
                 "session_id", "occupied")
    assert post(url, "/v1/chat/interactive", {"prompt": "", "session_id": sid, "request_output_len": 0}).json() \
        == {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


def test_no_5xx_was_ever_sent(url):
    from prometheus_client.parser import text_string_to_metric_families
    text = requests.get(url + "/metrics").text
    codes = {s.labels["code"]: s.value for fam in text_string_to_metric_families(text)
             for s in fam.samples if s.name == "lmwrap_http_responses_total"}
    assert {"400", "401", "404", "413"} <= set(codes)
    assert not [c for c in codes if c.startswith("5")], codes
