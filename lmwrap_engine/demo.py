"""``make demo``: the main job on the default model — batch, stream, chat session, engine counters."""
from __future__ import annotations

import sys
import time


def main(model_path=None) -> None:
    from . import GenerationConfig, pipeline

    t0 = time.perf_counter()
    print("Loading the model (the first run converts the default GGUF once, then it is cached) ...", flush=True)
    with pipeline(model_path) as pipe:
        print(f"ready in {time.perf_counter() - t0:.1f} s: {pipe.model_dir} "
              f"({pipe.dtype}, {pipe.device}, {pipe.num_blocks} KV blocks of {pipe.block_size})\n")

        greedy = GenerationConfig(max_new_tokens=64)
        prompts = ["What is the capital of France?", "Say this is a test.", "Name a primary color."]
        t = time.perf_counter()
        responses = pipe(prompts, gen_config=greedy, use_tqdm=True)
        print(f"batch of {len(prompts)} in {time.perf_counter() - t:.2f} s")
        for p, r in zip(prompts, responses):
            print(f"  Q: {p}\n  A: {r.text!r} [{r.finish_reason}, {r.generate_token_len} tokens]")

        print("\nstreaming: ", end="")
        for delta in pipe.stream_infer([[{"role": "user", "content": "Name three rivers."}]], gen_config=greedy):
            print(delta.text, end="", flush=True)
        print()

        print("\nchat session (the first turn's KV cache is reused by the second):")
        session = pipe.chat("My name is Ada. Please remember it.", gen_config=greedy)
        print(f"  turn 1: {session.response.text!r}")
        before = pipe.stats()["num_prompt_tokens_computed"]
        session = pipe.chat("What is my name?", session=session, gen_config=greedy)
        after = pipe.stats()["num_prompt_tokens_computed"]
        print(f"  turn 2: {session.response.text!r}")
        print(f"  turn 2 computed {after - before} prompt tokens; the session holds {session._step}")
        session.close()
        print("\nengine counters:", pipe.stats())
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
