"""A chat turn cut by max_new_tokens still leaves a well-formed conversation in the session's KV cache."""
from lmwrap_engine import GenerationConfig, PytorchEngineConfig, pipeline


def session_text(pipe, session):
    seq = pipe._loop.engine.sessions[session._id].seq
    return pipe.tokenizer.decode(seq.token_ids, skip_special_tokens=False)


def test_turn_after_a_length_cut_starts_by_closing_the_previous_turn(tiny_model_dir):
    cfg = PytorchEngineConfig(dtype="float32", num_gpu_blocks=64, block_size=16)
    with pipeline(tiny_model_dir("llama"), cfg) as pipe:
        cut = GenerationConfig(max_new_tokens=3, ignore_eos=True)
        session = pipe.chat("hello world", gen_config=cut)
        assert session.response.finish_reason == "length"
        reply = session.response.text
        session = pipe.chat("The capital of France", session=session, gen_config=cut)
        text = session_text(pipe, session)
        turn2 = "<|im_start|>user\nThe capital of France<|im_end|>\n<|im_start|>assistant\n"
        assert text.startswith("<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n")
        assert reply + "<|im_end|>\n" + turn2 in text
        assert text.count("<|im_end|>") == 3
