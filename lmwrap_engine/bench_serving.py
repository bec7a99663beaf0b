"""``lmwrap bench serving``: online serving benchmark (like vLLM's ``benchmark_serving.py``).

Sends ``--num-prompts`` streaming requests to an OpenAI-compatible server (``/v1/completions``, or
``/v1/chat/completions`` with ``--endpoint chat``) with Poisson arrivals, once per rate of
``--request-rate`` (e.g. ``1,4,inf``; ``inf`` sends every request at once), and reports per rate:
completed requests, duration, request and token throughput, and mean / p50 / p90 / p99 of time to
first token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL) and
end-to-end latency (E2EL).

Without ``--base-url`` it starts ``lmwrap serve api_server`` on the model (the default model when
none is named) on 127.0.0.1 and a free port, waits for ``/health``, and stops it at the end.

Workload (seeded, the same for every rate): prompts of random plain-vocabulary tokens decoded to
text, lengths drawn by ``lmwrap bench throughput``'s ``--dataset`` helpers (``uniform`` in the
``--input-len`` / ``--output-len`` ranges, one number = a fixed length; or ``sharegpt-like``),
``ignore_eos`` so every request generates exactly its output length, greedy. Token counts come
from the server's usage (``stream_options.include_usage``).

Measurement: a request's clock starts when it is sent (after waiting for a ``--max-concurrency``
slot); every streamed chunk that carries a choice is a token event, timestamped on arrival
(``time.perf_counter``); on the in-process engine every ``GenOut`` delta is one. TTFT is the first
event, ITL the gaps between events, E2EL the last event, TPOT ``(E2EL - TTFT) / (output tokens - 1)``;
percentiles interpolate linearly (numpy's default).

``--compare-engine`` runs the same workload with the same arrivals on the in-process engine
(``AsyncEngine.generate``) after the server runs, and prints TTFT through the server next to the
in-process engine's (the goal: within 10% or 15 ms). It reports; it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Awaitable, Callable, List, Optional, Sequence, Tuple

from .bench import DATASETS, make_workload

DEFAULT_INPUT_LEN = (128, 128)
DEFAULT_OUTPUT_LEN = (128, 128)
PERCENTILES = (50, 90, 99)
TTFT_GOAL_RATIO, TTFT_GOAL_MS = 0.10, 15.0  # server TTFT within 10% or 15 ms of the in-process engine's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model to serve (HF folder, .gguf, or hub id in the local cache; default model "
                             "when omitted); with --base-url it only supplies the tokenizer for the prompts")
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default=None, metavar="URL",
                        help="an OpenAI-compatible server already running, e.g. http://127.0.0.1:23333 "
                             "(default: start `lmwrap serve api_server` on the model, stop it at the end)")
    target.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                        help="stream /v1/completions (raw prompt) or /v1/chat/completions (one user message "
                             "through the chat template) (default: %(default)s)")
    target.add_argument("--protocol", default="http", choices=["http", "triton"],
                        help="http: an OpenAI-compatible server; triton: gRPC to the text model of a Triton "
                             "server (`lmwrap serve triton`; --base-url is then host:port) (default: %(default)s)")
    target.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the `model` field of the requests (default: the first id of GET /v1/models)")
    target.add_argument("--api-key", default=None, metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    target.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer for the prompts (default: the model's)")
    target.add_argument("--server-args", default="", metavar="ARGS",
                        help="extra arguments for the server this command starts, one shell-quoted string, "
                             "e.g. \"--max-batch-size 64\"")
    target.add_argument("--server-timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for the started server's /health (default: %(default)s)")
    target.add_argument("--request-timeout", type=float, default=3600.0, metavar="S",
                        help="seconds before one request counts as failed (default: %(default)s)")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", default="inf", metavar="RATES",
                      help="comma-separated request rates in requests/s, one run each; Poisson arrivals; "
                           "`inf` sends every request at once (default: %(default)s)")
    load.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                      help="at most N requests in flight; later arrivals wait for a slot, and their clock "
                           "starts when sent (default: no limit)")
    load.add_argument("--num-prompts", type=int, default=64, metavar="N",
                      help="requests per rate (default: %(default)s)")
    load.add_argument("--dataset", default="uniform", choices=DATASETS,
                      help="request lengths: uniform in the --input-len / --output-len ranges, or ShareGPT-like "
                           "lognormal clipped to them, as `lmwrap bench throughput` (default: %(default)s)")
    load.add_argument("--input-len", type=int, nargs="+", default=None, metavar="N",
                      help="prompt length in tokens: N, or MIN MAX (default: 128; sharegpt-like 4 1024)")
    load.add_argument("--output-len", type=int, nargs="+", default=None, metavar="N",
                      help="output length in tokens, EOS ignored: N, or MIN MAX (default: 128; "
                           "sharegpt-like 4 1024)")
    load.add_argument("--num-warmups", type=int, default=4, metavar="N",
                      help="before the timed runs, not counted: one short request, then the first N prompts at "
                           "once with up to 16 output tokens (0: the short request only) (default: %(default)s)")
    load.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seeds the prompts and the arrivals (default: %(default)s)")

    engine = parser.add_argument_group("engine (given to the started server and to --compare-engine's engine)")
    engine.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights' and activations' dtype (default: the engine's, auto)")
    engine.add_argument("--session-len", type=int, default=None, metavar="N",
                        help="longest sequence in tokens (default: the model's context length)")
    engine.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                        help="most requests running at once in the engine (default: the engine's, 128)")
    engine.add_argument("--compare-engine", action="store_true",
                        help="after the server runs, run the same workload with the same arrivals on MODEL "
                             "in this process (AsyncEngine.generate) and print TTFT through the server next to "
                             "the in-process engine's")

    output = parser.add_argument_group("output")
    output.add_argument("--json", default=None, metavar="PATH", help="write the config and results as JSON")
    output.add_argument("--save-detailed", action="store_true",
                        help="with --json: also each request's lengths, TTFT, ITLs, latency and error")
    output.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


# -- statistics ------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict:
    """``{mean, p50, p90, p99}`` of ``values`` times ``scale`` (None each when empty)."""
    out = {"mean": sum(values) / len(values) * scale if values else None}
    for q in PERCENTILES:
        p = percentile(values, q)
        out[f"p{q}"] = None if p is None else p * scale
    return out


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0          # seconds from send to the first token event
    latency: float = 0.0       # seconds from send to the last token event
    itl: List[float] = field(default_factory=list)  # seconds between token events
    start: float = 0.0         # send time, seconds since the run began


class TokenClock:
    """Times one streamed request: ``tick`` at each token event, then ``into`` writes its TTFT, the gaps
    between events and its latency (to the last token event, as vLLM) into a ``RequestResult``."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.events = 0
        self.ttft = 0.0
        self.gaps: List[float] = []

    def tick(self, now: float) -> None:
        if self.events == 0:
            self.ttft = now - self.start
        else:
            self.gaps.append(now - self.last)
        self.events += 1
        self.last = now

    def into(self, result: "RequestResult") -> None:
        result.ttft, result.itl, result.latency = self.ttft, self.gaps, self.last - self.start


