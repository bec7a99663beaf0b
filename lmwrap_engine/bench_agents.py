"""``lmwrap bench agents``: what tool-using agents ask of an engine: K concurrent agents x T turns,
each turn re-sending the agent's whole history.

Workload (seeded; token ids from the plain vocabulary, no chat template, so any model works): all
agents share one ``--system-len`` system prompt (the stand-in for a tool-description prompt) and each
has its own ``--user-len`` question. Turn t (0-based) of an agent sends

    system + question + reply_1 + observation_1 + ... + reply_t + observation_t

that is ``system_len + user_len + t * (reply_len + observation_len)`` tokens, as a one-off request
(no session), the way lagent's ``ReAct`` and ``Internlm2Agent`` rebuild and send the conversation on
every turn. The reply is generated greedily with ``ignore_eos`` to exactly ``--reply-len`` tokens and
enters the history as generated; then a fresh seeded ``--observation-len`` tool observation is
appended. The K agents run concurrently; each sends its next turn as soon as its reply is done (no
tool latency).

Sides, one after another in one process:

- ``lmwrap``: the in-process engine (``pipeline(...)``, async ``generate`` with ``input_ids``),
  prefix caching as ``--enable-prefix-caching`` / ``--no-enable-prefix-caching`` say (default: the
  engine's default); ``--compare-cache`` runs it twice, cache off then on. Prompt tokens computed
  and prefix-cache lookups / hits are the differences of ``pipe.stats()`` over the run.
- ``--base-url URL``: instead of the in-process engine, an OpenAI-compatible server (e.g.
  ``lmwrap serve api_server``), each turn a streaming ``POST /v1/completions`` as lagent's
  ``LMDeployClient`` sends it, with the prompt as token ids (the API's list-of-ints form, which our
  server and vLLM accept). The reply enters the history as its streamed text re-encoded, trimmed or
  padded (seeded plain-vocabulary ids) to ``--reply-len`` so lengths stay exact. Tokens computed and
  prefix hits come from the server's ``/metrics`` counters when it has them (anything else the server
  runs meanwhile counts too).
- ``transformers`` (unless ``--no-hf``): the same model, dtype and device, no reuse: the whole
  history is prefilled every turn. The agents run batched in lock step: turn t of all K agents is one
  ``generate`` call (their prompts have the same length, so no padding), greedy, exactly
  ``--reply-len`` new tokens; a turn's TTFT (the time to its first token) is the same for all its
  agents.
- llama.cpp, when ``llama_cpp`` (llama-cpp-python) is importable and the model is a ``.gguf`` file
  (or the default model, whose GGUF it runs as is, quantized): one sequence at a time, agent after
  agent, each turn reusing the longest common prefix with what its context holds (its prompt cache).
  Otherwise skipped with a note.

Reports per side: wall time, requests, prompt tokens sent vs computed, prefix-cache hit rate
(hit tokens / looked-up tokens), TTFT mean and per turn index (p50 / p90, over the agents), and with
``--json PATH`` all of it plus every request. Figures are reported, never asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, List, Optional, Sequence, Tuple

from .bench_serving import percentile

ENGINE_COUNTERS = ("num_requests", "num_prompt_tokens_computed", "num_generated_tokens_computed",
                   "num_prefix_hit_tokens", "num_prefix_query_tokens", "num_preemptions")
# engine stats key -> the api_server's /metrics counter (see serve/openai/metrics.py)
METRICS_COUNTERS = {"num_prompt_tokens_computed": "lmwrap_engine_prompt_tokens_computed",
                    "num_prefix_hit_tokens": "lmwrap_prefix_cache_hit_tokens",
                    "num_prefix_query_tokens": "lmwrap_prefix_cache_query_tokens"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF folder, .gguf or hub id in the local cache (default model when omitted); "
                             "with --base-url it supplies the tokenizer and the transformers twin")
    w = parser.add_argument_group("workload")
    w.add_argument("--agents", type=int, default=4, metavar="K", help="concurrent agents (default: %(default)s)")
    w.add_argument("--turns", type=int, default=6, metavar="T", help="turns per agent (default: %(default)s)")
    w.add_argument("--system-len", type=int, default=400, metavar="N",
                   help="tokens of the system prompt all agents share (default: %(default)s)")
    w.add_argument("--user-len", type=int, default=20, metavar="N",
                   help="tokens of each agent's own question (default: %(default)s)")
    w.add_argument("--reply-len", type=int, default=32, metavar="N",
                   help="tokens generated per turn, EOS ignored (default: %(default)s)")
    w.add_argument("--observation-len", type=int, default=60, metavar="N",
                   help="tokens of the tool observation appended after each reply (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0)

    e = parser.add_argument_group("engine")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="our engine's and transformers' dtype (with --base-url: transformers', auto = float32)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix caching in the in-process engine (default: the engine's default)")
    e.add_argument("--compare-cache", action="store_true",
                   help="run the in-process engine twice, prefix caching off then on, side by side")
    e.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="KV cache block size in tokens (default: the engine's)")
    e.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="most requests running at once (default: the engine's)")

    s = parser.add_argument_group("server")
    s.add_argument("--base-url", default=None, metavar="URL",
                   help="an OpenAI-compatible server already running (e.g. `lmwrap serve api_server`) "
                        "instead of the in-process engine")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the `model` field of the requests (default: the first id of GET /v1/models)")
    s.add_argument("--api-key", default=None, metavar="KEY", help="sent as `Authorization: Bearer KEY`")
    s.add_argument("--request-timeout", type=float, default=3600.0, metavar="S",
                   help="seconds before one request fails (default: %(default)s)")

    o = parser.add_argument_group("baselines and output")
    o.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    o.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when llama-cpp-python is installed")
    o.add_argument("--json", default=None, metavar="PATH", help="write the config and results as JSON")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


# -- workload --------------------------------------------------------------------------------------

@dataclass
class AgentWorkload:
    """The fixed parts of K agents' conversations; the replies come from the model as it runs."""

    system: List[int]                     # shared by every agent
    questions: List[List[int]]            # per agent
    observations: List[List[List[int]]]   # [agent][t]: appended after turn t's reply (turns - 1 per agent)
    turns: int
    reply_len: int

    @property
    def agents(self) -> int:
        return len(self.questions)

    @property
    def observation_len(self) -> int:
        return len(self.observations[0][0]) if self.turns > 1 else 0

    def prompt(self, agent: int, replies: Sequence[Sequence[int]]) -> List[int]:
        """The prompt of turn ``len(replies)`` of ``agent``: its whole history so far."""
        if len(replies) >= self.turns:
            raise ValueError(f"agent {agent} has {self.turns} turns; got {len(replies)} replies already")
        ids = self.system + self.questions[agent]
        for t, reply in enumerate(replies):
            if len(reply) != self.reply_len:
                raise ValueError(f"reply {t} of agent {agent} has {len(reply)} tokens, not {self.reply_len}")
            ids = ids + list(reply) + self.observations[agent][t]
        return ids

    def prompt_len(self, turn: int) -> int:
        return len(self.system) + len(self.questions[0]) + turn * (self.reply_len + self.observation_len)

    def prompt_tokens_sent(self) -> int:
        """Prompt tokens of every request of the run (exact: replies are always ``reply_len`` long)."""
        return self.agents * sum(self.prompt_len(t) for t in range(self.turns))

    def longest_sequence(self) -> int:
        return self.prompt_len(self.turns - 1) + self.reply_len


