"""The ``lmwrap`` command: chat, list, demo, serve, bench."""
from __future__ import annotations

import argparse
import sys


def cmd_list(args) -> None:
    from .chat_template import list_chat_template_names
    print("\n".join(list_chat_template_names()))


WEIGHT_QUANT_HELP = ("int8: linear weights (LM head included) as per-channel int8 for decode at small batch, "
                     "CPU only; prefill and larger batches use a dense copy of the dequantised weights")


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF folder, .gguf file or hub id in the local cache (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights and KV cache dtype (auto: on CPU bf16 where the CPU has AVX-512 BF16 or AMX, else float32; on CUDA the model's own)")
    parser.add_argument("--weight-quant", default=None, choices=["int8"], help=WEIGHT_QUANT_HELP)
    parser.add_argument("--chat-template", default=None, help="built-in template name (see `lmwrap list`)")
    parser.add_argument("--session-len", type=int, default=None,
                        help="most tokens one session may hold (default, and at most: the model's context length)")


def _open(args):
    from .chat_template import ChatTemplateConfig
    from .config import PytorchEngineConfig
    from .pipeline import pipeline
    template = ChatTemplateConfig(model_name=args.chat_template) if args.chat_template else None
    return pipeline(args.model, PytorchEngineConfig(dtype=args.dtype, session_len=args.session_len,
                                                   weight_quant=args.weight_quant), template)


def cmd_chat(args) -> None:
    """Interactive chat: streams tokens, keeps the session's KV cache between turns."""
    import signal

    from .config import GenerationConfig
    # Ctrl-C stops a reply even where the launcher ignored SIGINT (a non-interactive shell's background
    # job does, and Python then installs no KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("loading model ...", file=sys.stderr, flush=True)
    pipe = _open(args)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature, top_p=args.top_p)
    session = None
    print("Type a message; /reset starts a new conversation; Ctrl-D or /exit quits; "
          "Ctrl-C stops a reply.", file=sys.stderr)
    try:
        while True:
            try:
                prompt = input("\n>>> ")
            except EOFError:
                print()
                break
            if prompt.strip() in ("/exit", "/quit"):
                break
            if prompt.strip() == "/reset":
                if session is not None:
                    session.close()
                session = None
                continue
            if not prompt.strip():
                continue
            if session is None:
                from .pipeline import Session
                session = Session(pipe)
            stream = pipe.chat(prompt, session=session, gen_config=gen, stream_response=True)
            try:
                for delta in stream:
                    print(delta.text, end="", flush=True)
                    if delta.finish_reason == "error":
                        print(f"\n[error] {delta.text}", file=sys.stderr)
            except KeyboardInterrupt:
                stream.close()  # cancels the turn; the conversation so far is kept
                print("\n[stopped]", file=sys.stderr)
            if session._step >= pipe.session_len - 1:
                print("\n[session is full; starting a new one]", file=sys.stderr)
                session.close()
                session = None
    except KeyboardInterrupt:
        print()
    finally:
        pipe.close()


def cmd_demo(args) -> None:
    from .demo import main
    main(args.model)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535] (0: any free port), got {value}")
    return value