def compute_metrics(results: Sequence[RequestResult], duration: float) -> dict:
    """vLLM's serving metrics over the successful requests; times in ms."""
    ok = [r for r in results if r.success]
    num_in = sum(r.input_tokens for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": num_out / duration if duration > 0 else None,
        "total_token_throughput": (num_in + num_out) / duration if duration > 0 else None,
        "ttft_ms": summarize([r.ttft for r in ok], 1e3),
        "tpot_ms": summarize(tpots, 1e3),
        "itl_ms": summarize([x for r in ok for x in r.itl], 1e3),
        "e2el_ms": summarize([r.latency for r in ok], 1e3),
    }


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_metrics(title: str, m: dict) -> str:
    """The per-run table, laid out like vLLM's."""
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(name, value):
        lines.append(f"{name:<44}{value:>16}")

    row("Successful requests:", str(m["completed"]))
    if m["failed"]:
        row("Failed requests:", str(m["failed"]))
    row("Benchmark duration (s):", _fmt(m["duration_s"]))
    row("Total input tokens:", str(m["total_input_tokens"]))
    row("Total generated tokens:", str(m["total_output_tokens"]))
    row("Request throughput (req/s):", _fmt(m["request_throughput"]))
    row("Output token throughput (tok/s):", _fmt(m["output_throughput"]))
    row("Total token throughput (tok/s):", _fmt(m["total_token_throughput"]))
    for key, name, long_name in (("ttft_ms", "TTFT", "Time to First Token"),
                                 ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
                                 ("itl_ms", "ITL", "Inter-token Latency"),
                                 ("e2el_ms", "E2EL", "End-to-end Latency")):
        lines.append(f"{long_name:-^60}")
        s = m[key]
        row(f"Mean {name} (ms):", _fmt(s["mean"]))
        for q in PERCENTILES:
            row(f"{'Median' if q == 50 else f'P{q}'} {name} (ms):", _fmt(s[f"p{q}"]))
    lines.append("=" * 60)
    return "\n".join(lines)