def make_agent_workload(vocab_ids: Sequence[int], agents: int, turns: int, system_len: int, user_len: int,
                        reply_len: int, observation_len: int, seed: int) -> AgentWorkload:
    """Seeded random ids from ``vocab_ids`` for the shared system prompt, the questions and the observations."""
    for name, value, least in (("agents", agents, 1), ("turns", turns, 1), ("system_len", system_len, 0),
                               ("user_len", user_len, 0), ("reply_len", reply_len, 1),
                               ("observation_len", observation_len, 0)):
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if system_len + user_len < 1:
        raise ValueError("--system-len plus --user-len must be >= 1 (the first turn needs a prompt)")
    rng = random.Random(seed)

    def ids(n: int) -> List[int]:
        return [rng.choice(vocab_ids) for _ in range(n)]

    system = ids(system_len)
    questions = [ids(user_len) for _ in range(agents)]
    observations = [[ids(observation_len) for _ in range(turns - 1)] for _ in range(agents)]
    return AgentWorkload(system, questions, observations, turns, reply_len)


# -- running agents --------------------------------------------------------------------------------

# send(prompt_ids) -> (seconds to the first token, the reply's token ids)
Send = Callable[[List[int]], Awaitable[Tuple[float, List[int]]]]


async def run_agents(send: Send, workload: AgentWorkload, progress=None) -> Tuple[List[dict], float]:
    """All agents concurrently, each turn after the last; returns one record per request and the wall time."""
    async def agent(a: int) -> List[dict]:
        replies, records = [], []
        for t in range(workload.turns):
            ids = workload.prompt(a, replies)
            start = time.perf_counter()
            ttft, reply = await send(ids)
            records.append(_turn_record(a, t, ids, ttft, time.perf_counter() - start, reply))
            replies.append(reply)
            if progress is not None:
                progress.update(1)
        return records

    start = time.perf_counter()
    per_agent = await asyncio.gather(*(agent(a) for a in range(workload.agents)))
    return [r for records in per_agent for r in records], time.perf_counter() - start


