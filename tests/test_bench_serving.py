"""`lmwrap bench serving`: its statistics on known inputs, its workload and arrivals, and real runs against
a real api_server (one it starts itself, one already running) on a tiny model. Timings are never asserted."""
import asyncio
import json
import math
import random
import re
import socket
import subprocess
import sys

import pytest

from lmwrap_engine.bench_serving import (RequestResult, arrival_offsets, compute_metrics, make_prompts,
                                         parse_rates, percentile, run_load, summarize)
from lmwrap_engine.cli import build_parser

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 4, 8, 3


def test_percentile_interpolates_like_numpy_on_known_inputs():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4  # order does not matter
    assert percentile([10, 20, 30, 40, 50], 25) == 20 and percentile([10, 20, 30, 40, 50], 10) == 14
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile must be in"):
        percentile([1], 101)
    np = pytest.importorskip("numpy")
    values = [random.Random(3).lognormvariate(0, 1) for _ in range(101)]
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_summarize_scales_and_handles_empty():
    assert summarize([0.001, 0.002, 0.003, 0.004], 1e3) == pytest.approx(
        {"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_compute_metrics_on_known_results():
    results = [
        RequestResult(success=True, input_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestResult(success=True, input_tokens=20, output_tokens=3, ttft=0.3, latency=0.7, itl=[0.1, 0.3]),
        RequestResult(success=True, input_tokens=30, output_tokens=1, ttft=0.2, latency=0.2, itl=[]),
        RequestResult(success=False, error="HTTP 500", input_tokens=99, output_tokens=99, ttft=9, latency=9),
    ]
    m = compute_metrics(results, duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 60, 9)
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.5 and m["total_token_throughput"] == 34.5
    assert m["ttft_ms"] == pytest.approx({"mean": 200, "p50": 200, "p90": 280, "p99": 298})
    # TPOT (E2EL - TTFT) / (output tokens - 1): 100 ms and 200 ms; a 1-token request has none.
    assert m["tpot_ms"] == pytest.approx({"mean": 150, "p50": 150, "p90": 190, "p99": 199})
    assert m["itl_ms"]["mean"] == pytest.approx(800 / 6) and m["itl_ms"]["p50"] == pytest.approx(100)
    assert m["e2el_ms"] == pytest.approx({"mean": 1400 / 3, "p50": 500, "p90": 660, "p99": 696})
    empty = compute_metrics([RequestResult(error="refused")], duration=1.0)
    assert empty["completed"] == 0 and empty["ttft_ms"]["p99"] is None


def test_parse_rates():
    assert parse_rates("1,4,inf") == [1.0, 4.0, math.inf]
    assert parse_rates(" 0.5 , INF") == [0.5, math.inf]
    for bad, match in (("0", "must be > 0"), ("-1", "must be > 0"), ("nan", "must be > 0"), ("1,x", "'x'"),
                       ("", "''")):
        with pytest.raises(ValueError, match=match):
            parse_rates(bad)


def test_arrivals_are_seeded_poisson_and_inf_is_a_burst():
    assert arrival_offsets(5, math.inf, 0) == [0.0] * 5
    offsets = arrival_offsets(4000, 4.0, 1)
    assert offsets == arrival_offsets(4000, 4.0, 1) and offsets != arrival_offsets(4000, 4.0, 2)
    assert offsets[0] == 0.0 and all(b > a for a, b in zip(offsets, offsets[1:]))
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert 0.24 < sum(gaps) / len(gaps) < 0.26  # mean gap 1 / rate
    # Exponential gaps: about 1 - 1/e of them are shorter than the mean.
    assert 0.60 < sum(g < 0.25 for g in gaps) / len(gaps) < 0.66
    assert [o / 2 for o in arrival_offsets(10, 4.0, 1)] == pytest.approx(arrival_offsets(10, 8.0, 1))


def test_make_prompts_are_seeded_texts_of_the_asked_token_lengths(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tok, 20, (16, 16), (3, 5), 0)
    assert prompts == make_prompts(tok, 20, (16, 16), (3, 5), 0) != make_prompts(tok, 20, (16, 16), (3, 5), 1)
    for text, num_in, out_len in prompts:
        assert len(tok.encode(text, add_special_tokens=False)) == num_in
        assert 3 <= out_len <= 5 and "\ufffd" not in text and not any(s in text for s in tok.all_special_tokens)
    assert sum(num_in == 16 for _, num_in, _ in prompts) >= 18  # re-encoding rarely misses the length
    ranged = make_prompts(tok, 30, (4, 40), (2, 2), 0, "sharegpt-like")
    assert all(4 - 1 <= n <= 40 + 1 and o == 2 for _, n, o in ranged)


def test_run_load_keeps_to_max_concurrency_and_the_prompt_order():
    in_flight, peak = 0, 0

    async def send(prompt, output_len):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return RequestResult(success=True, output_tokens=output_len, ttft=0.001, latency=0.002)

    prompts = [(f"p{i}", 7, i + 1) for i in range(9)]
    results, duration = asyncio.run(run_load(send, prompts, [0.0] * 9, 3))
    assert peak == 3 and duration > 0
    assert [r.output_tokens for r in results] == list(range(1, 10)) and all(r.input_tokens == 7 for r in results)
    peak = 0
    asyncio.run(run_load(send, prompts, [0.0] * 9, None))
    assert peak == 9


def test_bad_flags_are_clear_errors(model_dir):
    for flags, match in ((["--request-rate", "0"], "each rate must be > 0"),
                         (["--input-len", "9", "3"], "--input-len needs 1 <= MIN <= MAX"),
                         (["--output-len", "1", "2", "3"], "--output-len takes N or MIN MAX"),
                         (["--num-prompts", "0"], "--num-prompts must be >= 1"),
                         (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
                         (["--base-url", "http://127.0.0.1:1", "--server-args", "--x 1"], "--server-args")):
        args = build_parser().parse_args(["bench", "serving", model_dir] + flags)
        with pytest.raises(SystemExit, match=match):
            args.func(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_not_there_is_a_clear_error(model_dir):
    proc = _bench(model_dir, "--base-url", f"http://127.0.0.1:{_free_port()}", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot list the models of http://127.0.0.1:" in proc.stderr


def _bench(model_dir, *flags, timeout=600):
    cmd = [sys.executable, "-m", "lmwrap_engine.cli", "bench", "serving", model_dir, "--num-prompts",
           str(NUM_PROMPTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _check_run(run, side, rate):
    m = run["metrics"]
    assert (run["side"], run["request_rate"], run["errors"]) == (side, rate, [])
    assert (m["completed"], m["failed"]) == (NUM_PROMPTS, 0)
    assert m["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN  # ignore_eos: every request its full length
    assert m["total_input_tokens"] >= NUM_PROMPTS * INPUT_LEN
    assert m["duration_s"] > 0 and m["output_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = m[key]
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"] and s["mean"] >= 0, (key, s)


def test_bench_serving_starts_its_own_server_and_compares_with_the_engine(model_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = _bench(model_dir, "--request-rate", "50,inf", "--max-concurrency", "3", "--dtype", "float32",
                  "--compare-engine", "--json", str(out), "--save-detailed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for rate in ("50", "inf"):
        table = re.search(rf"=+ Serving Benchmark, request rate {rate} =+\n(.*?)\n=+\n", text, re.S)
        assert table, text
        assert re.search(rf"^Successful requests: +{NUM_PROMPTS}$", table.group(1), re.M)
        assert re.search(rf"^Total generated tokens: +{NUM_PROMPTS * OUTPUT_LEN}$", table.group(1), re.M)
        for name in ("TTFT", "TPOT", "ITL", "E2EL"):
            for stat in ("Mean", "Median", "P90", "P99"):
                assert re.search(rf"^{stat} {name} \(ms\): +[\d.]+$", table.group(1), re.M), (stat, name, table)
        assert re.search(rf"In-process engine Benchmark, request rate {rate}", text)
        assert re.search(rf"TTFT through the server vs in-process engine, request rate {rate} ", text)
    assert re.search(r"^mean +[\d.]+ +[\d.]+ +-?[\d.]+ +-?[\d.]+ +(met|missed)$", text, re.M), text
    assert "server rate inf" in proc.stderr  # the progress bar

    data = json.loads(out.read_text())
    assert data["config"]["request_rates"] == ["50", "inf"] and data["config"]["max_concurrency"] == 3
    assert [(r["side"], r["request_rate"]) for r in data["runs"]] == [
        ("server", "50"), ("server", "inf"), ("engine", "50"), ("engine", "inf")]
    for run in data["runs"]:
        _check_run(run, run["side"], run["request_rate"])
        assert [r["output_tokens"] for r in run["requests"]] == [OUTPUT_LEN] * NUM_PROMPTS
        assert all(len(r["itl"]) >= 1 for r in run["requests"])
    # The same text, tokenized by the server and by the in-process engine.
    assert data["runs"][0]["metrics"]["total_input_tokens"] == data["runs"][2]["metrics"]["total_input_tokens"]
    assert [c["request_rate"] for c in data["ttft_comparison"]] == ["50", "inf"]
    cmp = data["ttft_comparison"][0]["ttft"]["mean"]
    assert cmp["diff_ms"] == pytest.approx(cmp["server_ms"] - cmp["engine_ms"])
    assert isinstance(cmp["within_goal"], bool)

    # The server it started is gone.
    base_url = re.search(r"^server: (http://127\.0\.0\.1:\d+) ", text, re.M).group(1)
    port = int(base_url.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_bench_serving_against_a_running_server_with_chat(model_dir, tmp_path):
    from serving import running_server, wait_blocks_free
    out = tmp_path / "chat.json"
    with running_server(model_dir) as (base_url, server):
        proc = _bench(model_dir, "--base-url", base_url, "--endpoint", "chat", "--request-rate", "inf",
                      "--disable-tqdm", "--json", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert server.poll() is None  # a server it did not start is left running
        assert wait_blocks_free(base_url)["lmwrap_kv_cache_blocks_used"] == 0
        wrong = _bench(model_dir, "--base-url", base_url, "--served-model-name", "no-such-model", timeout=120)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr, wrong.stderr
    assert "a warm-up request to the server failed: HTTP 404" in wrong.stderr and "no-such-model" in wrong.stderr
    assert "Serving Benchmark, request rate inf" in proc.stdout and f"server: {base_url} " in proc.stdout
    assert "server rate" not in proc.stderr
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 1 and data["ttft_comparison"] == []
    _check_run(data["runs"][0], "server", "inf")
    # Each prompt went through the chat template: more tokens than the raw text.
    assert data["runs"][0]["metrics"]["total_input_tokens"] > NUM_PROMPTS * INPUT_LEN + NUM_PROMPTS