def format_summary(runs: Sequence[dict]) -> str:
    """One line per (side, rate): the headline numbers of every run."""
    head = (f"{'side':<10}{'rate':>7}{'done':>6}{'dur s':>9}{'req/s':>8}{'out tok/s':>11}{'TTFT mean':>11}"
            f"{'TTFT p99':>10}{'TPOT mean':>11}{'ITL p99':>9}{'E2EL mean':>11}")
    lines = [head, "-" * len(head)]
    for r in runs:
        m = r["metrics"]
        lines.append(f"{r['side']:<10}{r['request_rate']:>7}{m['completed']:>6}{_fmt(m['duration_s']):>9}"
                     f"{_fmt(m['request_throughput']):>8}{_fmt(m['output_throughput'], 1):>11}"
                     f"{_fmt(m['ttft_ms']['mean'], 1):>11}{_fmt(m['ttft_ms']['p99'], 1):>10}"
                     f"{_fmt(m['tpot_ms']['mean'], 1):>11}{_fmt(m['itl_ms']['p99'], 1):>9}"
                     f"{_fmt(m['e2el_ms']['mean'], 1):>11}")
    lines.append("(times in ms)")
    return "\n".join(lines)


def ttft_comparison(server: dict, engine: dict) -> dict:
    """Server vs in-process TTFT per statistic: both values, the gap, and whether it meets the goal."""
    out = {}
    for stat in ("mean", "p50", "p90", "p99"):
        s, e = server["ttft_ms"][stat], engine["ttft_ms"][stat]
        if s is None or e is None:
            out[stat] = {"server_ms": s, "engine_ms": e, "diff_ms": None, "diff_pct": None, "within_goal": None}
            continue
        diff = s - e
        out[stat] = {"server_ms": s, "engine_ms": e, "diff_ms": diff,
                     "diff_pct": diff / e * 100 if e > 0 else None,
                     "within_goal": diff <= TTFT_GOAL_MS or diff <= TTFT_GOAL_RATIO * e}
    return out


def format_comparison(rate: str, cmp: dict) -> str:
    lines = [f"TTFT through the server vs in-process engine, request rate {rate} "
             f"(goal: within {TTFT_GOAL_RATIO:.0%} or {TTFT_GOAL_MS:g} ms)",
             f"{'':<8}{'server ms':>11}{'engine ms':>11}{'diff ms':>10}{'diff %':>9}  goal"]
    for stat, c in cmp.items():
        goal = "n/a" if c["within_goal"] is None else ("met" if c["within_goal"] else "missed")
        lines.append(f"{stat:<8}{_fmt(c['server_ms']):>11}{_fmt(c['engine_ms']):>11}{_fmt(c['diff_ms']):>10}"
                     f"{_fmt(c['diff_pct'], 1):>9}  {goal}")
    return "\n".join(lines)


