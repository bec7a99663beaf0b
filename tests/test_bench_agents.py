"""`lmwrap bench agents`: the agent workload's exact history growth, and real runs on a tiny model (in-process
engine with the cache off and on, transformers, and through a running api_server). Timings are never asserted."""
import json
import re
import subprocess
import sys

import pytest

from lmwrap_engine.bench_agents import make_agent_workload
from lmwrap_engine.cli import build_parser

AGENTS, TURNS, SYSTEM, USER, REPLY, OBS = 2, 3, 70, 6, 4, 10
# Turn t (0-based) sends SYSTEM + USER + t * (REPLY + OBS) tokens: 76, 90, 104 per agent.
SENT = AGENTS * (76 + 90 + 104)


def test_history_grows_by_the_reply_and_the_observation_exactly():
    vocab = list(range(10, 60))
    w = make_agent_workload(vocab, agents=3, turns=4, system_len=7, user_len=3, reply_len=2, observation_len=5, seed=1)
    assert w == make_agent_workload(vocab, 3, 4, 7, 3, 2, 5, 1) != make_agent_workload(vocab, 3, 4, 7, 3, 2, 5, 2)
    assert (w.agents, w.turns, len(w.system)) == (3, 4, 7)
    assert all(len(obs) == 3 and all(len(o) == 5 for o in obs) for obs in w.observations)  # none after the last turn
    assert len({tuple(q) for q in w.questions}) == 3 and all(len(q) == 3 for q in w.questions)
    assert all(t in vocab for t in w.system + sum(w.questions, []) + sum(sum(w.observations, []), []))
    for a in range(3):
        replies, prompts = [], []
        for t in range(4):
            prompts.append(w.prompt(a, replies))
            replies.append([100 + a, 200 + t])
        assert [len(p) for p in prompts] == [10, 17, 24, 31] == [w.prompt_len(t) for t in range(4)]
        for t in range(3):
            # Each turn re-sends the last one whole, then its reply, then the tool's observation.
            assert prompts[t + 1] == prompts[t] + replies[t] + w.observations[a][t]
        assert prompts[0] == w.system + w.questions[a]
    assert w.prompt_tokens_sent() == 3 * (10 + 17 + 24 + 31) and w.longest_sequence() == 31 + 2
    with pytest.raises(ValueError, match="has 3 tokens, not 2"):
        w.prompt(0, [[1, 2, 3]])
    with pytest.raises(ValueError, match="has 4 turns"):
        w.prompt(0, [[1, 2]] * 4)
    for kw, match in ((dict(agents=0), "--agents must be >= 1"), (dict(reply_len=0), "--reply-len must be >= 1"),
                      (dict(observation_len=-1), "--observation-len must be >= 0"),
                      (dict(system_len=0, user_len=0), "the first turn needs a prompt")):
        args = dict(agents=1, turns=2, system_len=4, user_len=2, reply_len=1, observation_len=1, seed=0)
        with pytest.raises(ValueError, match=match):
            make_agent_workload(vocab, **{**args, **kw})