def engine_sender(pipe, reply_len: int) -> Send:
    from .config import GenerationConfig
    gen = GenerationConfig(max_new_tokens=reply_len, ignore_eos=True, do_sample=False)

    async def send(ids: List[int]) -> Tuple[float, List[int]]:
        ttft, reply = None, []
        start = time.perf_counter()
        async for out in pipe.generate(None, None, gen_config=gen, input_ids=ids):
            if ttft is None:
                ttft = time.perf_counter() - start
            reply += out.token_ids or []
            if out.finish_reason in ("error", "abort"):
                raise RuntimeError(f"a request finished with {out.finish_reason!r}: {out.response}")
        if len(reply) != reply_len:
            raise RuntimeError(f"a reply has {len(reply)} tokens, not {reply_len} (ignore_eos)")
        return ttft, reply
    return send


def _stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ENGINE_COUNTERS if k in before and k in after}


def _open_engine(args, enable_prefix_caching: Optional[bool]):
    from .config import PytorchEngineConfig
    from .pipeline import pipeline
    kw = {"dtype": args.dtype}
    for key, value in (("enable_prefix_caching", enable_prefix_caching), ("block_size", args.block_size),
                       ("max_batch_size", args.max_batch_size)):
        if value is not None:
            kw[key] = value
    return pipeline(args.model, PytorchEngineConfig(**kw))


async def _engine_run(pipe, workload: AgentWorkload, progress) -> Tuple[List[dict], float, dict]:
    from .config import GenerationConfig
    warm = [workload.system[-1] if workload.system else workload.questions[0][0]] * 4
    async for _ in pipe.generate(None, None, gen_config=GenerationConfig(max_new_tokens=2, ignore_eos=True),
                                 input_ids=warm):
        pass
    before = await pipe.astats()
    records, wall = await run_agents(engine_sender(pipe, workload.reply_len), workload, progress)
    return records, wall, _stats_delta(before, await pipe.astats())


