"""LLaVA 1.5 and LLaVA-NeXT on the engine vs transformers (tiny random models): logits and greedy tokens with
one and several images, batched with text-only requests, chunked prefill, preemption, prefix caching."""
import base64
import io

import pytest
import torch

from tiny_models import tiny_config
from tiny_vl_models import build_tiny_llava, load_processor, load_reference, make_image

from lmwrap_engine import GenerationConfig, pipeline
from lmwrap_engine.engine.block_manager import BlockManager
from lmwrap_engine.engine.scheduler import ScheduledBatch
from lmwrap_engine.engine.sequence import Sequence
from lmwrap_engine.vl import load_image
from lmwrap_engine.vl.inputs import attach_items, multimodal_inputs

N_NEW = 8
GREEDY = GenerationConfig(max_new_tokens=N_NEW, ignore_eos=True)
IMAGES = [make_image(0), make_image(1, (80, 30)), make_image(2, (30, 70))]


def template(text: str, n_images: int) -> str:
    """The tiny models' chat template, as transformers' processors render it (images first)."""
    return "USER: " + "<image>\n" * n_images + text + " ASSISTANT:"


@pytest.fixture(scope="module", params=[False, True], ids=["llava-1.5", "llava-next"])
def vl_model(request, tiny_root):
    path = build_tiny_llava(tiny_root, next_=request.param)
    return path, load_reference(path), load_processor(path)


def hf_greedy(ref, processor, text: str, images, n: int = N_NEW):
    """transformers' greedy tokens (full recompute each step) and first-step logits."""
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    ids = inputs["input_ids"]
    first = None
    with torch.no_grad():
        for _ in range(n):
            logits = ref(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            first = logits[0] if first is None else first
            ids = torch.cat([ids, logits[0, -1].argmax().view(1, 1)], 1)
    return inputs["input_ids"][0].tolist(), ids[0, inputs["input_ids"].shape[1]:].tolist(), first


def engine_logits(pipe, prompt, chunks):
    """All-position logits of a prompt with images, fed to the model runner in the given chunk sizes."""
    runner = pipe._loop.engine.runner
    ids = pipe.encode_prompt(prompt)
    seq = Sequence(0, 0)
    padded, _ = attach_items(seq, ids, ids.mm_items, pipe.vocab_size)
    seq.token_ids = padded
    bm = BlockManager(runner.num_blocks, runner.block_size)
    out = []
    for n in chunks:
        assert bm.allocate_slots(seq, n)
        batch = ScheduledBatch([seq], [n], int(n == 1))
        input_ids, positions, ctx, _ = runner._prepare(batch)
        with torch.inference_mode(), runner.step_context.use(ctx):
            input_ids, embeds, positions = multimodal_inputs(runner.model, batch, input_ids, positions,
                                                             pipe.vocab_size)
            out.append(runner.model.compute_logits(runner.model(input_ids, positions, embeds)))
        seq.num_computed_tokens += n
    bm.free(seq)
    return list(ids), torch.cat(out), seq


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_transformers(vl_model, n_images):
    path, ref, processor = vl_model
    images = IMAGES[:n_images]
    ref_ids, _, ref_logits = hf_greedy(ref, processor, template("hello world", n_images), images, n=1)
    with pipeline(path, backend_config=tiny_config()) as pipe:
        n = len(ref_ids)
        for chunks in ([n], [7, 11, n - 18]):  # the second splits the first image over two chunks
            ids, logits, seq = engine_logits(pipe, ("hello world", images), chunks)
            assert ids == ref_ids
            torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
            assert all(it.embeds is not None for it in seq.mm_items)


def test_greedy_batched_with_text_and_chunked(vl_model):
    """Image and text-only prompts in one batch, through a prefill budget that splits images."""
    path, ref, processor = vl_model
    data_url = _data_url(IMAGES[2])
    prompts = [
        ("hello world", IMAGES[0]),
        "The capital of France is",
        ("Name three rivers", [IMAGES[1], IMAGES[0]]),
        [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                      {"type": "image_url", "image_url": {"url": data_url}}]}],
    ]
    expected = [
        hf_greedy(ref, processor, template("hello world", 1), [IMAGES[0]])[1],
        hf_greedy(ref, processor, "USER: The capital of France is ASSISTANT:", None)[1],
        hf_greedy(ref, processor, template("Name three rivers", 2), [IMAGES[1], IMAGES[0]])[1],
        hf_greedy(ref, processor, template("describe", 1), [load_image(data_url)])[1],
    ]
    for cfg in (tiny_config(), tiny_config(max_prefill_token_num=16, max_batch_size=4)):
        with pipeline(path, backend_config=cfg) as pipe:
            outs = pipe(prompts, gen_config=GREEDY)
            assert [o.token_ids for o in outs] == expected
            stats = pipe.stats()
            assert stats["num_free_blocks"] == stats["num_blocks"]


