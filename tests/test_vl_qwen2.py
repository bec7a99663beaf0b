"""Qwen2-VL / Qwen2.5-VL: the vision tower, M-RoPE text model and rope index against transformers' own
modules on the same random weights, then the whole engine against transformers' generate."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lmwrap_engine.models.config import ModelArgs
from lmwrap_engine.models.qwen2_vl import (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                                           mrope_positions)

QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "describe this image. What is in the picture? compare the two images.",
    "You are a helpful assistant. system user assistant",
    "Name three rivers: the Nile, the Amazon and the Yangtze. 0 1 2 3 4 5 6 7 8 9",
]


def _tokenizer(path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=VL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = QWEN2VL_CHAT_TEMPLATE
    return fast


def build_tiny_qwen2_vl(root: str, qwen25: bool = False, seed: int = 0) -> str:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) folder: weights, config, tokenizer and processor."""
    from transformers import (Qwen2VLImageProcessor, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration as HF25, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration as HF2)

    path = os.path.join(root, f"{'qwen2_5_vl' if qwen25 else 'qwen2_vl'}-s{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tok = _tokenizer(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=0)
    if qwen25:
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1, 3])
        config_cls, model_cls = Qwen2_5_VLConfig, HF25
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_cls, model_cls = Qwen2VLConfig, HF2
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(cfg).float()
    with torch.no_grad():  # widen HF's small init so logits are not near-ties
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.05) if name.endswith("weight") else p.normal_(0, 0.02)
            elif p.dim() > 1:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    # Qwen2VLProcessor needs torchvision for its video half; the image processor alone does not.
    Qwen2VLImageProcessor().save_pretrained(path)
    return path


def load_hf(path: str):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def load_ours(path: str):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cls = Qwen2_5_VLForConditionalGeneration if "2_5" in cfg["architectures"][0] else Qwen2VLForConditionalGeneration
    model = cls(ModelArgs.from_hf_config(cfg))
    from lmwrap_engine.loader.safetensors import iterate_weights
    with torch.no_grad():
        model.load_weights(iterate_weights(path))
    return model.eval()


def images(sizes, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, h in sizes:
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        out.append(Image.fromarray(arr))
    return out


def processed(path, text_parts, imgs):
    """What Qwen2VLProcessor gives for one user message mixing text and images (in the given order):
    the chat template, each ``<|image_pad|>`` repeated for its image's merged grid, and the image tensors."""
    from transformers import AutoImageProcessor, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    improc = AutoImageProcessor.from_pretrained(path)
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in text_parts]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                     add_generation_prompt=True)
    out = {}
    if imgs:
        out = dict(improc(images=imgs, return_tensors="pt"))
        pieces = prompt.split("<|image_pad|>")
        merge = improc.merge_size ** 2
        prompt = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // merge) + p
                                     for g, p in zip(out["image_grid_thw"], pieces[1:]))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    out.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_id).int())
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["qwen2_vl", "qwen2_5_vl"])
def tiny(request, tmp_path_factory):
    root = str(tmp_path_factory.getbasetemp())
    path = build_tiny_qwen2_vl(root, qwen25=request.param)
    return path, load_hf(path), load_ours(path)


SIZES = [(56, 56), (84, 140), (112, 70)]


def test_vision_tower_matches_transformers(tiny):
    path, hf, ours = tiny
    inputs = processed(path, [None, "and", None, "and", None, "compare"], images(SIZES))
    with torch.no_grad():
        ref = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        got = ours.encode_pixels(inputs["pixel_values"], inputs["image_grid_thw"].tolist())
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # Grids with several frames (t > 1: attention per frame) and an 8x12 one (several Qwen2.5 windows).
    grid = torch.tensor([[2, 4, 6], [1, 8, 12]])
    pixels = torch.randn(int(grid.prod(-1).sum()), inputs["pixel_values"].shape[1],
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid).pooler_output
        got = torch.cat(ours.encode_pixels(pixels, grid.tolist()))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rope_index_matches_transformers(tiny):
    path, hf, ours = tiny
    inputs = processed(path, ["look:", None, "then", None, None, "compare them"], images(SIZES))
    ref_pos, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"])
    ids = inputs["input_ids"][0].tolist()
    got, nxt = mrope_positions(ids, inputs["image_grid_thw"].tolist(), ours.image_token_id, ours.spatial_merge_size)
    assert torch.equal(got, ref_pos[:, 0])
    assert nxt - len(ids) == int(ref_delta)
    # A continuation (chunk of a later turn) starting at `nxt` equals the positions of the whole run.
    split = ids.index(ours.image_token_id) - 1  # at <|vision_start|>
    head, first = mrope_positions(ids[:split], [], ours.image_token_id, ours.spatial_merge_size)
    tail, nxt2 = mrope_positions(ids[split:], inputs["image_grid_thw"].tolist(), ours.image_token_id,
                                 ours.spatial_merge_size, start=first)
    assert torch.equal(torch.cat([head, tail], 1), got) and nxt2 == nxt