def run_engine_side(args, workload: AgentWorkload, enable_prefix_caching: Optional[bool]) -> dict:
    pipe = _open_engine(args, enable_prefix_caching)
    try:
        if workload.longest_sequence() > pipe.session_len:
            raise ValueError(f"the last turn reaches {workload.longest_sequence()} tokens, more than the "
                             f"model's session_len {pipe.session_len}; shorten the workload")
        cache = bool(getattr(pipe.engine_config, "enable_prefix_caching", enable_prefix_caching))
        side = f"lmwrap, cache {'on' if cache else 'off'}"
        progress = _progress(args, side, workload)
        try:
            records, wall, stats = asyncio.run(_engine_run(pipe, workload, progress))
        finally:
            if progress is not None:
                progress.close()
        info = {"device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
                "block_size": pipe.block_size, "model_dir": pipe.model_dir}
    finally:
        pipe.close()
    return _side(side, records, wall, workload, stats, enable_prefix_caching=cache, **info)


# -- through an OpenAI-compatible server -----------------------------------------------------------

def _fit(ids: List[int], n: int, vocab: Sequence[int], rng: random.Random) -> List[int]:
    return ids[:n] + [rng.choice(vocab) for _ in range(n - len(ids))]


def _parse_metrics(text: str) -> dict:
    """Unlabelled samples of a Prometheus text page as ``{name: value}``."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        parts = line.split()
        if len(parts) >= 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


async def _scrape(client, base_url: str) -> Optional[dict]:
    """The engine counters of the server's ``/metrics`` (None when it has none)."""
    try:
        resp = await client.get(base_url + "/metrics")
    except Exception:
        return None
    if resp.status_code != 200:
        return None
    samples = _parse_metrics(resp.text)
    out = {}
    for key, name in METRICS_COUNTERS.items():
        value = samples.get(name + "_total", samples.get(name))
        if value is not None:
            out[key] = int(value)
    return out or None


def server_sender(client, url: str, model: str, tokenizer, vocab: Sequence[int], reply_len: int,
                  seed: int, usage: List[int]) -> Send:
    from .bench_serving import _request_body, sse_payloads
    rng = random.Random(seed + 2)

    async def send(ids: List[int]) -> Tuple[float, List[int]]:
        body = _request_body("completions", model, ids, reply_len)
        ttft, pieces, finish = None, [], None
        start = time.perf_counter()
        try:
            async for now, data in sse_payloads(client, url, body):
                if data.get("choices"):
                    if ttft is None:
                        ttft = now - start
                    pieces.append(data["choices"][0].get("text") or "")
                    finish = data["choices"][0].get("finish_reason") or finish
                if data.get("usage"):
                    usage[0] += data["usage"].get("prompt_tokens") or 0
                    usage[1] += data["usage"].get("completion_tokens") or 0
        except RuntimeError as exc:
            raise RuntimeError(f"POST {url}: {exc}") from None
        if finish in ("error", "abort") or ttft is None:
            raise RuntimeError(f"POST {url}: the reply ended with finish_reason {finish!r}")
        return ttft, _fit(tokenizer.encode("".join(pieces), add_special_tokens=False), reply_len, vocab, rng)
    return send


async def _server_run(args, base_url: str, tokenizer, vocab, workload: AgentWorkload) -> dict:
    from .bench_serving import _httpx, _is_remote, _server_model_name
    httpx = _httpx()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    remote = _is_remote(base_url)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=remote,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        model = args.served_model_name
        if model is None:
            try:
                with httpx.Client(headers=headers, timeout=30.0, trust_env=remote) as sync_client:
                    model = _server_model_name(sync_client, base_url)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                raise RuntimeError(f"cannot list the models of {base_url} ({type(exc).__name__}: {exc}); is the "
                                   "server up? --served-model-name skips this") from None
        url = base_url + "/v1/completions"
        print(f"server: {base_url} (model {model!r}, POST /v1/completions, token-id prompts)", flush=True)
        usage = [0, 0]
        send = server_sender(client, url, model, tokenizer, vocab, workload.reply_len, args.seed, usage)
        await send([workload.system[-1] if workload.system else workload.questions[0][0]] * 4)  # warm-up
        usage[:] = [0, 0]
        before = await _scrape(client, base_url)
        progress = _progress(args, "server", workload)
        try:
            records, wall = await run_agents(send, workload, progress)
        finally:
            if progress is not None:
                progress.close()
        after = await _scrape(client, base_url)
    stats = _stats_delta(before, after) if before and after else {}
    return _side("server", records, wall, workload, stats, base_url=base_url, usage_prompt_tokens=usage[0],
                 usage_completion_tokens=usage[1])