def _api_server_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p)
    p.add_argument("--server-name", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--server-port", type=_port, default=23333, help="port to listen on (default 23333)")
    p.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                   help="accept only requests with `Authorization: Bearer KEY` (several keys, or comma-separated); "
                        "/health and /metrics stay open")
    p.add_argument("--backend", choices=["pytorch", "turbomind"], default="turbomind",
                   help="both names select lmwrap's engine (kept for lmdeploy's command lines)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send in `model` (default: MODEL as given)")
    p.add_argument("--max-batch-size", type=_positive_int, default=None, help="most requests running at once")
    p.add_argument("--cache-max-entry-count", type=float, default=0.8,
                   help="fraction of free device memory the KV cache takes (default 0.8)")
    p.add_argument("--cache-block-seq-len", type=_positive_int, default=64,
                   help="tokens per KV cache block (a power of two; default 64)")
    p.add_argument("--num-gpu-blocks", type=int, default=0,
                   help="KV cache blocks to allocate (0: from --cache-max-entry-count)")
    p.add_argument("--max-prefill-token-num", type=_positive_int, default=4096,
                   help="most prompt tokens prefilled in one engine step")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes seen before (default: on, unlike lmdeploy; "
                        "--no-enable-prefix-caching turns it off)")
    p.add_argument("--max-sessions", type=_positive_int, default=1024,
                   help="most interactive sessions kept in the engine; past it the oldest idle one is ended")
    p.add_argument("--session-idle-timeout", type=float, default=1800.0,
                   help="seconds after which an idle interactive session is ended (0: never; default 1800)")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor parallelism: ranks (worker processes, one device each) the model is split over")
    p.add_argument("--dp", type=_positive_int, default=1,
                   help="data parallelism: engine replicas (each with --tp ranks) behind this one endpoint")
    p.add_argument("--distributed-executor", choices=["mp", "ray"], default="mp",
                   help="how tp > 1 ranks run: 'mp' worker processes on this machine (default), 'ray' actors "
                        "on the running Ray cluster (RAY_ADDRESS)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (auto: CUDA when present)")
    p.add_argument("--disable-vision-encoder", action="store_true",
                   help="serve a vision-language model as its text model only (no images)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="log level of the server and the engine")
    p.add_argument("--max-log-len", type=int, default=None,
                   help="log prompts at INFO level, cut to this many characters")
    p.add_argument("--disable-fastapi-docs", action="store_true",
                   help="do not serve the OpenAPI docs (/docs, /openapi.json)")
    p.add_argument("--allow-origins", nargs="+", default=["*"], help="CORS allowed origins")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--allow-methods", nargs="+", default=["*"], help="CORS allowed methods")
    p.add_argument("--allow-headers", nargs="+", default=["*"], help="CORS allowed headers")
    p.add_argument("--tool-call-parser", choices=["auto", "internlm2", "hermes", "llama3"], default="auto",
                   help="format of tool calls in replies to requests with tools (auto: the chat template's)")
    p.add_argument("--max-request-bytes", type=_positive_int, default=8 << 20,
                   help="larger request bodies get 413 before they are parsed (default 8 MiB)")


def cmd_api_server(args) -> None:
    """Serve MODEL over lmdeploy's OpenAI-compatible HTTP API until SIGTERM/SIGINT."""
    from .chat_template import ChatTemplateConfig
    from .config import PytorchEngineConfig, TurbomindEngineConfig
    from .serve.openai.api_server import serve

    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device (use --device auto or cpu)")
    common = dict(dtype=args.dtype, session_len=args.session_len, cache_max_entry_count=args.cache_max_entry_count,
                  num_gpu_blocks=args.num_gpu_blocks, max_prefill_token_num=args.max_prefill_token_num,
                  enable_prefix_caching=args.enable_prefix_caching, device_type=args.device,
                  max_sessions=args.max_sessions, session_idle_timeout=args.session_idle_timeout or None,
                  disable_vision_encoder=args.disable_vision_encoder,
                  tp=args.tp, distributed_executor_backend=args.distributed_executor,
                  weight_quant=args.weight_quant)
    if args.backend == "pytorch":
        config = PytorchEngineConfig(block_size=args.cache_block_seq_len, max_batch_size=args.max_batch_size,
                                     **common)
    else:
        config = TurbomindEngineConfig(cache_block_seq_len=args.cache_block_seq_len,
                                       max_batch_size=args.max_batch_size or 128, **common)
    template = ChatTemplateConfig(model_name=args.chat_template) if args.chat_template else None
    keys = [k for group in args.api_keys or [] for k in group.split(",") if k.strip()] or None
    serve(args.model, model_name=args.model_name, backend=args.backend, backend_config=config,
          chat_template_config=template, server_name=args.server_name, server_port=args.server_port,
          allow_origins=args.allow_origins, allow_credentials=args.allow_credentials,
          allow_methods=args.allow_methods, allow_headers=args.allow_headers, log_level=args.log_level,
          api_keys=keys, max_log_len=args.max_log_len, disable_fastapi_docs=args.disable_fastapi_docs,
          max_request_bytes=args.max_request_bytes, tool_call_parser=args.tool_call_parser, dp=args.dp)


def build_parser() -> argparse.ArgumentParser:
    from . import bench
    parser = argparse.ArgumentParser(prog="lmwrap", description="lmwrap: agent adapters and inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive terminal chat with a model")
    _engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("list", help="list built-in chat template names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("demo", help="the main job on the default model")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="servers over the engine")
    ssub = p.add_subparsers(dest="server", required=True)
    p = ssub.add_parser("api_server", help="lmdeploy's OpenAI-compatible HTTP API server",
                        description=cmd_api_server.__doc__)
    _api_server_args(p)
    p.set_defaults(func=cmd_api_server)
    from .serve.triton import host as triton_host
    p = ssub.add_parser("triton", help="our engine inside a real Triton Inference Server (gRPC)",
                        description=triton_host.serve.__doc__)
    triton_host.add_arguments(p)
    p.set_defaults(func=triton_host.cmd_triton)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("throughput", help="offline throughput vs transformers (fixed workload)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.throughput)
    b = bsub.add_parser("latency", help="batch-1 time to first token and decode speed vs transformers")
    bench.add_latency_arguments(b)
    b.set_defaults(func=bench.latency)
    b = bsub.add_parser("coldstart", help="process start to first token")
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--runs", type=int, default=3)
    b.set_defaults(func=bench.coldstart)
    from . import bench_serving
    b = bsub.add_parser("serving", help="online serving: Poisson arrivals against an OpenAI-compatible server",
                        description=bench_serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_serving.add_arguments(b)
    b.set_defaults(func=bench_serving.serving)
    from . import bench_agents
    b = bsub.add_parser("agents", help="K concurrent agents x T turns re-sending their histories, vs transformers",
                        description=bench_agents.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_agents.add_arguments(b)
    b.set_defaults(func=bench_agents.agents)
    b = bsub.add_parser("kernels", help="Triton kernel micro-benchmarks (needs a GPU)")
    try:
        from . import bench_kernels
        bench_kernels.add_arguments(b)
        b.set_defaults(func=bench_kernels.run)
    except ImportError:
        b.set_defaults(func=lambda a: print("kernel benchmarks are not available in this install"))
    return parser


def main(argv=None) -> None:
    """Runs a command; a user mistake (bad path, value or port) is one line on stderr and exit code 1
    (``LMWRAP_DEBUG=1`` shows the traceback)."""
    import os

    from .model_path import ModelNotFoundError
    name = "lmwrap"
    try:
        args = build_parser().parse_args(argv)
        name = " ".join(["lmwrap"] + [str(part) for part in (args.command, getattr(args, "server", None),
                                                              getattr(args, "bench", None)) if part])
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except ModuleNotFoundError as exc:
        if os.environ.get("LMWRAP_DEBUG") or exc.name not in _ENGINE_DEPENDENCIES:
            raise
        print(f"{name}: error: the engine is not installed ({exc.name} is missing): "
              "pip install 'lmwrap[server]' (or 'lmwrap[engine]')", file=sys.stderr)
        sys.exit(1)
    except (ModelNotFoundError, ValueError, TypeError, NotImplementedError, OSError) as exc:
        if os.environ.get("LMWRAP_DEBUG"):
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)


# What a thin client install (`pip install lmwrap`) lacks; the extras `engine` / `server` bring them.
_ENGINE_DEPENDENCIES = {"torch", "transformers", "tokenizers", "safetensors", "gguf", "jinja2", "numpy", "tqdm",
                        "fastapi", "uvicorn", "prometheus_client", "httpx"}


if __name__ == "__main__":
    main()