def test_rope_index_errors(tiny):
    _, _, ours = tiny
    img = ours.image_token_id
    with pytest.raises(ValueError, match="does not hold"):
        mrope_positions([1, img, img, 2], [(1, 4, 4)], img, 2)
    with pytest.raises(ValueError, match="more images"):
        mrope_positions([1, 2], [(1, 4, 4)], img, 2)
    with pytest.raises(ValueError, match="more image placeholder"):
        mrope_positions([1, img, 2], [], img, 2)


def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs).logits[0]


def test_text_model_with_image_embeddings_matches_transformers(tiny):
    """Our text model fed the merged embeddings and M-RoPE positions (one flat run, plain causal
    attention over the whole prompt) gives transformers' logits."""
    path, hf, ours = tiny
    inputs = processed(path, ["look:", None, "then", None, "compare"], images(SIZES[:2]))
    ids = inputs["input_ids"][0]
    grids = inputs["image_grid_thw"].tolist()
    with torch.no_grad():
        feats = torch.cat(ours.encode_pixels(inputs["pixel_values"], grids))
        emb = ours.embed_input_ids(ids).clone()
        emb[ids == ours.image_token_id] = feats
        pos, _ = mrope_positions(ids.tolist(), grids, ours.image_token_id, ours.spatial_merge_size)
        logits = _run_flat(ours, ids, pos, emb)
    torch.testing.assert_close(logits, _hf_logits(hf, inputs), atol=2e-4, rtol=2e-4)