# -- workload and arrivals -------------------------------------------------------------------------

def parse_rates(text: str) -> List[float]:
    """``"1,4,inf"`` -> ``[1.0, 4.0, inf]``; every rate must be > 0."""
    rates = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--request-rate: {part!r} is not a number or 'inf'") from None
        if not rate > 0:  # also rejects nan
            raise ValueError(f"--request-rate: each rate must be > 0 (or inf), got {part!r}")
        rates.append(rate)
    return rates


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def arrival_offsets(n: int, rate: float, seed: int) -> List[float]:
    """Seconds after the start at which each of ``n`` requests arrives: a Poisson process of ``rate``
    (the first at 0, exponential gaps), or all at 0 for ``inf``."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, offsets = 0.0, []
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def _length_range(values, default, flag: str) -> Tuple[int, int]:
    values = values or default
    if len(values) not in (1, 2):
        raise ValueError(f"{flag} takes N or MIN MAX, got {len(values)} numbers")
    lo, hi = values[0], values[-1]
    if not 1 <= lo <= hi:
        raise ValueError(f"{flag} needs 1 <= MIN <= MAX, got {lo} {hi}")
    return lo, hi


def _prompt_text(tokenizer, ids: List[int], vocab: List[int], rng: random.Random) -> str:
    """Text that re-encodes to about ``len(ids)`` tokens: random ids decode to text that tokenizes differently
    (merges, split UTF-8), so trim or pad a few rounds."""
    target = len(ids)
    text = tokenizer.decode(ids)
    for _ in range(4):
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == target:
            break
        again = again[:target] + [rng.choice(vocab) for _ in range(target - len(again))]
        text = tokenizer.decode(again)
    return text


def make_prompts(tokenizer, num: int, input_len: Tuple[int, int], output_len: Tuple[int, int], seed: int,
                 dataset: str = "uniform") -> List[Tuple[str, int, int]]:
    """``num`` seeded requests ``(prompt_text, prompt_tokens, output_len)`` (prompt tokens: the text's own
    count, no special tokens)."""
    from .bench import _plain_vocab
    vocab = _plain_vocab(tokenizer)
    # Byte-fragment tokens (part of a UTF-8 character) decode to U+FFFD, which re-encodes as other tokens.
    pieces = tokenizer.batch_decode([[i] for i in vocab])
    vocab = [i for i, piece in zip(vocab, pieces) if piece and "\ufffd" not in piece] or vocab
    rng = random.Random(seed + 1)
    prompts = []
    for ids, out_len in make_workload(vocab, num, input_len, output_len, seed, dataset):
        text = _prompt_text(tokenizer, ids, vocab, rng)
        prompts.append((text, len(tokenizer.encode(text, add_special_tokens=False)), out_len))
    return prompts


async def run_load(send: Callable[[str, int], Awaitable[RequestResult]], prompts, offsets: Sequence[float],
                   max_concurrency: Optional[int], progress=None) -> Tuple[List[RequestResult], float]:
    """Sends request ``i`` at ``offsets[i]`` seconds (at most ``max_concurrency`` in flight); returns the results
    in prompt order and the duration (start to the last request's end)."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(i: int) -> RequestResult:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots:
            await slots.acquire()
        try:
            sent = time.perf_counter()
            result = await send(prompts[i][0], prompts[i][2])
            result.start = sent - start
            if not result.input_tokens:
                result.input_tokens = prompts[i][1]
        finally:
            if slots:
                slots.release()
        if progress is not None:
            progress.update(1)
        return result

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return list(results), time.perf_counter() - start


# -- the two sides: an OpenAI-compatible server, the in-process engine ------------------------------

def _request_body(endpoint: str, model: str, prompt: str, output_len: int) -> dict:
    body = {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _error_text(data: dict) -> Optional[str]:
    err = data.get("error")
    if err is not None:
        return err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    if data.get("object") == "error":
        return data.get("message") or json.dumps(data)
    return None


async def sse_payloads(client, url: str, body: dict) -> AsyncIterator[Tuple[float, dict]]:
    """``(arrival time, JSON payload)`` of each ``data:`` line of a streaming POST, up to ``[DONE]``.
    An HTTP error or an error payload raises ``RuntimeError`` with the server's message."""
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {resp.status_code}: {text[:500]}")
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            data = json.loads(payload)
            error = _error_text(data)
            if error:
                raise RuntimeError(error)
            yield now, data


async def send_openai(client, url: str, endpoint: str, model: str, prompt: str, output_len: int) -> RequestResult:
    """One streaming request; a token event is every SSE chunk that carries a choice."""
    result = RequestResult()
    body = _request_body(endpoint, model, prompt, output_len)
    finish = None
    clock = TokenClock()
    try:
        async for now, data in sse_payloads(client, url, body):
            if data.get("choices"):
                clock.tick(now)
                finish = data["choices"][0].get("finish_reason") or finish
            usage = data.get("usage")
            if usage:
                result.input_tokens = usage.get("prompt_tokens") or 0
                result.output_tokens = usage.get("completion_tokens") or 0
        clock.into(result)  # to the last token, as vLLM: not the usage chunk or [DONE]
        if finish in ("error", "abort"):
            result.error = f"finish_reason {finish!r}"
        elif clock.events == 0:
            result.error = "the stream carried no tokens"
        else:
            result.output_tokens = result.output_tokens or clock.events  # a server without usage: one token per event
            result.success = True
    except RuntimeError as exc:  # the server's own error: counted, not fatal
        result.error = str(exc)
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def send_engine(engine, session_ids, endpoint: str, prompt: str, output_len: int) -> RequestResult:
    """The same request on the in-process engine; a token event is every ``GenOut`` delta."""
    from .config import GenerationConfig
    result = RequestResult()
    gen = GenerationConfig(max_new_tokens=output_len, ignore_eos=True, do_sample=False)
    messages = [{"role": "user", "content": prompt}] if endpoint == "chat" else prompt
    clock = TokenClock()
    try:
        async for out in engine.generate(messages, next(session_ids), gen_config=gen,
                                         do_preprocess=endpoint == "chat"):
            clock.tick(time.perf_counter())
            if out.finish_reason:
                result.input_tokens, result.output_tokens = out.input_token_len, out.generate_token_len
                if out.finish_reason in ("error", "abort"):
                    result.error = f"finish_reason {out.finish_reason!r}: {out.response}"
        clock.into(result)
        result.success = not result.error
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """``lmwrap serve api_server`` in a child process on 127.0.0.1 and a free port; a context manager
    that waits for ``/health`` and stops the server (SIGINT, then SIGKILL) on exit."""

    def __init__(self, model: Optional[str], extra_args: Sequence[str] = (), timeout: float = 600.0):
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "lmwrap_engine.cli", "serve", "api_server"]
        self.cmd += ([model] if model else []) + ["--server-name", "127.0.0.1", "--server-port", str(self.port)]
        self.cmd += list(extra_args)
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None
        self.log = None

    def __enter__(self) -> "ApiServer":
        httpx = _httpx()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lmwrap-bench-serving-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + self.timeout
            with httpx.Client(trust_env=False, timeout=5.0) as client:
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"the api_server exited with code {self.proc.returncode} before it was "
                                           f"ready: {shlex.join(self.cmd)}\n{self.log_tail()}")
                    try:
                        if client.get(self.base_url + "/health").status_code == 200:
                            return self
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the api_server was not ready after {self.timeout:g} s: "
                                           f"{shlex.join(self.cmd)}\n{self.log_tail()}")
                    time.sleep(0.25)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.returncode != 0 and self.log is not None:
                print(f"warning: the api_server exited with code {self.proc.returncode}:\n{self.log_tail()}",
                      file=sys.stderr)
        if self.log is not None:
            self.log.close()
            os.unlink(self.log.name)
            self.log = None


