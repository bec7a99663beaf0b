"""``lmwrap bench throughput --images N``: a vision-language model with N images per request, our engine
and transformers' ``generate`` side by side on the same seeded workload.

Workload (seeded): ``--num-requests`` requests, each a fixed question with N random-noise RGB images
whose sides are uniform in ``--image-size`` [64, 512] px, output lengths uniform in ``--output-len``,
EOS ignored. Both sides time the whole request: image preprocessing, the vision encoder, prefill and
decode. transformers gets exactly the engine's inputs (our prompt encoder: the model's chat template and
transformers' image processor; its time is added to transformers' time) and runs padded batches of
``--hf-batch-size`` (left padding) generating each batch's longest requested output; only requested
tokens are counted, so the ratio is output tok/s against output tok/s.
"""
from __future__ import annotations

import random
import time
from typing import List, Tuple

QUESTION = "Describe these images in detail."


def make_image_workload(n: int, images: int, size, output_len, seed: int) -> List[Tuple[list, int]]:
    import numpy as np
    from PIL import Image
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    workload = []
    for _ in range(n):
        ims = []
        for _ in range(images):
            w, h = rng.randint(*size), rng.randint(*size)
            ims.append(Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
        workload.append((ims, rng.randint(*output_len)))
    return workload


def run_engine(pipe, workload) -> Tuple[float, int]:
    from .config import GenerationConfig
    prompts = [(QUESTION, ims) for ims, _ in workload]
    gens = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for _, n in workload]
    start = time.perf_counter()
    outs = pipe(prompts, gen_config=gens)
    secs = time.perf_counter() - start
    for out in outs:
        if out.finish_reason == "error":
            raise RuntimeError(out.text)
    return secs, sum(o.generate_token_len for o in outs)


def encode_for_transformers(pipe, workload) -> Tuple[float, list]:
    """Each request's prompt ids and per-image tensors from our prompt encoder (transformers' image processor,
    the model's chat template): transformers gets exactly the engine's inputs. Returns the seconds it took."""
    start = time.perf_counter()
    encoded = []
    for ims, out_len in workload:
        ids = pipe.encode_prompt((QUESTION, ims))
        encoded.append((list(ids), [it.pixel_inputs for it in ids.mm_items], out_len))
    return time.perf_counter() - start, encoded


def run_transformers(model_dir: str, dtype, device, encoded, batch_size: int, image_token_id: int,
                     pad_id: int) -> Tuple[float, int]:
    import torch
    from transformers import AutoModelForImageTextToText
    from .bench import _synchronize
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def generate(batch):
        width = max(len(ids) for ids, _, _ in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in batch], device=device)
        pixels = [p for _, images, _ in batch for p in images]
        inputs = {k: torch.cat([p[k] for p in pixels]).to(device) for k in pixels[0]}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if "image_grid_thw" in inputs:  # Qwen2-VL marks its image tokens
            inputs["mm_token_type_ids"] = (input_ids == image_token_id).int()
        n = max(out for _, _, out in batch)
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=mask, **inputs, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad_id)

    generate([encoded[0][:2] + (2,)])  # warm-up
    _synchronize(device)
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(encoded), batch_size):
        batch = encoded[b:b + batch_size]
        generate(batch)
        tokens += sum(out for _, _, out in batch)
    _synchronize(device)
    return time.perf_counter() - start, tokens


def throughput_images(args) -> None:
    from .bench import _free_device_memory, _open_pipeline
    if args.random_weights:
        raise SystemExit("lmwrap bench throughput --images: needs a vision-language model folder, "
                         "not --random-weights")
    output_len = tuple(args.output_len or (16, 256))
    size = tuple(args.image_size)
    if not (1 <= output_len[0] <= output_len[1] and 1 <= size[0] <= size[1]):
        raise SystemExit("lmwrap bench throughput --images: --output-len / --image-size need 1 <= MIN <= MAX")
    pipe = _open_pipeline(args)
    try:
        pipe.vision_processor()
    except ValueError as exc:
        pipe.close()
        raise SystemExit(f"lmwrap bench throughput --images: {exc}") from None
    device, dtype, model_dir = pipe.device, pipe.dtype, pipe.model_dir
    workload = make_image_workload(args.num_requests, args.images, size, output_len, args.seed)
    print(f"model: {model_dir}")
    print(f"workload: {len(workload)} requests, {args.images} random images each ({size[0]}-{size[1]} px sides), "
          f"outputs {output_len[0]}-{output_len[1]} tokens ({sum(o for _, o in workload)} in all), EOS ignored; "
          f"dtype {dtype}, device {device}")
    run_engine(pipe, make_image_workload(2, args.images, size, (2, 2), args.seed + 1))  # warm-up
    before = pipe.stats()
    secs, toks = run_engine(pipe, workload)
    after = pipe.stats()
    prompt_toks = after["num_prompt_tokens_computed"] - before["num_prompt_tokens_computed"]
    print(f"lmwrap       : {secs:8.2f} s  {toks / secs:9.1f} output tok/s  {len(workload) / secs:7.2f} req/s  "
          f"({prompt_toks} prompt tokens computed, image tokens included)")
    hf_workload = workload[:args.hf_num_requests]
    if not args.no_hf:
        pre_secs, encoded = encode_for_transformers(pipe, hf_workload)
        image_token_id = pipe.vision_processor().image_token_id()
        pad_id = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0
    pipe.close()
    del pipe
    _free_device_memory(device)
    if args.no_hf:
        return
    hf_secs, hf_toks = run_transformers(model_dir, dtype, device, encoded, args.hf_batch_size, image_token_id,
                                        pad_id)
    hf_secs += pre_secs  # the same preprocessing the engine's time includes
    subset = f"first {len(hf_workload)} of {len(workload)} requests, " if len(hf_workload) < len(workload) else ""
    print(f"transformers : {hf_secs:8.2f} s  {hf_toks / hf_secs:9.1f} output tok/s  "
          f"{len(hf_workload) / hf_secs:7.2f} req/s  ({subset}padded batches of {args.hf_batch_size})")
    print(f"ratio        : {(toks / secs) / (hf_toks / hf_secs):.2f}x output tok/s")
