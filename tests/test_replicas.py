"""``--dp 2``: two engine replicas behind one api_server; sessions spread by outstanding requests and
stay on their replica (the second turn prefills only its new tokens); /metrics per replica."""
import re
from concurrent.futures import ThreadPoolExecutor

import requests

from serving import running_server

from lmwrap_engine import GenerationConfig
from lmwrap_engine.replicas import ReplicaSet
from tiny_models import tiny_config


def _metric(text: str, name: str) -> dict:
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(rf'^{name}{{replica="(\d+)"}} (\S+)$', text, re.M)}


def test_dp2_api_server_spreads_sessions_and_keeps_each_on_its_replica(model_dir):
    with running_server(model_dir, "--dp", "2", "--dtype", "float32", "--num-gpu-blocks", "128",
                        "--cache-block-seq-len", "16", "--device", "cpu", "--no-enable-prefix-caching") as (url, _):
        def turn(sid: int, prompt: str) -> dict:
            r = requests.post(url + "/v1/chat/interactive", timeout=120, json={
                "prompt": prompt, "session_id": sid, "interactive_mode": True, "request_output_len": 3,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()

        def session(sid: int):
            return turn(sid, f"hello world {sid}"), turn(sid, "and the capital of Italy is")
        with ThreadPoolExecutor(32) as pool:
            turns = list(pool.map(session, range(1, 33)))
        metrics = requests.get(url + "/metrics", timeout=10).text
    for first, second in turns:
        assert first["history_tokens"] == 0
        # the second turn continued the session where its KV is: all it holds is history
        assert second["history_tokens"] == first["input_tokens"] + first["tokens"], (first, second)
    sessions = _metric(metrics, "lmwrap_num_sessions_by_replica")
    assert sum(sessions.values()) == 32 and min(sessions.values()) >= 8, sessions
    computed = _metric(metrics, "lmwrap_engine_prompt_tokens_computed_by_replica_total")
    # (no prefix cache) each second turn computes its new tokens plus the first turn's last sampled token, nothing else
    expected = sum(f["input_tokens"] + s["input_tokens"] + 1 for f, s in turns)
    assert sum(computed.values()) == expected, (computed, expected)
    assert set(_metric(metrics, "lmwrap_replica_outstanding_requests").values()) == {0.0}


def test_replica_set_routes_by_least_outstanding_and_affinity(model_dir):
    with ReplicaSet(model_dir, dp=2, backend_config=tiny_config()) as rs:
        outs = {}

        def emit_to(sid):
            return lambda out: outs.setdefault(sid, []).append(out)
        gen = GenerationConfig(max_new_tokens=2, ignore_eos=True)
        params = rs.sampling_params(gen, 8)
        rs.submit(1, [5, 6, 7], params, emit_to(1), sequence_end=False)
        rs.submit(2, [5, 6, 7], params, emit_to(2), sequence_end=False)
        assert {rs.replica_of(1), rs.replica_of(2)} == {0, 1}
        import time
        deadline = time.monotonic() + 30
        while sum(rs.outstanding) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rs.outstanding == [0, 0]
        first = rs.replica_of(1)
        rs.submit(1, [8], params, emit_to(1), sequence_start=False)  # goes back to its replica
        assert rs.replica_of(1) == first
        while sum(rs.outstanding) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outs[1][-1].finish_reason == "length" and outs[1][-1].num_history_tokens == 5
        stats = rs.stats()
        assert [s["num_requests"] for s in stats["replicas"]] == ([2, 1] if first == 0 else [1, 2])
        assert stats["num_requests"] == 3