def _server_model_name(client, base_url: str) -> str:
    resp = client.get(base_url + "/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --served-model-name")
    return data[0]["id"]


def _httpx():
    try:
        import httpx
    except ImportError:
        raise SystemExit("lmwrap bench serving needs httpx: pip install httpx") from None
    return httpx


async def _bench_server(args, base_url: str, prompts, rates: List[float]) -> List[dict]:
    httpx = _httpx()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout,
                                 trust_env=_is_remote(base_url)) as client:
        model = args.served_model_name
        if model is None:
            try:
                with httpx.Client(headers=headers, timeout=30.0, trust_env=_is_remote(base_url)) as sync_client:
                    model = _server_model_name(sync_client, base_url)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                raise RuntimeError(f"cannot list the models of {base_url} ({type(exc).__name__}: {exc}); is the "
                                   "server up? --served-model-name skips this") from None
        url = base_url + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
        print(f"server: {base_url} (model {model!r}, POST {url[len(base_url):]})", flush=True)

        async def send(prompt: str, output_len: int) -> RequestResult:
            return await send_openai(client, url, args.endpoint, model, prompt, output_len)

        return await _run_rates("server", send, args, prompts, rates)


async def _bench_engine(args, engine, prompts, rates: List[float]) -> List[dict]:
    import itertools
    session_ids = itertools.count(1)

    async def send(prompt: str, output_len: int) -> RequestResult:
        return await send_engine(engine, session_ids, args.endpoint, prompt, output_len)

    return await _run_rates("engine", send, args, prompts, rates)


