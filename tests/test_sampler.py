"""Sampler and SamplingParams: masks and penalties match transformers; seeds; bans; logprobs."""
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from lmwrap_engine.config import GenerationConfig
from lmwrap_engine.engine.sampler import Sampler, make_generator, process_logits, sorted_probs, vocab_probs
from lmwrap_engine.engine.sampling_params import SamplingParams
from test_detokenizer import build_tokenizer

VOCAB = 64
HAS_CUDA = torch.cuda.is_available()


@dataclass
class Row:
    params: SamplingParams
    token_ids: List[int] = field(default_factory=lambda: [1, 2, 3])
    num_output_tokens: int = 0
    generator: Optional[torch.Generator] = None


def sampling(**overrides) -> SamplingParams:
    return SamplingParams(max_new_tokens=16, greedy=False, **overrides)


def greedy(**overrides) -> SamplingParams:
    return SamplingParams(max_new_tokens=16, **overrides)


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in the sampler's order, as normalised probabilities over the vocab."""
    scores = logits.unsqueeze(0).clone()
    warpers = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else []
    warpers += [MinPLogitsWarper(p.min_p)] if p.min_p > 0.0 else []
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(dim=-1)[0]


def sampler_probs(logits: torch.Tensor, rows) -> torch.Tensor:
    """The sampler's distribution for each row, scattered back to [rows, vocab] and normalised."""
    out = torch.zeros_like(logits)
    sort = [i for i, r in enumerate(rows) if 0 < r.params.top_k < logits.shape[-1] or r.params.top_p < 1]
    rest = [i for i in range(len(rows)) if i not in sort]
    if sort:
        probs, candidates = sorted_probs(logits[sort], [rows[i] for i in sort])
        out[sort] = torch.zeros(len(sort), logits.shape[-1], device=logits.device).scatter(1, candidates, probs)
    if rest:
        out[rest] = vocab_probs(logits[rest], [rows[i] for i in rest])
    return out / out.sum(dim=-1, keepdim=True)


# -- masks and penalties vs transformers ---------------------------------------------------------

SETTINGS = [
    dict(top_k=5), dict(top_k=1000), dict(top_p=0.8), dict(min_p=0.1), dict(temperature=0.5, top_k=10),
    dict(temperature=1.7, top_p=0.5), dict(top_k=20, top_p=0.9, min_p=0.05), dict(temperature=0.7, min_p=0.3),
    dict(top_k=40, top_p=0.3), dict(temperature=1.3, top_k=3, top_p=0.99, min_p=0.2), dict(),
]


def test_top_k_top_p_min_p_match_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(len(SETTINGS) * 4, VOCAB) * 3
    rows = [Row(sampling(**SETTINGS[i % len(SETTINGS)])) for i in range(len(logits))]
    got = sampler_probs(logits.clone(), rows)    # all settings in one batch
    for i, row in enumerate(rows):
        want = reference_probs(logits[i], row.params)
        assert torch.equal(got[i] > 0, want > 0), row.params
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    # Each setting alone gives the same as in the mixed batch.
    for i in range(len(SETTINGS)):
        alone = sampler_probs(logits[i:i + 1].clone(), rows[i:i + 1])
        torch.testing.assert_close(alone[0], got[i], rtol=1e-6, atol=1e-7)


def test_masks_keep_what_they_should():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    assert (sampler_probs(logits, [Row(sampling(top_k=2))])[0] > 0).tolist() == [1, 1, 0, 0, 0, 0]
    # probs ~ [.64 .23 .09 .03 .01 .004]: 0.8 needs the first two
    assert (sampler_probs(logits, [Row(sampling(top_p=0.8))])[0] > 0).tolist() == [1, 1, 0, 0, 0, 0]
    assert (sampler_probs(logits, [Row(sampling(min_p=0.1))])[0] > 0).tolist() == [1, 1, 1, 0, 0, 0]


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB) * 2
    histories = [[5, 5, 9, 0, 63], [7], list(range(0, VOCAB, 3)) + [3, 3], [10, 11, 12]]
    penalties = [1.3, 0.7, 2.0, 1.0]
    rows = [Row(greedy(repetition_penalty=p), token_ids=h) for p, h in zip(penalties, histories)]
    scores = logits.clone()
    process_logits(scores, rows)
    for i, (p, h) in enumerate(zip(penalties, histories)):
        want = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), logits[i:i + 1].clone())[0]
        torch.testing.assert_close(scores[i], want, rtol=0, atol=0)
    assert not torch.equal(scores[0], logits[0])


