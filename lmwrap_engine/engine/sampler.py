"""Batched next-token choice: logits processors, penalties and bans, then greedy or sampled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence

import torch

from .sampling_params import SamplingParams

NEG_INF = float("-inf")


class SampleRow(Protocol):
    params: SamplingParams
    token_ids: List[int]        # prompt (and history) + generated so far
    num_output_tokens: int
    generator: Optional[torch.Generator]
    # Optional: the request's xgrammar matcher when it has a response_format (rows may lack the attribute).
    matcher: object


@dataclass
class SamplerOutput:
    token_ids: List[int]
    # Per row: {token id: logprob} for the top ``params.logprobs`` tokens plus the chosen one, else None.
    logprobs: List[Optional[Dict[int, float]]]


def make_generator(seed: Optional[int], device) -> Optional[torch.Generator]:
    """A generator of its own for a seeded request, so its samples do not depend on its batch."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


class Sampler:
    """Chooses one token per row of ``logits`` [rows, vocab].

    Order (transformers'): logits processors -> repetition penalty -> bad ids / bad words ->
    ``min_new_tokens`` (stop ids masked) -> the grammar mask of rows with a ``matcher`` (it wins
    over the bans where they leave it nothing) -> argmax for greedy rows, else temperature ->
    top-k -> top-p -> min-p -> a draw with one uniform number from the row's generator (the global RNG
    when it has none), so a seeded row samples the same whatever else is in the batch.
    Logprobs come from the raw logits. ``logits`` may be modified in place. The host waits for
    the device once, to read the result.
    """

    # Inference mode: the model's logits are inference tensors, and fp32 ones are processed in place.
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> SamplerOutput:
        vocab_size = logits.shape[-1]
        banned = _banned_tokens(rows, vocab_size)
        guided = [i for i, r in enumerate(rows) if getattr(r, "matcher", None) is not None]
        if not banned and not guided and all(r.params.is_plain_greedy for r in rows):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        scores = logits.float()
        wants_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs = _select(scores, wants_logprobs, len(rows)).log_softmax(dim=-1) if wants_logprobs else None
        process_logits(scores, rows, banned)
        if guided:
            from ..guided import apply_grammar_masks
            # Rows whose bans or processors may leave no token the grammar allows.
            conflicts = {r for r, _ in banned} | {i for i in guided if rows[i].params.logits_processors}
            scores = apply_grammar_masks(scores, [rows[i].matcher for i in guided], guided,
                                         [i for i in guided if i in conflicts])
        token_ids = _choose(scores, rows)

        if logprobs is None:
            return SamplerOutput(token_ids.tolist(), [None] * len(rows))
        return _with_logprobs(token_ids, logprobs, rows, wants_logprobs)


# -- logits processing ------------------------------------------------------------------------

def process_logits(scores: torch.Tensor, rows: Sequence[SampleRow], banned: Optional[List[tuple]] = None) -> None:
    """In place on fp32 ``scores``: logits processors, repetition penalty, then bans (-inf)."""
    if banned is None:
        banned = _banned_tokens(rows, scores.shape[-1])
    _apply_logits_processors(scores, rows)
    _apply_repetition_penalty(scores, rows)
    if banned:
        row_idx, token_idx = zip(*banned)
        scores[_index(row_idx, scores.device), _index(token_idx, scores.device)] = NEG_INF


def _banned_tokens(rows: Sequence[SampleRow], vocab_size: int) -> List[tuple]:
    """(row, token) pairs that must not be chosen this step: bad ids, bad words, early stops."""
    banned = []
    for i, row in enumerate(rows):
        p = row.params
        tokens = list(p.bad_token_ids)
        for word in p.bad_words_ids:
            prefix = len(word) - 1
            if row.num_output_tokens >= prefix and tuple(row.token_ids[-prefix:]) == word[:-1]:
                tokens.append(word[-1])
        if row.num_output_tokens < p.min_new_tokens:
            tokens += p.stop_token_ids
        banned += [(i, t) for t in tokens if t < vocab_size]
    return banned