async def _run_rates(side: str, send, args, prompts, rates: List[float]) -> List[dict]:
    # First-request costs (allocations, kernels for new shapes) stay out of the first rate's figures, and a
    # wrong URL or model fails here, clearly.
    warm = await send(prompts[0][0], min(2, prompts[0][2]))
    if warm.success and args.num_warmups > 1:
        burst = [(text, n, min(16, out)) for text, n, out in prompts[:args.num_warmups]]
        results, _ = await run_load(send, burst, [0.0] * len(burst), args.max_concurrency)
        warm = next((r for r in results if not r.success), warm)
    if not warm.success:
        raise RuntimeError(f"a warm-up request to the {side} failed: {warm.error}")
    runs = []
    for rate in rates:
        label = rate_label(rate)
        progress = _progress(args, f"{side} rate {label}", len(prompts))
        try:
            results, duration = await run_load(send, prompts, arrival_offsets(len(prompts), rate, args.seed),
                                               args.max_concurrency, progress)
        finally:
            if progress is not None:
                progress.close()
        metrics = compute_metrics(results, duration)
        title = f"{'Serving' if side == 'server' else 'In-process engine'} Benchmark, request rate {label}"
        print(format_metrics(title, metrics), flush=True)
        errors = sorted({r.error for r in results if not r.success})
        for error in errors[:5]:
            print(f"  failed request: {error}", flush=True)
        run = {"side": side, "request_rate": label, "max_concurrency": args.max_concurrency, "metrics": metrics,
               "errors": errors}
        if args.save_detailed:
            run["requests"] = [asdict(r) for r in results]
        runs.append(run)
    return runs


def _progress(args, desc: str, total: int):
    if args.disable_tqdm:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr)


def _is_remote(base_url: str) -> bool:
    from urllib.parse import urlsplit
    return (urlsplit(base_url).hostname or "") not in ("127.0.0.1", "localhost", "::1")


def _engine_server_args(args) -> List[str]:
    out = []
    for flag, value in (("--dtype", args.dtype), ("--session-len", args.session_len),
                        ("--max-batch-size", args.max_batch_size)):
        if value is not None:
            out += [flag, str(value)]
    return out