# -- choosing ------------------------------------------------------------------------------------

def test_greedy_is_argmax_fast_path_and_with_processing():
    torch.manual_seed(2)
    logits = torch.randn(6, VOCAB)
    out = Sampler()(logits.clone(), [Row(greedy()) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs == [None] * 6
    out = Sampler()(logits.to(torch.bfloat16), [Row(greedy()) for _ in range(6)])
    assert out.token_ids == logits.to(torch.bfloat16).argmax(-1).tolist()
    # A penalty on the best token moves greedy to the runner-up (transformers semantics).
    best = logits[0].argmax().item()
    logits[0, best] = logits[0].max() + 0.01
    row = Row(greedy(repetition_penalty=100.0), token_ids=[best])
    assert Sampler()(logits.clone()[:1], [row]).token_ids == [logits[0].topk(2).indices[1].item()]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 40000
    for params in (sampling(), sampling(top_k=3), sampling(top_p=0.7)):
        torch.manual_seed(3)
        out = Sampler()(logits.repeat(n, 1), [Row(params) for _ in range(n)])
        freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / n
        want = reference_probs(logits, params)
        torch.testing.assert_close(freq, want, atol=0.01, rtol=0)


def test_seeded_rows_repeat_whatever_the_batch():
    torch.manual_seed(4)
    steps = [torch.randn(8, VOCAB) for _ in range(6)]
    for params in (sampling(top_k=20, temperature=1.5), sampling(top_p=0.95), sampling()):
        def run(position, companions):
            row = Row(params, generator=make_generator(1234, "cpu"))
            rows = companions[:position] + [row] + companions[position:]
            tokens = []
            for step in steps:
                logits = step[1:len(rows) + 1].clone()
                logits[position] = step[0]   # the seeded row's logits, whatever its place
                tokens.append(Sampler()(logits, rows).token_ids[position])
            return tokens

        alone = run(0, [])
        assert run(0, []) == alone
        others = [Row(sampling(top_k=40)), Row(greedy()), Row(sampling(top_p=0.5), generator=make_generator(9, "cpu")),
                  Row(sampling()), Row(sampling(top_k=3, min_p=0.2), generator=make_generator(1234, "cpu"))]
        assert run(2, others) == alone
        assert run(5, others) == alone
        # a different seed gives a different stream (else this test could not fail)
        other_seed = Row(params, generator=make_generator(4321, "cpu"))
        assert [Sampler()(s[:1].clone(), [other_seed]).token_ids[0] for s in steps] != alone


def test_mixed_batch_greedy_rows_take_argmax_and_sampled_rows_stay_in_their_masks():
    torch.manual_seed(5)
    logits = torch.randn(6, VOCAB) * 3
    rows = [Row(greedy()), Row(sampling(top_k=2)), Row(greedy(repetition_penalty=1.2)), Row(sampling(top_p=0.3)),
            Row(sampling(top_k=VOCAB + 5)), Row(sampling(min_p=0.5))]
    allowed = sampler_probs(logits.clone(), rows) > 0
    for _ in range(20):
        out = Sampler()(logits.clone(), rows).token_ids
        assert out[0] == logits[0].argmax().item()
        for i in (1, 3, 4, 5):
            assert allowed[i, out[i]]


# -- bans, min_new_tokens, processors ------------------------------------------------------------

def test_bad_token_ids_and_bad_words():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 10.0   # the favourite
    assert Sampler()(logits.clone(), [Row(greedy())]).token_ids == [7]
    assert Sampler()(logits.clone(), [Row(greedy(bad_token_ids=(7,)))]).token_ids != [7]
    assert Sampler()(logits.clone(), [Row(sampling(bad_token_ids=(7,)))]).token_ids != [7]

    word = greedy(bad_words_ids=((4, 5, 7),))
    # banned only right after 4, 5 were generated
    assert Sampler()(logits.clone(), [Row(word, token_ids=[1, 4, 5], num_output_tokens=2)]).token_ids != [7]
    assert Sampler()(logits.clone(), [Row(word, token_ids=[4, 5, 1], num_output_tokens=2)]).token_ids == [7]
    assert Sampler()(logits.clone(), [Row(word, token_ids=[9, 5], num_output_tokens=2)]).token_ids == [7]
    # 4 was in the prompt: not "just generated"
    assert Sampler()(logits.clone(), [Row(word, token_ids=[4, 5], num_output_tokens=1)]).token_ids == [7]


def test_min_new_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0   # EOS is the favourite
    params = greedy(min_new_tokens=3, stop_token_ids=(2, 9))
    assert Sampler()(logits.clone(), [Row(params, num_output_tokens=2)]).token_ids != [2]
    assert Sampler()(logits.clone(), [Row(params, num_output_tokens=3)]).token_ids == [2]
    logits[0, 9] = 9.0
    out = Sampler()(logits.clone(), [Row(sampling(top_k=2, min_new_tokens=1, stop_token_ids=(2, 9)))])
    assert out.token_ids[0] not in (2, 9)


def test_logits_processors_see_raw_scores_and_run_first():
    torch.manual_seed(6)
    logits = torch.randn(2, VOCAB)
    seen = []

    def prefer_11_then_12(token_ids, scores):
        seen.append((token_ids.tolist(), scores.clone()))
        scores = torch.full_like(scores, -30.0)
        scores[11], scores[12] = 5.0, 4.0
        return scores

    rows = [Row(greedy(logits_processors=(prefer_11_then_12,), repetition_penalty=10.0), token_ids=[3, 4, 11]),
            Row(sampling(top_k=5))]
    out = Sampler()(logits.clone(), rows)
    # the processor saw the raw row and every token so far ...
    assert seen[0][0] == [3, 4, 11] and torch.equal(seen[0][1], logits[0])
    # ... and the penalty came after it: 11 fell to 0.5, below 12
    assert out.token_ids[0] == 12
    rows[0] = Row(sampling(logits_processors=(prefer_11_then_12,), top_k=1000), token_ids=[3])
    assert {Sampler()(logits.clone(), rows).token_ids[0] for _ in range(20)} <= {11, 12}


# -- logprobs ------------------------------------------------------------------------------------

def test_logprobs_are_raw_top_k_plus_the_chosen_token():
    torch.manual_seed(7)
    logits = torch.randn(4, VOCAB) * 2
    raw = logits.log_softmax(-1)
    favourite = logits[0].argmax().item()
    rows = [Row(greedy(logprobs=3, bad_token_ids=(favourite,))), Row(greedy()),
            Row(sampling(logprobs=0, temperature=0.5, top_k=8)), Row(sampling(logprobs=5, top_p=0.9))]
    out = Sampler()(logits.clone(), rows)
    assert out.logprobs[1] is None
    chosen = out.token_ids[0]
    assert chosen != favourite   # banned, yet logprobs come from the raw logits
    top = raw[0].topk(3)
    want = {i: v for i, v in zip(top.indices.tolist(), top.values.tolist())}
    want[chosen] = raw[0, chosen].item()
    assert out.logprobs[0].keys() == want.keys()
    for token_id, value in want.items():
        assert out.logprobs[0][token_id] == pytest.approx(value, abs=1e-6)
    assert list(out.logprobs[2]) == [out.token_ids[2]]
    assert out.logprobs[2][out.token_ids[2]] == pytest.approx(raw[2, out.token_ids[2]].item(), abs=1e-6)
    assert set(raw[3].topk(5).indices.tolist()) <= set(out.logprobs[3]) and out.token_ids[3] in out.logprobs[3]


# -- on a GPU: same as on the CPU -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(8)
    logits = torch.randn(len(SETTINGS), VOCAB) * 3
    rows = [Row(sampling(**setting)) for setting in SETTINGS]
    torch.testing.assert_close(sampler_probs(logits.cuda(), rows).cpu(), sampler_probs(logits, rows),
                               rtol=1e-4, atol=1e-6)

    rows = [Row(greedy(repetition_penalty=1.3, bad_token_ids=(3,), logprobs=2), token_ids=[1, 5, 9]),
            Row(greedy(min_new_tokens=2, stop_token_ids=(int(logits[1].argmax()),))), Row(greedy())]
    on_cpu, on_cuda = Sampler()(logits[:3].clone(), rows), Sampler()(logits[:3].cuda(), rows)
    assert on_cuda.token_ids == on_cpu.token_ids
    assert on_cuda.logprobs[0].keys() == on_cpu.logprobs[0].keys()
    for token_id, value in on_cpu.logprobs[0].items():
        assert on_cuda.logprobs[0][token_id] == pytest.approx(value, abs=1e-5)

    for params in (sampling(top_k=20), sampling(top_p=0.9), sampling(min_p=0.1)):
        def run(companions):
            row = Row(params, generator=make_generator(77, "cuda"))
            batch = logits[:len(companions) + 1].cuda()
            batch[-1] = logits[0].cuda()
            return [Sampler()(batch.clone(), companions + [row]).token_ids[-1] for _ in range(8)]
        companions = [Row(sampling(top_k=5)), Row(greedy()), Row(sampling(), generator=make_generator(1, "cuda"))]
        assert run([]) == run(companions)


# -- from_generation_config ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_greedy_conversions(tok):
    for config in (GenerationConfig(), GenerationConfig(do_sample=True, temperature=0.0),
                   GenerationConfig(do_sample=True, top_k=1)):
        p = SamplingParams.from_generation_config(config, tok, [0], 32)
        assert p.greedy and p.is_plain_greedy
        assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 0, 1.0, 0.0)
    config = GenerationConfig(do_sample=False, repetition_penalty=1.2, min_new_tokens=4)
    p = SamplingParams.from_generation_config(config, tok, [0], 32)
    assert p.greedy and p.repetition_penalty == 1.2 and p.min_new_tokens == 4 and not p.is_plain_greedy


def test_sampling_conversions(tok):
    def processor(ids, scores):
        return scores

    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, random_seed=3,
                              logprobs=2, logits_processors=[processor], skip_special_tokens=False,
                              spaces_between_special_tokens=False, include_stop_str_in_output=True)
    p = SamplingParams.from_generation_config(config, tok, [0], 100)
    assert (p.greedy, p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (False, 0.7, 40, 0.9, 0.05, 3)
    assert (p.max_new_tokens, p.min_new_tokens, p.logprobs, p.logits_processors) == (100, 0, 2, (processor,))
    assert not p.skip_special_tokens and not p.spaces_between_special_tokens and p.include_stop_str_in_output
    assert p.stop_token_ids == (0,) and p.stop_strings == ()


def test_stop_and_bad_word_conversions(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert len(tok.encode("Observation:", add_special_tokens=False)) > 1
    config = GenerationConfig(stop_words=["<|im_end|>", "Observation:", "<|im_end|>"], stop_token_ids=[5, 0])
    p = SamplingParams.from_generation_config(config, tok, [0], 10)
    assert p.stop_token_ids == (0, 5, im_end)
    assert p.stop_strings == ("<|im_end|>", "Observation:")

    p = SamplingParams.from_generation_config(GenerationConfig(ignore_eos=True, stop_token_ids=[5]), tok, [0, 1], 10)
    assert p.stop_token_ids == (5,) and p.ignore_eos

    hello = tok.encode("Hello", add_special_tokens=False)
    space_hello = tok.encode(" Hello", add_special_tokens=False)
    multi = tok.encode("Observation:", add_special_tokens=False)
    assert len(hello) == 1
    p = SamplingParams.from_generation_config(GenerationConfig(bad_words=["Hello", "Observation:"], bad_token_ids=[9]),
                                              tok, [0], 10)
    assert p.bad_token_ids[:2] == (9, hello[0])
    assert tuple(multi) in p.bad_words_ids
    if len(space_hello) == 1:   # the mid-text form of the word is banned too
        assert space_hello[0] in p.bad_token_ids