def _apply_logits_processors(scores: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    for i, row in enumerate(rows):
        if row.params.logits_processors:
            token_ids = torch.tensor(row.token_ids, dtype=torch.long, device=scores.device)
            row_scores = scores[i]
            for processor in row.params.logits_processors:
                row_scores = processor(token_ids, row_scores)
            scores[i] = row_scores


def _apply_repetition_penalty(scores: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """transformers' definition: a seen token's logit is divided by the penalty if > 0, else multiplied."""
    vocab_size = scores.shape[-1]
    penalized, pads = [], []
    for i, row in enumerate(rows):
        if row.params.repetition_penalty != 1.0 and row.token_ids and min(row.token_ids) < vocab_size:
            penalized.append(i)
            pads.append(min(row.token_ids))
    if not penalized:
        return
    width = max(len(rows[i].token_ids) for i in penalized)
    # Padding repeats a token of the row (so do ids the logits do not cover): a duplicate index
    # writes the same value again.
    padded = [rows[i].token_ids + [pad] * (width - len(rows[i].token_ids)) for i, pad in zip(penalized, pads)]
    token_idx = _index(padded, scores.device)
    pad_idx = _index(pads, scores.device).unsqueeze(1)
    token_idx = torch.where(token_idx < vocab_size, token_idx, pad_idx)
    row_idx = _index(penalized, scores.device).unsqueeze(1)
    penalty = _tensor([rows[i].params.repetition_penalty for i in penalized], scores.device).unsqueeze(1)
    seen = scores[row_idx, token_idx]
    scores[row_idx, token_idx] = torch.where(seen < 0, seen * penalty, seen / penalty)


# -- choosing ---------------------------------------------------------------------------------

def _choose(scores: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Each row by its own params (so a seeded row does not depend on the batch): greedy rows take
    the argmax; rows with top-k sample from their k best, rows with only top-p from the sorted
    vocab; the rest from the whole vocab, unsorted."""
    vocab_size = scores.shape[-1]
    groups = {"greedy": [], "top_k": [], "top_p": [], "vocab": []}
    for i, row in enumerate(rows):
        groups[_group(row.params, vocab_size)].append(i)
    token_ids = None
    for name, idx in groups.items():
        choose = _CHOOSERS[name]
        if len(idx) == len(rows):
            return choose(scores, rows)
        if idx:
            if token_ids is None:
                token_ids = torch.empty(len(rows), dtype=torch.long, device=scores.device)
            idx_t = _index(idx, scores.device)
            token_ids[idx_t] = choose(scores[idx_t], [rows[i] for i in idx])
    return token_ids


def _group(p: SamplingParams, vocab_size: int) -> str:
    if p.greedy:
        return "greedy"
    if 0 < p.top_k < vocab_size:
        return "top_k"
    return "top_p" if p.top_p < 1.0 else "vocab"


def _greedy(scores: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    return scores.argmax(dim=-1)


def _sample_sorted(scores: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    probs, candidates = sorted_probs(scores, rows)
    return candidates.gather(1, _draw(probs, rows).unsqueeze(1)).squeeze(1)


def _sample_vocab(scores: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    return _draw(vocab_probs(scores, rows), rows)


_CHOOSERS = {"greedy": _greedy, "top_k": _sample_sorted, "top_p": _sample_sorted, "vocab": _sample_vocab}


def sorted_probs(scores: torch.Tensor, rows: Sequence[SampleRow]):
    """(unnormalised probs [rows, n] best first, their token ids) after temperature, top-k, top-p, min-p.

    Only the largest top-k of the rows is sorted (the whole vocab if a row has top-p but no top-k),
    so top-p, min-p and the draw see k candidates, not the vocab. Exactly k candidates are kept;
    transformers also keeps tokens tied with the k-th.
    """
    vocab_size = scores.shape[-1]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab_size else vocab_size for r in rows]
    width = max(ks)
    if width < vocab_size:
        logits, candidates = scores.topk(width, dim=-1)
    else:
        logits, candidates = scores.sort(dim=-1, descending=True)
    if min(ks) < width:
        rank = torch.arange(width, device=scores.device)
        logits = logits.masked_fill(rank >= _index(ks, scores.device).unsqueeze(1), NEG_INF)
    probs = _probs(logits, rows)
    if any(r.params.top_p < 1.0 for r in rows):
        # Keep the smallest set whose mass reaches top_p: a token goes when the mass before it does.
        # top_p == 1 removes nothing, even where the float cumsum reaches 1 early.
        top_p = _tensor([r.params.top_p if r.params.top_p < 1.0 else 2.0 for r in rows], scores.device)
        mass_before = probs.cumsum(dim=-1) - probs
        probs.masked_fill_(mass_before >= top_p.unsqueeze(1), 0.0)
    _apply_min_p(probs, rows)
    return probs, candidates


def vocab_probs(scores: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Unnormalised probs [rows, vocab] after temperature and min-p (rows without top-k and top-p)."""
    probs = _probs(scores, rows)
    _apply_min_p(probs, rows)
    return probs


def _probs(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    temperatures = [r.params.temperature for r in rows]
    if any(t != 1.0 for t in temperatures):
        logits = logits / _tensor(temperatures, logits.device).unsqueeze(1)
    return logits.softmax(dim=-1)


def _apply_min_p(probs: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """Zero tokens below min_p x the best token's probability (scale-free: no renormalising needed)."""
    min_p = [r.params.min_p for r in rows]
    if any(m > 0.0 for m in min_p):
        threshold = _tensor(min_p, probs.device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs.masked_fill_(probs < threshold, 0.0)


def _draw(probs: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """One column per row, with chance proportional to probs (inverse CDF, one uniform per row)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    chosen = torch.searchsorted(cdf, _uniform(rows, probs.device).unsqueeze(1) * total, right=True)
    # u * total can round up to total: fall back to the last column that has probability.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(chosen, last).squeeze(1)


def _uniform(rows: Sequence[SampleRow], device) -> torch.Tensor:
    """U[0, 1) per row: seeded rows draw one number from their own generator, the rest share the global RNG."""
    u = torch.rand(len(rows), device=device)
    for i, row in enumerate(rows):
        if row.generator is not None:
            u[i:i + 1].uniform_(generator=row.generator)
    return u


# -- logprobs ---------------------------------------------------------------------------------

def _with_logprobs(token_ids: torch.Tensor, logprobs: torch.Tensor, rows: Sequence[SampleRow],
                   wants: List[int]) -> SamplerOutput:
    num_top = min(max(rows[i].params.logprobs for i in wants), logprobs.shape[-1])
    chosen = _select(token_ids, wants, len(rows)).unsqueeze(1)
    parts = [token_ids.double(), logprobs.gather(1, chosen).squeeze(1).double()]
    if num_top:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        parts += [top_values.double().flatten(), top_ids.double().flatten()]
    flat = torch.cat(parts).tolist()   # the one host sync

    num_rows, num_wants = len(rows), len(wants)
    out_ids = [int(t) for t in flat[:num_rows]]
    chosen_lp = flat[num_rows:num_rows + num_wants]
    top_values = flat[num_rows + num_wants:num_rows + num_wants * (1 + num_top)]
    top_ids = flat[num_rows + num_wants * (1 + num_top):]
    out_logprobs: List[Optional[Dict[int, float]]] = [None] * num_rows
    for j, i in enumerate(wants):
        k = min(rows[i].params.logprobs, num_top)
        entry = {int(top_ids[j * num_top + n]): top_values[j * num_top + n] for n in range(k)}
        entry[out_ids[i]] = chosen_lp[j]
        out_logprobs[i] = entry
    return SamplerOutput(out_ids, out_logprobs)


# -- helpers ----------------------------------------------------------------------------------

def _select(tensor: torch.Tensor, idx: List[int], num_rows: int) -> torch.Tensor:
    return tensor if len(idx) == num_rows else tensor[_index(idx, tensor.device)]


def _index(values, device) -> torch.Tensor:
    # non_blocking: a host-to-device copy must not wait for the queued forward pass.
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _tensor(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
