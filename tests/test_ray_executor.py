"""The Ray executor on a local Ray cluster on 127.0.0.1 (started here, stopped at the end): tp=2 on Ray
actors gives transformers' greedy tokens and tp=1's logits."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from serving import free_port
from test_engine_parity import PROMPTS
from test_tensor_parallel import GREEDY, _alive, _generate_all, chunked_logits
from tiny_models import load_reference, reference_greedy

ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install 'lmwrap[ray]')")

from lmwrap_engine import PytorchEngineConfig, pipeline  # noqa: E402
from lmwrap_engine.config import EngineConfig  # noqa: E402
from lmwrap_engine.engine.model_runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head --block`` on 127.0.0.1 in its own temp dir; SIGTERM to it stops what it started."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="lmw_ray_", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "4", "--num-gpus", "0",
                             "--object-store-memory", str(100 << 20), "--include-dashboard", "false",
                             "--disable-usage-stats", "--temp-dir", temp_dir],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "ray start exited"
            status = subprocess.run([ray_bin, "status", "--address", address], env=env, capture_output=True)
            if status.returncode == 0:
                break
            assert time.monotonic() < deadline, status.stderr.decode()[-2000:]
            time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_tp2_matches_tp1_and_transformers(ray_cluster, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    path = tiny_model_dir("qwen3")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    prompts_ids = [tok.encode(p) for p in PROMPTS[:4]]
    ref = load_reference(path)
    expected = [reference_greedy(ref, ids, GREEDY.max_new_tokens)[len(ids):] for ids in prompts_ids]
    cfg = PytorchEngineConfig(tp=2, distributed_executor_backend="ray", dtype="float32", num_gpu_blocks=12,
                              block_size=4, max_prefill_token_num=7, max_batch_size=4, device_type="cpu")
    with pipeline(path, cfg) as pipe:
        assert _generate_all(pipe, prompts_ids) == expected
        executor = pipe._loop.engine.runner
        pids = list(executor.pids)
        assert len(set(pids)) == 2 and os.getpid() not in pids
        ids = prompts_ids[3]
        chunks = [len(ids) - 2, 1, 1]
        got = pipe._loop.ask(lambda e: chunked_logits(e.runner, ids, chunks)).result()
    one = ModelRunner(path, EngineConfig(dtype="float32", num_gpu_blocks=12, block_size=4, device_type="cpu"))
    torch.testing.assert_close(got, chunked_logits(one, ids, chunks), atol=1e-5, rtol=1e-5)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:  # the actors were killed on close
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _generate_on(url: str, sid: int):
    import requests
    return requests.post(url + "/v1/chat/interactive", timeout=120, json={
        "prompt": "more", "session_id": sid, "interactive_mode": True, "request_output_len": 2,
        "temperature": 0, "ignore_eos": True})


def _replica_actor_pids() -> list:
    """Pids of live processes Ray titled ``ray::_ReplicaActor...`` (the replica actors)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"_ReplicaActor" in cmd and _alive(int(entry)):
                pids.append(int(entry))
    return pids


@pytest.mark.slow
def test_ray_dp2_api_server_replicas_are_actors(ray_cluster, tiny_model_dir):
    """``--dp 2 --distributed-executor ray``: two replica actors; sessions spread over both and stay on
    theirs (the second turn prefills only its new tokens); greedy output is transformers'; actors gone after stop."""
    import requests

    from serving import running_server
    from test_replicas import _metric
    path = tiny_model_dir("qwen3")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    prompts_ids = [tok.encode(p) for p in PROMPTS[:4]]
    ref = load_reference(path)
    expected = [reference_greedy(ref, ids, 6)[len(ids):] for ids in prompts_ids]
    env = {"RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    before = set(_replica_actor_pids())
    with running_server(path, "--dp", "2", "--distributed-executor", "ray", "--dtype", "float32",
                        "--num-gpu-blocks", "64", "--cache-block-seq-len", "16", "--device", "cpu",
                        "--no-enable-prefix-caching", env=env) as (url, _):
        actors = set(_replica_actor_pids()) - before
        assert len(actors) == 2, actors
        for ids, want in zip(prompts_ids, expected):
            r = requests.post(url + "/generate", timeout=120, json={
                "input_ids": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == want

        def turn(sid: int, prompt: str) -> dict:
            r = requests.post(url + "/v1/chat/interactive", timeout=120, json={
                "prompt": prompt, "session_id": sid, "interactive_mode": True, "request_output_len": 3,
                "temperature": 0, "ignore_eos": True, "stream": sid % 2 == 0})
            assert r.status_code == 200, r.text
            if sid % 2 == 0:  # streamed: the last line has the totals
                import json
                lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
                return {"history_tokens": lines[-1]["history_tokens"], "input_tokens": lines[-1]["input_tokens"],
                        "tokens": lines[-1]["tokens"]}
            return r.json()
        from concurrent.futures import ThreadPoolExecutor

        def session(sid: int):
            return turn(sid, f"hello world {sid}"), turn(sid, "and the capital of Italy is")
        with ThreadPoolExecutor(8) as pool:
            turns = list(pool.map(session, range(1, 9)))
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert requests.get(url + "/health", timeout=10).status_code == 200
        dead = sorted(actors)[0]
        os.kill(dead, signal.SIGKILL)  # a replica actor dies: /health says so, the other replica keeps serving
        deadline = time.monotonic() + 30
        while requests.get(url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health did not report the dead replica"
            time.sleep(0.5)
        health = requests.get(url + "/health", timeout=10)
        assert "Ray actor" in health.text, health.text
        replies = [requests.post(url + "/generate", timeout=120, json={
            "input_ids": prompts_ids[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True}) for _ in range(3)]
        assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
        assert all(r.json()["output_ids"] == expected[0] for r in replies)
        got = [_generate_on(url, sid) for sid in range(1, 9)]
        bound = [r for r in got if r.status_code == 503]
        assert bound, [(r.status_code, r.text) for r in got]
        assert all("Ray actor" in r.text for r in bound), bound[0].text
    for first, second in turns:
        assert first["history_tokens"] == 0
        assert second["history_tokens"] == first["input_tokens"] + first["tokens"], (first, second)
    sessions = _metric(metrics, "lmwrap_num_sessions_by_replica")
    assert len(sessions) == 2 and min(sessions.values()) >= 2, sessions
    computed = _metric(metrics, "lmwrap_engine_prompt_tokens_computed_by_replica_total")
    expected_computed = sum(f["input_tokens"] + s["input_tokens"] + 1 for f, s in turns) + sum(map(len, prompts_ids))
    assert sum(computed.values()) == expected_computed, (computed, expected_computed)
    deadline = time.monotonic() + 30
    while set(_replica_actor_pids()) & actors and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_replica_actor_pids()) & actors
