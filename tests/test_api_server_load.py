"""Bounded load on a real api_server: many concurrent streams with the right texts, clients that
vanish mid-stream, SIGTERM while streaming, and command-line mistakes."""
import asyncio
import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import requests

from lmwrap_engine import GenerationConfig
from serving import finished_requests, running_server, server_command, wait_blocks_free

openai = pytest.importorskip("openai")

WORDS = ["The capital of France", "hello world", "Name three rivers", "def add(a, b):", "Unicode: café",
         "numbers 0 1 2 3", "this is a test", "Paris and Rome"]


def workload(count):
    """(messages, max_tokens) of mixed prompt and output lengths."""
    return [([{"role": "user", "content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4))}],
             4 + (i * 7) % 21) for i in range(count)]


@pytest.fixture(scope="module")
def url(model_dir):
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", "96",
                        "--cache-block-seq-len", "16", "--max-batch-size", "64") as (url, _):
        yield url


def test_64_concurrent_streams_get_their_greedy_texts(url, pipe, model_dir):
    jobs = workload(64)
    refs = pipe([m for m, _ in jobs], gen_config=[GenerationConfig(do_sample=False, max_new_tokens=n)
                                                  for _, n in jobs])

    async def one(client, messages, n):
        stream = await client.chat.completions.create(model=model_dir, messages=messages, max_tokens=n,
                                                      temperature=0, stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=300)) as client:
            return await asyncio.gather(*(one(client, m, n) for m, n in jobs))
    results = asyncio.run(run())
    assert [t for t, _ in results] == [r.text for r in refs]
    assert [f for _, f in results] == [r.finish_reason for r in refs]
    m = wait_blocks_free(url)
    assert m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_sessions"] == 0


def test_clients_that_disconnect_mid_stream_leak_nothing(url, pipe, model_dir):
    body = {"model": model_dir, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}

    async def vanish(client, i):
        async with client.stream("POST", url + "/v1/chat/completions", json={**body, "session_id": 500 + i}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: {")
                if seen >= 1 + i % 3:
                    return seen  # leaving the block closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=20)) as client:
            return await asyncio.gather(*(vanish(client, i) for i in range(20)))
    aborted = finished_requests(url, "abort")
    assert all(asyncio.run(run()))
    m = wait_blocks_free(url)
    assert finished_requests(url, "abort") == aborted + 20  # stopped, not run to their 400 tokens
    assert m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_requests_running"] == 0
    # The same session ids are free again and the server still answers correctly.
    ref = pipe([{"role": "user", "content": "hello"}], gen_config=GenerationConfig(do_sample=False, max_new_tokens=5))
    r = requests.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5,
                                                          "ignore_eos": False, "temperature": 0, "session_id": 500})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.text


def test_non_streaming_client_that_disconnects_frees_its_request(url, model_dir):
    body = {"model": model_dir, "prompt": "hello", "max_tokens": 900, "ignore_eos": True}
    aborted = finished_requests(url, "abort")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url + "/v1/completions", json=body, timeout=0.5)
    m = wait_blocks_free(url)
    assert finished_requests(url, "abort") == aborted + 1
    assert m["lmwrap_kv_cache_blocks_used"] == 0 and m["lmwrap_num_requests_running"] == 0


def test_sigterm_while_streaming_ends_the_stream_and_exits_0(model_dir):
    with running_server(model_dir, "--dtype", "float32", "--num-gpu-blocks", "64",
                        "--cache-block-seq-len", "16") as (url, proc):
        assert f"serving {model_dir} on {url}" in proc.log()
        r = requests.post(url + "/v1/completions", stream=True, timeout=60,
                          json={"model": model_dir, "prompt": "hello", "max_tokens": 900, "ignore_eos": True,
                                "stream": True})
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: {")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]  # ends: the server aborts the request
        assert rest[-1] == b"data: [DONE]"
        chunks = [json.loads(line[len(b"data: "):]) for line in rest[:-1]]
        assert "error" in chunks[-1] and chunks[-1]["error"]["code"] == 503
        assert proc.wait(60) == 0


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lmwrap_engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_missing_model_is_one_clear_line():
    for cmd in (["serve", "api_server", "/no/such/model"], ["chat", "/no/such/model"]):
        r = run_cli(*cmd)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("lmwrap ") and "/no/such/model" in lines[-1]
        assert "Traceback" not in r.stderr


def test_port_in_use_is_one_clear_line(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(server_command(model_dir, port), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--server-port", "70000"], ["--session-len", "0"], ["--cache-max-entry-count", "2"],
                                  ["--max-sessions", "0"]])
def test_bad_flag_values_are_one_clear_line(model_dir, args):
    r = run_cli("serve", "api_server", model_dir, "--server-port", "0", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lmwrap")
