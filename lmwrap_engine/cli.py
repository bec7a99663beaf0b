"""The ``lmwrap`` command: chat, list, demo, bench."""
from __future__ import annotations

import argparse
import sys


def cmd_list(args) -> None:
    from .chat_template import list_chat_template_names
    print("\n".join(list_chat_template_names()))


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF folder, .gguf file or hub id in the local cache (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--chat-template", default=None, help="built-in template name (see `lmwrap list`)")
    parser.add_argument("--session-len", type=int, default=None)


def _open(args):
    from .chat_template import ChatTemplateConfig
    from .config import PytorchEngineConfig
    from .pipeline import pipeline
    template = ChatTemplateConfig(model_name=args.chat_template) if args.chat_template else None
    return pipeline(args.model, PytorchEngineConfig(dtype=args.dtype, session_len=args.session_len), template)


def cmd_chat(args) -> None:
    """Interactive chat: streams tokens, keeps the session's KV cache between turns."""
    from .config import GenerationConfig
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
    b = bsub.add_parser("kernels", help="Triton kernel micro-benchmarks (needs a GPU)")
    try:
        from . import bench_kernels
        bench_kernels.add_arguments(b)
        b.set_defaults(func=bench_kernels.run)
    except ImportError:
        b.set_defaults(func=lambda a: print("kernel benchmarks are not available in this install"))
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