def _open_engine(args):
    from .async_engine import AsyncEngine
    from .config import PytorchEngineConfig
    kw = {k: v for k, v in (("dtype", args.dtype), ("session_len", args.session_len),
                            ("max_batch_size", args.max_batch_size)) if v is not None}
    return AsyncEngine(args.model, backend_config=PytorchEngineConfig(**kw))


def _load_tokenizer(args):
    from .async_engine import load_tokenizer
    from .model_path import resolve_model_path
    return load_tokenizer(args.tokenizer or resolve_model_path(args.model))


def serving(args) -> None:
    try:
        rates = parse_rates(args.request_rate)
        input_len = _length_range(args.input_len, (4, 1024) if args.dataset == "sharegpt-like" else DEFAULT_INPUT_LEN,
                                  "--input-len")
        output_len = _length_range(args.output_len,
                                   (4, 1024) if args.dataset == "sharegpt-like" else DEFAULT_OUTPUT_LEN, "--output-len")
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        if args.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
        if args.base_url and args.server_args:
            raise ValueError("--server-args is for the server this command starts; it does nothing with --base-url")
        server_args = shlex.split(args.server_args)
    except ValueError as exc:
        raise SystemExit(f"lmwrap bench serving: {exc}") from None

    prompts = make_prompts(_load_tokenizer(args), args.num_prompts, input_len, output_len, args.seed, args.dataset)
    print(f"workload: {len(prompts)} prompts ({args.dataset}, prompt lengths {input_len[0]}-{input_len[1]}, "
          f"output lengths {output_len[0]}-{output_len[1]}), {sum(p[1] for p in prompts)} prompt tokens before "
          f"any template or BOS, {sum(p[2] for p in prompts)} output tokens, EOS ignored; request rates "
          f"{', '.join(rate_label(r) for r in rates)}; max concurrency {args.max_concurrency or 'unlimited'}",
          flush=True)
    try:
        if args.protocol == "triton":
            from . import bench_triton
            if args.endpoint == "chat":
                raise RuntimeError("--protocol triton sends raw prompts (--endpoint completions)")
            if args.base_url:
                runs = asyncio.run(bench_triton.bench_triton(args, args.base_url, prompts, rates))
            else:
                print("starting lmwrap serve triton ...", flush=True)
                with bench_triton.TritonServer(args.model, bench_triton.triton_server_args(args) + server_args,
                                               args.server_timeout) as server:
                    runs = asyncio.run(bench_triton.bench_triton(args, server.address, prompts, rates))
        elif args.base_url:
            runs = asyncio.run(_bench_server(args, args.base_url.rstrip("/"), prompts, rates))
        else:
            print("starting lmwrap serve api_server ...", flush=True)
            with ApiServer(args.model, _engine_server_args(args) + server_args, args.server_timeout) as server:
                runs = asyncio.run(_bench_server(args, server.base_url, prompts, rates))
        comparisons = []
        if args.compare_engine:
            print("loading the in-process engine ...", flush=True)
            engine = _open_engine(args)
            try:
                engine_runs = asyncio.run(_bench_engine(args, engine, prompts, rates))
            finally:
                engine.close()
            for server_run, engine_run in zip(runs, engine_runs):
                cmp = ttft_comparison(server_run["metrics"], engine_run["metrics"])
                print(format_comparison(server_run["request_rate"], cmp), flush=True)
                comparisons.append({"request_rate": server_run["request_rate"], "ttft": cmp})
            runs += engine_runs
    except RuntimeError as exc:
        raise SystemExit(f"lmwrap bench serving: {exc}") from None
    print(format_summary(runs), flush=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
        config.update(input_len=list(input_len), output_len=list(output_len),
                      request_rates=[rate_label(r) for r in rates])
        with open(args.json, "w") as f:
            json.dump({"config": config, "runs": runs, "ttft_comparison": comparisons}, f, indent=2)
        print(f"results written to {args.json}", flush=True)