# -- baselines -------------------------------------------------------------------------------------

def run_transformers_agents(model, workload: AgentWorkload, progress=None) -> Tuple[List[dict], float]:
    """Lock step, batched: turn t of every agent is one ``generate`` over the whole histories (no reuse)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from .bench import _synchronize

    class FirstToken(BaseStreamer):
        """``generate`` puts the prompt first, then each step's new tokens."""

        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    device = model.device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    n = workload.reply_len

    def generate(batch: List[List[int]], streamer=None):
        x = torch.tensor(batch, device=device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad, streamer=streamer)
        return out[:, x.shape[1]:].tolist()

    generate([workload.prompt(0, [])[:4]])  # warm-up
    _synchronize(device)
    replies: List[List[List[int]]] = [[] for _ in range(workload.agents)]
    records = []
    start = time.perf_counter()
    for t in range(workload.turns):
        prompts = [workload.prompt(a, replies[a]) for a in range(workload.agents)]
        streamer = FirstToken()
        turn_start = time.perf_counter()
        outs = generate(prompts, streamer)
        _synchronize(device)
        end = time.perf_counter()
        for a, reply in enumerate(outs):
            replies[a].append(reply)
            records.append({"agent": a, "turn": t + 1, "prompt_tokens": len(prompts[a]),
                            "ttft_s": (streamer.first or end) - turn_start, "latency_s": end - turn_start,
                            "reply_tokens": len(reply), "reply": reply})
        if progress is not None:
            progress.update(workload.agents)
    return records, time.perf_counter() - start


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_llama_cpp_agents(gguf_path: str, workload: AgentWorkload, threads: int, progress=None):
    """One sequence at a time, agent after agent; ``Llama.generate`` reuses the longest common prefix with
    the tokens its context holds (never the prompt's last token). Returns records, wall, tokens computed."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf_path, n_ctx=workload.longest_sequence() + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    for _ in llm.generate(workload.prompt(0, [])[:4], top_k=1, temp=0.0, repeat_penalty=1.0):
        break  # warm-up
    records, computed = [], 0
    start = time.perf_counter()
    for a in range(workload.agents):
        replies: List[List[int]] = []
        for t in range(workload.turns):
            ids = workload.prompt(a, replies)
            held = list(llm.input_ids[:llm.n_tokens])
            computed += len(ids) - min(_common_prefix(held, ids), len(ids) - 1)
            reply, ttft = [], None
            turn_start = time.perf_counter()
            for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if ttft is None:
                    ttft = time.perf_counter() - turn_start
                reply.append(int(token))
                if len(reply) == workload.reply_len:
                    break
            records.append(_turn_record(a, t, ids, ttft, time.perf_counter() - turn_start, reply))
            replies.append(reply)
            if progress is not None:
                progress.update(1)
    return records, time.perf_counter() - start, computed


def _turn_record(agent: int, turn: int, ids: List[int], ttft: float, latency: float, reply: List[int]) -> dict:
    """One agent turn's result (``turn`` 0-based here, 1-based in the record)."""
    return {"agent": agent, "turn": turn + 1, "prompt_tokens": len(ids), "ttft_s": ttft, "latency_s": latency,
            "reply_tokens": len(reply), "reply": reply}


def _llama_cpp_gguf(model: Optional[str]) -> Tuple[Optional[str], str]:
    """(the .gguf to run, or None and why not)."""
    from .model_path import DEFAULT_MODEL_ALIASES, default_gguf_path
    if model is None or (model.strip().lower() in DEFAULT_MODEL_ALIASES and not os.path.exists(model)):
        return default_gguf_path(), ""
    if model.lower().endswith(".gguf") and os.path.isfile(model):
        return model, ""
    return None, "llama.cpp needs a .gguf model; pass one to compare with it"