def test_preemption_recomputes_without_reencoding(vl_model, monkeypatch):
    path, ref, processor = vl_model
    prompts = [(f"hello world {i}", [IMAGES[i % 3], IMAGES[(i + 1) % 3]]) for i in range(4)]
    expected = [hf_greedy(ref, processor, template(t, 2), ims, n=24)[1] for t, ims in prompts]
    with pipeline(path, backend_config=tiny_config()) as pipe:
        first_two = sum(-(-len(pipe.encode_prompt(p)) // 16) for p in prompts[:2])
    # The first two prompts fit at once, but not once both have grown by 24 tokens: one is preempted.
    cfg = tiny_config(num_gpu_blocks=first_two + 1, block_size=16, enable_prefix_caching=False)
    with pipeline(path, backend_config=cfg) as pipe:
        model = pipe._loop.engine.runner.model
        encoded = []
        real = model.encode_images
        monkeypatch.setattr(model, "encode_images", lambda items: encoded.extend(items) or real(items))
        outs = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=24, ignore_eos=True))
        stats = pipe.stats()
        assert stats["num_preemptions"] > 0
        assert [o.token_ids for o in outs] == expected
        assert len(encoded) == 8  # once per image, though preempted sequences were recomputed
        assert stats["num_free_blocks"] == stats["num_blocks"]


def test_prefix_cache_tells_images_apart(vl_model, monkeypatch):
    path, ref, processor = vl_model
    with pipeline(path, backend_config=tiny_config(block_size=4, num_gpu_blocks=128)) as pipe:
        a = pipe(("hello world", IMAGES[0]), gen_config=GREEDY)
        before = pipe.stats()
        b = pipe(("hello world", IMAGES[1]), gen_config=GREEDY)
        after_b = pipe.stats()
        # Only the text before the image may come from the cache: never the other image's blocks.
        hit_b = after_b["num_prefix_hit_tokens"] - before["num_prefix_hit_tokens"]
        assert hit_b < 8
        assert a.token_ids != b.token_ids
        assert b.token_ids == hf_greedy(ref, processor, template("hello world", 1), [IMAGES[1]])[1]
        model = pipe._loop.engine.runner.model
        encoded = []
        real = model.encode_images
        monkeypatch.setattr(model, "encode_images", lambda items: encoded.extend(items) or real(items))
        c = pipe(("hello world", IMAGES[0].copy()), gen_config=GREEDY)  # the same image again
        hit_c = pipe.stats()["num_prefix_hit_tokens"] - after_b["num_prefix_hit_tokens"]
        assert c.token_ids == a.token_ids
        assert hit_c >= a.input_token_len - 4  # the whole prompt but its last (partial) block
        assert encoded == []  # every image token came from the cache: the encoder did not run