def _bench(model_dir, *flags, timeout=600):
    cmd = [sys.executable, "-m", "lmwrap_engine.cli", "bench", "agents", model_dir, "--agents", str(AGENTS),
           "--turns", str(TURNS), "--system-len", str(SYSTEM), "--user-len", str(USER), "--reply-len", str(REPLY),
           "--observation-len", str(OBS), "--dtype", "float32", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _check_side(side):
    assert side["requests"] == AGENTS * TURNS and side["prompt_tokens_sent"] == SENT
    assert side["generated_tokens"] == AGENTS * TURNS * REPLY  # ignore_eos: every reply its full length
    assert sorted((r["agent"], r["turn"], r["prompt_tokens"]) for r in side["records"]) == [
        (a, t + 1, SYSTEM + USER + t * (REPLY + OBS)) for a in range(AGENTS) for t in range(TURNS)]
    assert all(len(r["reply"]) == REPLY and r["ttft_s"] > 0 for r in side["records"])
    assert [t["turn"] for t in side["ttft_by_turn_ms"]] == list(range(1, TURNS + 1))
    assert all(0 < t["p50"] <= t["p90"] for t in side["ttft_by_turn_ms"]) and side["wall_s"] > 0


def _replies(side):
    return {(r["agent"], r["turn"]): r["reply"] for r in side["records"]}


def test_compare_cache_and_transformers_side_by_side(model_dir, tmp_path):
    out = tmp_path / "agents.json"
    proc = _bench(model_dir, "--compare-cache", "--block-size", "16", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert f"{SENT:,} prompt tokens in {AGENTS * TURNS} requests" in text
    assert re.search(rf"^lmwrap, cache off +[\d.]+ +{AGENTS * TURNS} +{SENT} +{SENT} +0\.0% ", text, re.M), text
    assert re.search(r"^lmwrap, cache on +[\d.]+ ", text, re.M) and re.search(r"^transformers +[\d.]+ ", text, re.M)
    assert "TTFT by turn, ms (p50 / p90 over the agents)" in text
    for t in range(1, TURNS + 1):
        assert re.search(rf"^{t}( +[\d.]+ / [\d.]+){{3}}$", text, re.M), text
    assert "wall time vs transformers: lmwrap, cache off " in text
    assert "llama.cpp: skipped (" in text  # not installed here, and it would need a .gguf model anyway
    assert "lmwrap, cache on: 100%" in proc.stderr  # the progress bar

    data = json.loads(out.read_text())
    assert data["config"]["prompt_tokens_sent"] == SENT and data["config"]["compare_cache"] is True
    off, on, hf = data["sides"]
    assert [s["side"] for s in data["sides"]] == ["lmwrap, cache off", "lmwrap, cache on", "transformers"]
    assert (off["enable_prefix_caching"], on["enable_prefix_caching"], on["block_size"]) == (False, True, 16)
    for side in data["sides"]:
        _check_side(side)
    # Without the cache every prompt token is computed, exactly; with it each turn reuses the last one's history.
    assert off["prompt_tokens_computed"] == SENT and off["prefix_hit_tokens"] == 0
    assert on["prompt_tokens_computed"] < SENT and on["prefix_hit_tokens"] > 0
    assert on["prefix_hit_rate"] == pytest.approx(on["prefix_hit_tokens"] / on["prefix_query_tokens"])
    assert off["engine_stats"]["num_requests"] == on["engine_stats"]["num_requests"] == AGENTS * TURNS
    assert hf["prompt_tokens_computed"] == SENT and hf["prefix_hit_rate"] is None
    # Greedy and the same histories: the cache changes no reply.
    assert _replies(off) == _replies(on)


def test_enable_prefix_caching_flag_on_a_single_run(model_dir, tmp_path):
    out = tmp_path / "on.json"
    proc = _bench(model_dir, "--enable-prefix-caching", "--no-hf", "--disable-tqdm", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "transformers" not in proc.stdout and "cache on:" not in proc.stderr
    (side,) = json.loads(out.read_text())["sides"]
    assert side["side"] == "lmwrap, cache on" and side["enable_prefix_caching"] is True
    _check_side(side)
    # The 70-token system prompt fills one 64-token block: every later turn of an agent hits at least it.
    assert side["prompt_tokens_computed"] <= SENT - (AGENTS * TURNS - AGENTS) * 64


def test_through_a_running_api_server(model_dir, tmp_path):
    from serving import running_server, wait_blocks_free
    out = tmp_path / "server.json"
    with running_server(model_dir, "--enable-prefix-caching", "--cache-block-seq-len", "16") as (base_url, server):
        proc = _bench(model_dir, "--base-url", base_url, "--no-hf", "--json", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert server.poll() is None
        assert wait_blocks_free(base_url)["lmwrap_kv_cache_blocks_used"] == 0
    assert f"server: {base_url} " in proc.stdout and re.search(r"^server +[\d.]+ +6 +540 ", proc.stdout, re.M)
    (side,) = json.loads(out.read_text())["sides"]
    assert side["side"] == "server" and side["base_url"] == base_url
    _check_side(side)
    # The server counted the same prompt tokens, computed fewer of them (its /metrics), and generated every reply.
    assert (side["usage_prompt_tokens"], side["usage_completion_tokens"]) == (SENT, AGENTS * TURNS * REPLY)
    assert 0 < side["prompt_tokens_computed"] < SENT and side["prefix_hit_tokens"] > 0


def test_bad_flags_are_clear_errors(model_dir):
    for flags, match in ((["--compare-cache", "--enable-prefix-caching"], "drop --enable-prefix-caching"),
                         (["--base-url", "http://127.0.0.1:1", "--compare-cache"], "with --base-url start the server"),
                         (["--agents", "0"], "--agents must be >= 1"),
                         (["--turns", "0"], "--turns must be >= 1")):
        args = build_parser().parse_args(["bench", "agents", model_dir] + flags)
        with pytest.raises(SystemExit, match=match):
            args.func(args)


def test_llama_cpp_side_by_side_on_the_default_gguf(tmp_path):
    """llama.cpp (installed by `make test`) runs the same turns on the same GGUF file, one sequence at a time."""
    pytest.importorskip("llama_cpp")
    from lmwrap_engine.model_path import default_gguf_path
    out = tmp_path / "llama.json"
    system, user, reply, obs, turns = 64, 4, 4, 8, 2
    proc = subprocess.run([sys.executable, "-m", "lmwrap_engine.cli", "bench", "agents", default_gguf_path(),
                           "--agents", "2", "--turns", str(turns), "--system-len", str(system), "--user-len", str(user),
                           "--reply-len", str(reply), "--observation-len", str(obs), "--no-hf", "--disable-tqdm",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^llama\.cpp +[\d.]+ +4 ", proc.stdout, re.M), proc.stdout
    ours, llama = json.loads(out.read_text())["sides"]
    assert (ours["side"], llama["side"]) == ("lmwrap, cache on", "llama.cpp")
    sent = 2 * (system + user) + 2 * (system + user + reply + obs)
    for side in (ours, llama):
        assert side["requests"] == 4 and side["prompt_tokens_sent"] == sent
        assert all(len(r["reply"]) == reply for r in side["records"])
    # Its prompt cache reuses the agent's previous turn, as ours does (the other agent's history is evicted).
    assert 0 < llama["prompt_tokens_computed"] < sent
