"""The default model (SmolLM2-135M-Instruct, dequantised from its GGUF) against transformers on the same weights."""
import pytest
import torch

from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline

QUESTIONS = ["What is the capital of France?", "Name three rivers.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def default_pipe():
    with pipeline(backend_config=PytorchEngineConfig(dtype="float32")) as pipe:
        yield pipe


def test_greedy_equals_transformers(default_pipe):
    from transformers import AutoModelForCausalLM

    model_dir = default_pipe.model_dir
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = GenerationConfig(max_new_tokens=32)
    results = default_pipe(QUESTIONS, gen_config=gen)
    eos = set(default_pipe.eos_token_ids)
    for question, res in zip(QUESTIONS, results):
        ids = default_pipe.encode_prompt(question, True, True)
        assert res.input_token_len == len(ids)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                               eos_token_id=sorted(eos), pad_token_id=0)[0, len(ids):].tolist()
        expected = [t for t in out if t not in eos]
        assert res.token_ids == expected, question
        assert res.finish_reason == ("stop" if len(out) > len(expected) else "length")
    assert "Paris" in results[0].text