# -- reporting -------------------------------------------------------------------------------------

def _side(name: str, records: List[dict], wall: float, workload: AgentWorkload, stats: dict, **extra) -> dict:
    sent = sum(r["prompt_tokens"] for r in records)
    computed = stats.get("num_prompt_tokens_computed")
    hits, queried = stats.get("num_prefix_hit_tokens"), stats.get("num_prefix_query_tokens")
    ttfts = [r["ttft_s"] for r in records]
    by_turn = []
    for t in range(1, workload.turns + 1):
        xs = [r["ttft_s"] * 1e3 for r in records if r["turn"] == t]
        by_turn.append({"turn": t, "mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90)})
    return {"side": name, "wall_s": wall, "requests": len(records), "prompt_tokens_sent": sent,
            "prompt_tokens_computed": computed, "generated_tokens": sum(r["reply_tokens"] for r in records),
            "prefix_hit_tokens": hits, "prefix_query_tokens": queried,
            "prefix_hit_rate": hits / queried if hits is not None and queried else None,
            "engine_stats": stats,
            "ttft_ms": {"mean": sum(ttfts) / len(ttfts) * 1e3, "p50": percentile(ttfts, 50) * 1e3,
                        "p90": percentile(ttfts, 90) * 1e3},
            "ttft_by_turn_ms": by_turn, **extra, "records": records}


def _num(x, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_report(sides: Sequence[dict]) -> str:
    head = (f"{'side':<22}{'wall s':>9}{'requests':>10}{'prompt sent':>13}{'computed':>10}{'hit rate':>10}"
            f"{'TTFT mean':>11}{'first turn':>12}{'last turn':>11}")
    lines = [head, "-" * len(head)]
    for s in sides:
        rate = "n/a" if s["prefix_hit_rate"] is None else f"{s['prefix_hit_rate']:.1%}"
        lines.append(f"{s['side']:<22}{s['wall_s']:>9.2f}{s['requests']:>10}{_num(s['prompt_tokens_sent']):>13}"
                     f"{_num(s['prompt_tokens_computed']):>10}{rate:>10}{s['ttft_ms']['mean']:>11.1f}"
                     f"{s['ttft_by_turn_ms'][0]['p50']:>12.1f}{s['ttft_by_turn_ms'][-1]['p50']:>11.1f}")
    lines.append("(TTFT in ms; first / last turn: p50 over the agents)")
    lines.append("")
    lines.append("TTFT by turn, ms (p50 / p90 over the agents)")
    lines.append(f"{'turn':<6}" + "".join(f"{s['side']:>24}" for s in sides))
    for t in range(len(sides[0]["ttft_by_turn_ms"])):
        cells = [f"{s['ttft_by_turn_ms'][t]['p50']:.1f} / {s['ttft_by_turn_ms'][t]['p90']:.1f}" for s in sides]
        lines.append(f"{t + 1:<6}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _progress(args, desc: str, workload: AgentWorkload):
    if args.disable_tqdm:
        return None
    from tqdm import tqdm
    return tqdm(total=workload.agents * workload.turns, desc=desc, unit="req", file=sys.stderr)


def _transformers_side(args, model_dir: str, dtype, device, workload: AgentWorkload) -> dict:
    from .bench import _free_device_memory, load_transformers_model
    model = load_transformers_model(model_dir, dtype, device)
    progress = _progress(args, "transformers", workload)
    try:
        records, wall = run_transformers_agents(model, workload, progress)
    finally:
        if progress is not None:
            progress.close()
    del model
    _free_device_memory(device)
    sent = sum(r["prompt_tokens"] for r in records)
    return _side("transformers", records, wall, workload, {"num_prompt_tokens_computed": sent},
                 batching="lock step: one generate per turn over all agents, whole histories")


def agents(args) -> None:
    try:
        if args.compare_cache and args.enable_prefix_caching is not None:
            raise ValueError("--compare-cache runs with the cache off and on; drop --enable-prefix-caching")
        if args.base_url and (args.compare_cache or args.enable_prefix_caching is not None
                              or args.block_size is not None or args.max_batch_size is not None):
            raise ValueError("--compare-cache, --[no-]enable-prefix-caching, --block-size and --max-batch-size "
                             "configure the in-process engine; with --base-url start the server with them")
    except ValueError as exc:
        raise SystemExit(f"lmwrap bench agents: {exc}") from None
    from .async_engine import load_tokenizer
    from .bench import _plain_vocab
    from .model_path import resolve_model_path
    model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir)
    vocab = _plain_vocab(tokenizer)
    try:
        workload = make_agent_workload(vocab, args.agents, args.turns, args.system_len, args.user_len,
                                       args.reply_len, args.observation_len, args.seed)
    except ValueError as exc:
        raise SystemExit(f"lmwrap bench agents: {exc}") from None
    print(f"workload: {workload.agents} agents x {workload.turns} turns, shared {len(workload.system)}-token "
          f"system prompt, {args.user_len}-token questions, {workload.reply_len}-token replies (EOS ignored), "
          f"{args.observation_len}-token observations; the whole history re-sent each turn: "
          f"{workload.prompt_tokens_sent():,} prompt tokens in {workload.agents * workload.turns} requests",
          flush=True)
    sides, notes = [], []

    def add(side: dict) -> None:
        sides.append(side)
        print(f"{side['side']}: done in {side['wall_s']:.2f} s, prompt tokens computed "
              f"{_num(side['prompt_tokens_computed'])} of {side['prompt_tokens_sent']:,}, "
              f"mean TTFT {side['ttft_ms']['mean']:.1f} ms", flush=True)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.float32, "float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[args.dtype]
    try:
        if args.base_url:
            add(asyncio.run(_server_run(args, args.base_url.rstrip("/"), tokenizer, vocab, workload)))
        else:
            for cache in ((False, True) if args.compare_cache else (args.enable_prefix_caching,)):
                side = run_engine_side(args, workload, cache)
                add(side)
                device, dtype = side["device"], getattr(torch, side["dtype"])
            print(f"model: {model_dir}; dtype {sides[0]['dtype']}, device {sides[0]['device']}, "
                  f"block size {sides[0]['block_size']}, {torch.get_num_threads()} torch threads", flush=True)
        if not args.no_hf:
            add(_transformers_side(args, model_dir, dtype, device, workload))
        if not args.no_llama_cpp:
            if importlib.util.find_spec("llama_cpp") is None:
                notes.append("llama.cpp: skipped (llama-cpp-python is not installed)")
            else:
                gguf, why = _llama_cpp_gguf(args.model)
                if gguf is None:
                    notes.append(f"llama.cpp: skipped ({why})")
                else:
                    progress = _progress(args, "llama.cpp", workload)
                    try:
                        records, wall, computed = run_llama_cpp_agents(gguf, workload, torch.get_num_threads(),
                                                                       progress)
                    finally:
                        if progress is not None:
                            progress.close()
                    add(_side("llama.cpp", records, wall, workload,
                                       {"num_prompt_tokens_computed": computed}, gguf=gguf,
                                       batching="one sequence at a time, agent after agent"))
    except RuntimeError as exc:
        raise SystemExit(f"lmwrap bench agents: {exc}") from None
    print(format_report(sides), flush=True)
    ours = [s for s in sides if s["side"].startswith(("lmwrap", "server"))]
    hf = next((s for s in sides if s["side"] == "transformers"), None)
    if hf and ours:
        print("wall time vs transformers: " + ", ".join(f"{s['side']} {hf['wall_s'] / s['wall_s']:.2f}x"
                                                        for s in ours), flush=True)
    for note in notes:
        print(note, flush=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key") and not callable(v)}
        config["prompt_tokens_sent"] = workload.prompt_tokens_sent()
        with open(args.json, "w") as f:
            json.dump({"config": config, "sides": sides, "notes": notes}, f, indent=2)
        print(f"results written to {args.json}", flush=True)