def _run_flat(model, ids, positions, embeds):
    """One prefill of a single sequence through the paged attention path on a scratch cache."""
    from lmwrap_engine.engine.context import ForwardContext, StepContext
    from lmwrap_engine.models.layers.attention import PagedAttention

    n = ids.shape[0]
    bs = 16
    nblocks = -(-n // bs)
    a = model.args
    k_cache = torch.zeros(a.num_layers, nblocks, bs, a.num_kv_heads, a.head_dim)
    v_cache = torch.zeros_like(k_cache)
    step = StepContext()
    for i, attn in enumerate(m for m in model.modules() if isinstance(m, PagedAttention)):
        attn.step_context, attn.k_cache, attn.v_cache = step, k_cache[i], v_cache[i]
    table = torch.arange(nblocks, dtype=torch.int32)[None]
    ctx = ForwardContext(slot_mapping=torch.arange(n), num_decode_tokens=0,
                         decode_block_tables=table[:0], decode_kv_lens=torch.zeros(0, dtype=torch.int32),
                         prefill_block_tables=table, prefill_cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                         prefill_kv_lens=torch.tensor([n], dtype=torch.int32))
    with step.use(ctx):
        return model.compute_logits(model(ids, positions, embeds))


def test_processor_matches_transformers_expansion(tiny):
    """Our prompt encoder (images placed first, as lmdeploy and the HF template for [images, text] do) gives
    transformers' ids, per-image pixels whose encoding equals the batched one, and M-RoPE items that
    reproduce get_rope_index when laid out by the engine's rule."""
    from transformers import AutoTokenizer
    from lmwrap_engine.vl.items import IMAGE_TOKEN
    from lmwrap_engine.vl.qwen2_vl import Qwen2VLProcessor

    path, hf, ours = tiny
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    tok = AutoTokenizer.from_pretrained(path)
    proc = Qwen2VLProcessor(path, tok, cfg)
    imgs = images(SIZES)
    text = proc.place_images("compare them", len(imgs))
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids, items = proc.encode(prompt, imgs, add_special_tokens=False)
    ref = processed(path, [None, None, None, "compare them"], imgs)
    assert ids == ref["input_ids"][0].tolist()
    assert [it.length for it in items] == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]
    assert len({it.content_hash for it in items}) == 3
    # The engine's layout rule: text p -> p + deltas before; item token j -> offset + deltas before + rel[j].
    pos = torch.arange(len(ids)).repeat(3, 1)
    shift = 0
    for it in items:
        pos[:, it.offset:it.end] = it.mrope_positions + it.offset + shift
        shift += it.mrope_delta
        pos[:, it.end:] += it.mrope_delta
    ref_pos, ref_delta = hf.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                 image_grid_thw=ref["image_grid_thw"])
    assert torch.equal(pos, ref_pos[:, 0]) and shift == int(ref_delta)
    with torch.no_grad():
        got = ours.encode_images(items)
        want = ours.encode_pixels(ref["pixel_values"], ref["image_grid_thw"].tolist())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # The model's own template output (image parts as <|vision_start|><|image_pad|><|vision_end|>) encodes the same.
    content = [{"type": "image"}] * 3 + [{"type": "text", "text": "compare them"}]
    native = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert proc.encode(native, imgs, add_special_tokens=False)[0] == ids
    with pytest.raises(ValueError, match="places 1 images"):
        proc.encode(prompt.replace(IMAGE_TOKEN, "", 2), imgs, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Through the engine's model runner (the multimodal seam)
# ---------------------------------------------------------------------------------------------

def _encoded(path, tok_prompt_parts, imgs):
    """Our prompt encoder's ids and items for one user turn built by the model's chat template."""
    from transformers import AutoTokenizer
    from lmwrap_engine.vl.items import IMAGE_TOKEN
    from lmwrap_engine.vl.qwen2_vl import Qwen2VLProcessor

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    tok = AutoTokenizer.from_pretrained(path)
    text = "".join(IMAGE_TOKEN if p is None else p for p in tok_prompt_parts)
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return Qwen2VLProcessor(path, tok, cfg).encode(prompt, imgs, add_special_tokens=False)


def _runner_sequence(runner, ids, items):
    """A Sequence laid out as the engine lays out a request with images (pad ids at placeholders)."""
    from lmwrap_engine.engine.sequence import Sequence
    from lmwrap_engine.vl.inputs import pad_id

    seq = Sequence(0, 0)
    seq.token_ids = list(ids)
    for it in items:
        seq.token_ids[it.offset:it.end] = [pad_id(runner.args.vocab_size, it.content_hash)] * it.length
    seq.mm_items = [it.shifted(0) for it in items]
    seq.mrope_delta = sum(it.mrope_delta for it in items)
    return seq


def _runner_logits(runner, seq, chunks):
    from lmwrap_engine.engine.block_manager import BlockManager
    from lmwrap_engine.engine.scheduler import ScheduledBatch
    from lmwrap_engine.vl.inputs import multimodal_inputs

    bm = BlockManager(runner.num_blocks, runner.block_size)
    out = []
    for n in chunks:
        assert bm.allocate_slots(seq, n)
        batch = ScheduledBatch([seq], [n], int(n == 1))
        input_ids, positions, ctx, _ = runner._prepare(batch)
        with torch.no_grad(), runner.step_context.use(ctx):
            input_ids, embeds, positions = multimodal_inputs(runner.model, batch, input_ids, positions,
                                                             runner.args.vocab_size)
            out.append(runner.model.compute_logits(runner.model(input_ids, positions, embeds)))
        seq.num_computed_tokens += n
    return torch.cat(out)


def test_runner_logits_chunked_match_transformers(tiny):
    from lmwrap_engine.config import EngineConfig
    from lmwrap_engine.engine.model_runner import ModelRunner

    path, hf, _ = tiny
    imgs = images(SIZES[:2], seed=1)
    ids, items = _encoded(path, [None, None, "compare them"], imgs)
    ref = processed(path, [None, None, "compare them"], imgs)
    assert ids == ref["input_ids"][0].tolist()
    expected = _hf_logits(hf, ref)
    runner = ModelRunner(path, EngineConfig(dtype="float32", num_gpu_blocks=32, block_size=16, device_type="cpu"))
    calls = []
    encode = runner.model.encode_images
    runner.model.encode_images = lambda its: calls.append(len(its)) or encode(its)
    n = len(ids)
    cut = items[0].offset + 3  # a chunk boundary inside the first image
    for chunks in ([n], [cut, items[1].offset + 2 - cut, n - items[1].offset - 2], [7] * (n // 7) + [n % 7]):
        calls.clear()
        seq = _runner_sequence(runner, ids, items)
        got = _runner_logits(runner, seq, [c for c in chunks if c])
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4, msg=f"chunks={chunks}")
        assert sum(calls) == len(items)  # each image encoded once, however the prompt is chunked


def hf_greedy(hf, inputs, n):
    """transformers' ``n`` greedy tokens, recomputing the whole sequence each step (positions from
    get_rope_index over prompt + generated text every time: no cached rope delta to trust)."""
    inputs = dict(inputs)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(**inputs).logits[0, -1].argmax().view(1, 1)
            out.append(int(nxt))
            for key, pad in (("input_ids", nxt), ("attention_mask", 1), ("mm_token_type_ids", 0)):
                inputs[key] = torch.cat([inputs[key], torch.full_like(nxt, pad) if key != "input_ids" else nxt], 1)
    return out


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-buffers"])
def test_runner_greedy_batched_with_text_matches_transformers(tiny, graphs):
    """An image request and a text-only one prefilled and decoded together; with ``graphs`` decode runs
    through the fixed-buffer decode path CUDA graphs use (1-D positions ``p + mrope_delta``)."""
    from lmwrap_engine.config import EngineConfig
    from lmwrap_engine.engine.block_manager import BlockManager
    from lmwrap_engine.engine.model_runner import ModelRunner
    from lmwrap_engine.engine.scheduler import ScheduledBatch
    from lmwrap_engine.engine.sequence import Sequence

    path, hf, _ = tiny
    imgs = images([SIZES[2], SIZES[0]], seed=2)
    ids, items = _encoded(path, [None, "and", None, "compare them"], imgs)
    ref = processed(path, [None, "and", None, "compare them"], imgs)
    text_ref = processed(path, ["The capital of France is"], [])
    steps = 8
    expected = [hf_greedy(hf, ref, steps), hf_greedy(hf, text_ref, steps)]
    runner = ModelRunner(path, EngineConfig(dtype="float32", num_gpu_blocks=32, block_size=16, device_type="cpu"))
    if graphs:
        runner.decode_graphs = runner.make_decode_graphs(capture=False)
    bm = BlockManager(runner.num_blocks, runner.block_size)
    seq = _runner_sequence(runner, ids, items)
    text = Sequence(1, 1)
    text.token_ids = text_ref["input_ids"][0].tolist()
    seqs = [seq, text]
    got = [[], []]
    new = [s.num_tokens for s in seqs]
    for step in range(steps):
        for s, n in zip(seqs, new):
            assert bm.allocate_slots(s, n)
        logits = runner.run(ScheduledBatch(seqs, new, len(seqs) if step else 0))
        for i, (s, n) in enumerate(zip(seqs, new)):
            s.num_computed_tokens += n
            tok = int(logits[i].argmax())
            got[i].append(tok)
            s.token_ids.append(tok)
        new = [1, 1]
    assert got == expected


# ---------------------------------------------------------------------------------------------
# The whole engine: prompt forms -> chat template -> prompt encoder -> scheduler -> runner
# ---------------------------------------------------------------------------------------------

ENGINE_GREEDY_STEPS = 8


@pytest.fixture(scope="module")
def engine_case(tiny):
    """Requests (prompt, expected greedy tokens): images of different sizes, one or several per prompt,
    and a text-only one; expected tokens from transformers on the ids its own chat template gives."""
    path, hf, _ = tiny
    a, b, c = images(SIZES, seed=3)
    cases = [(("describe this image", a), [None, "describe this image"], [a]),
             (("compare them", [b, c]), [None, None, "compare them"], [b, c]),
             ("The capital of France is", ["The capital of France is"], []),
             (("what is in the picture?", [c, a, b]), [None, None, None, "what is in the picture?"], [c, a, b])]
    out = []
    for prompt, parts, imgs in cases:
        ref = processed(path, parts, imgs)
        out.append((prompt, len(ref["input_ids"][0]), hf_greedy(hf, ref, ENGINE_GREEDY_STEPS)))
    return path, out


def _engine_generate(path, prompts, config, rounds=1):
    """Greedy tokens of all prompts in flight together (of the last of ``rounds`` runs), their input
    lengths, and the engine's stats."""
    from lmwrap_engine import GenerationConfig, pipeline

    gen = GenerationConfig(max_new_tokens=ENGINE_GREEDY_STEPS, ignore_eos=True)
    with pipeline(path, config) as pipe:
        model = pipe._loop.engine.runner.model
        encode, encoded = model.encode_images, []
        model.encode_images = lambda items: encoded.extend(items) or encode(items)
        for _ in range(rounds):
            streams = [iter(pipe.stream_generate(p, gen_config=gen)) for p in prompts]
            deltas = [[next(s)] for s in streams]  # every request in flight before any finishes
            for d, s in zip(deltas, streams):
                d.extend(s)
        stats = pipe.stats()
    stats["num_images_encoded"] = len(encoded)
    return [[t for x in d for t in x.token_ids] for d in deltas], [d[-1].input_token_len for d in deltas], stats


@pytest.mark.parametrize("mode", ["chunked", "preempted", "prefix-cached"])
def test_engine_greedy_matches_transformers(engine_case, mode):
    from lmwrap_engine import PytorchEngineConfig

    path, cases = engine_case
    prompts = [p for p, _, _ in cases]
    # All four requests are in flight together in every mode (images batched with a text-only request).
    config = {"chunked": dict(num_gpu_blocks=64, block_size=16, max_prefill_token_num=9, max_batch_size=4),
              "preempted": dict(num_gpu_blocks=20, block_size=4),
              "prefix-cached": dict(num_gpu_blocks=96, block_size=4, enable_prefix_caching=True)}[mode]
    got, input_lens, stats = _engine_generate(path, prompts, PytorchEngineConfig(dtype="float32", **config),
                                              rounds=2 if mode == "prefix-cached" else 1)
    assert input_lens == [n for _, n, _ in cases], input_lens
    assert got == [exp for _, _, exp in cases]
    assert stats["num_free_blocks"] == stats["num_blocks"]
    num_images = sum(len(p[1]) if isinstance(p, tuple) and isinstance(p[1], list) else isinstance(p, tuple)
                     for p in prompts)
    if mode in ("chunked", "preempted"):  # once each: chunks and recompute reuse the embeddings
        assert stats["num_images_encoded"] == num_images
    if mode == "preempted":
        assert stats["num_preemptions"] > 0
    if mode == "prefix-cached":  # the second round reuses the image blocks and their M-RoPE positions
        assert stats["num_prefix_hit_tokens"] >= sum(n for _, n, _ in cases) - 4 * len(cases)
        # ... and encodes no image: each is followed by more than a block of text, so all its tokens hit
        assert stats["num_images_encoded"] == num_images


def test_engine_session_with_images_in_two_turns(tiny):
    """Turn 2 of a kept session adds an image: its M-RoPE positions continue after turn 1's shifted text
    (transformers recomputes the whole conversation's positions with get_rope_index)."""
    from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline

    path, hf, ours = tiny
    a, b = images([SIZES[1], SIZES[2]], seed=4)
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    with pipeline(path, PytorchEngineConfig(dtype="float32", num_gpu_blocks=64, block_size=16)) as pipe:
        first, second = ("describe this image", a), ("and this one?", b)
        ids1, ids2 = pipe.encode_prompt(first, True), pipe.encode_prompt(second, False)
        out1 = [t for r in pipe.stream_generate(first, session_id=7, gen_config=gen, sequence_end=False)
                for t in r.token_ids]
        out2 = [t for r in pipe.stream_generate(second, session_id=7, gen_config=gen, sequence_start=False)
                for t in r.token_ids]
        stats = pipe.stats()
    items = list(ids1.mm_items) + list(ids2.mm_items)
    ids = list(ids1) + out1 + list(ids2)
    inputs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                  mm_token_type_ids=(torch.tensor([ids]) == ours.image_token_id).int(),
                  pixel_values=torch.cat([it.pixel_inputs["pixel_values"] for it in items]),
                  image_grid_thw=torch.cat([it.pixel_inputs["image_grid_thw"] for it in items]))
    assert int(inputs["mm_token_type_ids"].sum()) == sum(it.length for it in items)
    first_ref = {k: (v[:, :len(ids1)] if k not in ("pixel_values", "image_grid_thw") else v)
                 for k, v in inputs.items()}
    first_ref["pixel_values"] = ids1.mm_items[0].pixel_inputs["pixel_values"]
    first_ref["image_grid_thw"] = ids1.mm_items[0].pixel_inputs["image_grid_thw"]
    assert out1 == hf_greedy(hf, first_ref, 6)
    assert out2 == hf_greedy(hf, inputs, 6)
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_engine_openai_messages_and_disabled_vision_encoder(tiny):
    """An OpenAI message with an ``image_url`` data URL, and ``<IMAGE_TOKEN>`` inside the text, give what
    transformers gives for the same layout; with
    ``disable_vision_encoder`` the text model alone loads and serves text, and an image is a clear error."""
    import base64
    import io

    from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline

    path, hf, _ = tiny
    (img,) = images([SIZES[1]], seed=5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    expected = hf_greedy(hf, processed(path, [None, "describe this image"], [img]), 6)
    placed = hf_greedy(hf, processed(path, ["look at ", None, " and tell me"], [img]), 6)
    with pipeline(path, PytorchEngineConfig(dtype="float32", num_gpu_blocks=32, block_size=16)) as pipe:
        assert pipe(messages, gen_config=gen).token_ids == expected
        # lmdeploy's <IMAGE_TOKEN> places an image inside the text
        assert pipe(("look at <IMAGE_TOKEN> and tell me", img), gen_config=gen).token_ids == placed
        with pytest.raises(ValueError, match="places 2 images"):
            pipe.encode_prompt(("<IMAGE_TOKEN> or <IMAGE_TOKEN>?", [img]))
        with pytest.raises(ValueError, match="aspect ratio.*5000x10"):
            pipe.encode_prompt(("describe", [img, images([(5000, 10)])[0]]))
    text_expected = hf_greedy(hf, processed(path, ["The capital of France is"], []), 6)
    cfg = PytorchEngineConfig(dtype="float32", num_gpu_blocks=32, block_size=16, disable_vision_encoder=True)
    with pipeline(path, cfg) as pipe:
        assert all(not name.startswith("visual.") for name, _ in pipe._loop.engine.runner.model.named_parameters())
        assert pipe("The capital of France is", gen_config=gen).token_ids == text_expected
        with pytest.raises(ValueError, match="vision encoder"):
            pipe(messages, gen_config=gen)


def test_transformers4_config_and_language_model_weight_names(tiny, tmp_path):
    """Hub checkpoints keep the text fields on top with ``rope_scaling: {type: mrope}`` (transformers 4.x),
    and newer saves name weights ``model.language_model.*`` / ``model.visual.*``: both load to the same model."""
    from safetensors.torch import load_file, save_file

    path, hf, ours = tiny
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    old = {**{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}, **cfg,
           "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    old["vision_config"] = {k: v for k, v in cfg["vision_config"].items() if k not in ("rope_parameters", "model_type")}
    old["vision_config"]["in_chans"] = old["vision_config"].pop("in_channels")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f)
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v
               for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    save_file(renamed, str(tmp_path / "model.safetensors"))
    other = load_ours(str(tmp_path))
    inputs = processed(path, [None, "compare"], images([SIZES[1]], seed=6))
    grids = inputs["image_grid_thw"].tolist()
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        a, b = ((m.encode_pixels(inputs["pixel_values"], grids)[0], _run_flat(m, ids, torch.arange(len(ids)), None))
                for m in (ours, other))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_api_server_openai_client_with_http_image(tmp_path_factory):
    """Qwen2-VL through a real api_server process and the openai client: an image_url served from
    127.0.0.1 gives transformers' greedy reply."""
    openai = pytest.importorskip("openai")
    from image_server import image_server, png_bytes
    from serving import running_server, wait_blocks_free
    from transformers import AutoTokenizer

    path = build_tiny_qwen2_vl(str(tmp_path_factory.getbasetemp()))
    hf = load_hf(path)
    img = images([SIZES[1]], seed=7)[0]
    expected = AutoTokenizer.from_pretrained(path).decode(
        hf_greedy(hf, processed(path, [None, "describe this image"], [img]), 6))
    with image_server({"a.png": png_bytes(img)}) as images_url, \
            running_server(path, "--dtype", "float32", "--num-gpu-blocks", "32",
                           "--cache-block-seq-len", "16") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=path, max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                         {"type": "image_url", "image_url": {"url": images_url + "/a.png"}}]}])
        assert r.choices[0].message.content == expected
        assert wait_blocks_free(url)["lmwrap_kv_cache_blocks_used"] == 0