def test_clear_errors(vl_model, tiny_model_dir):
    path, _, _ = vl_model
    with pipeline(tiny_model_dir(), backend_config=tiny_config()) as text_pipe:
        with pytest.raises(ValueError, match="text-only model"):
            text_pipe(("hello", IMAGES[0]))
    session_len = 100 if "next" in path else 40  # one image fits, three do not
    with pipeline(path, backend_config=tiny_config(session_len=session_len)) as pipe:
        out = pipe(("hello", [IMAGES[0], IMAGES[1], IMAGES[2]]), gen_config=GREEDY)
        assert out.finish_reason == "error" and "3 images" in out.text and f"session_len={session_len}" in out.text
        assert pipe(("hello", IMAGES[0]), gen_config=GenerationConfig(max_new_tokens=2)).finish_reason == "length"
        with pytest.raises(ValueError, match="cannot load image"):
            pipe(("hello", "/no/such/image.png"))
        stats = pipe.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    with pipeline(path, backend_config=tiny_config(disable_vision_encoder=True)) as pipe:
        assert not hasattr(pipe._loop.engine.runner.model, "vision_tower")
        with pytest.raises(ValueError, match="disable_vision_encoder"):
            pipe(("hello", IMAGES[0]))
        assert pipe("hello", gen_config=GREEDY).finish_reason == "length"


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_stream_infer_generate_and_chat_sessions(vl_model):
    """The issue's forms: stream_infer over messages with image_url, async generate, chat sessions with an
    image per turn, lmdeploy's builtin vicuna template, and a session step that would cut an image."""
    import asyncio

    from lmwrap_engine import ChatTemplateConfig
    from lmwrap_engine.vl import load_image_from_url, pipeline as vl_pipeline
    path, ref, processor = vl_model
    data_url = _data_url(IMAGES[1])
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                             {"type": "image_url", "image_url": {"url": data_url}}]}]
    want = hf_greedy(ref, processor, template("describe", 1), [load_image_from_url(data_url)])[1]
    with vl_pipeline(path, backend_config=tiny_config()) as pipe:
        deltas = list(pipe.stream_infer([messages], gen_config=GREEDY))
        assert [t for d in deltas for t in d.token_ids] == want

        async def agen():
            return [t async for out in pipe.generate(messages, None, GREEDY) for t in out.token_ids]
        assert asyncio.run(agen()) == want
        # two turns, an image each: the second continues the first's KV with its own image
        session = pipe.chat(("hello world", IMAGES[0]), gen_config=GREEDY)
        first_len = session._step
        session = pipe.chat(("describe", IMAGES[1]), session=session, gen_config=GREEDY)
        assert session.response.generate_token_len == N_NEW and session._step > first_len
        engine = pipe._loop.engine
        items = pipe._loop.ask(lambda e: [(it.offset, it.length) for it in e.sessions[session._id].seq.mm_items]).result()
        assert len(items) == 2 and items[1][0] >= first_len
        out = list(pipe.stream_generate(input_ids=[5, 6], session_id=session._id, sequence_start=False,
                                        step=items[1][0] + 1, gen_config=GREEDY))
        assert out[-1].finish_reason == "error" and "cuts an image" in out[-1].text
        session.close()
        assert engine is pipe._loop.engine
    with pipeline(path, backend_config=tiny_config(), chat_template_config=ChatTemplateConfig("vicuna")) as pipe:
        ids = pipe.encode_prompt(("describe", [IMAGES[0], IMAGES[1]]))
        assert [it.offset for it in ids.mm_items] == sorted(it.offset for it in ids.mm_items)
        text = pipe.tokenizer.decode(ids)
        assert text.index("<image>") < text.index("describe") and "USER: " in text
        assert pipe(("describe", IMAGES[0]), gen_config=GREEDY).generate_token_len == N_NEW


@pytest.mark.parametrize("next_, strategy", [(False, "full"), (True, "default")], ids=["llava-1.5", "llava-next"])
def test_features_of_several_layers(tiny_root, next_, strategy):
    """A list of vision layers (concatenated); LLaVA 1.5 with vision_feature_select_strategy='full' (CLS kept;
    transformers' LLaVA-NeXT cannot pack those)."""
    path = build_tiny_llava(tiny_root, next_=next_, feature_layer=[-3, -1], strategy=strategy)
    ref, processor = load_reference(path), load_processor(path)
    images = IMAGES[:2]
    ref_ids, want, ref_logits = hf_greedy(ref, processor, template("hello world", 2), images)
    with pipeline(path, backend_config=tiny_config()) as pipe:
        ids, logits, _ = engine_logits(pipe, ("hello world", images), [len(ref_ids)])
        assert ids == ref_ids
        torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
        assert pipe(("hello world", images), gen_config=GREEDY).token_ids == want
