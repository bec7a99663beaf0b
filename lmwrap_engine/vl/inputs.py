"""The model runner's multimodal step: image embeddings (encoded once per image and kept on its item)
placed where the images sit, and M-RoPE positions for models that use them.

A sequence's token ids hold *pad ids* (``>= vocab_size``, derived from the image's content hash) at its
images' placeholder positions, so the prefix cache tells images apart; they never reach the embedding.
"""
from __future__ import annotations

from typing import List, Tuple

import torch


def pad_id(vocab_size: int, content_hash: int) -> int:
    """The token id a sequence holds at each placeholder position of an image."""
    return vocab_size + content_hash


def mrope_positions(seq, start: int, end: int) -> torch.Tensor:
    """``[3, end - start]`` M-RoPE positions of ``seq``'s tokens ``start:end``: a text token at index p sits at
    ``p`` plus the shifts of the items before it (all three rows equal); an item's tokens at its start
    position plus their own (t, h, w) offsets."""
    pos = torch.arange(start, end, dtype=torch.int64).expand(3, -1).clone()
    shift = 0
    for it in seq.mm_items:
        if it.offset >= end:
            break
        lo, hi = max(start, it.offset), min(end, it.end)
        if lo < hi:
            rel = it.mrope_positions[:, lo - it.offset:hi - it.offset].to(torch.int64)
            pos[:, lo - start:hi - start] = it.offset + shift + rel
        after = max(start, it.end)
        if after < end:
            pos[:, after - start:] += it.mrope_delta
        shift += it.mrope_delta
    return pos


def multimodal_inputs(model, batch, input_ids: torch.Tensor, positions: torch.Tensor,
                      vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, input_embeds, positions)`` of a step in which some sequence has images.

    Items of this step's chunks that have no embeddings yet are encoded, all in one call, and keep them:
    later chunks and a recompute after preemption reuse them; tokens the prefix cache held need none.
    """
    spans: List[tuple] = []  # (row in the step, item, first item token, end item token)
    pending = {}
    row = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        for it in seq.mm_items:
            lo, hi = max(start, it.offset), min(end, it.end)
            if lo < hi:
                if it.embeds is None:
                    pending[id(it)] = it
                spans.append((row + lo - start, it, lo - it.offset, hi - it.offset))
        row += n
    if pending:
        items = list(pending.values())
        for it, emb in zip(items, model.encode_images(items)):
            if emb.shape[0] != it.length:
                raise RuntimeError(f"the vision encoder gave {emb.shape[0]} embeddings for an image with "
                                   f"{it.length} placeholder tokens")
            it.embeds = emb
    ids = torch.where(input_ids < vocab_size, input_ids, torch.zeros_like(input_ids))
    embeds = model.embed_input_ids(ids)
    for r, it, a, b in spans:
        embeds[r:r + b - a] = it.embeds[a:b].to(embeds.dtype)
    if getattr(model, "uses_mrope", False):
        positions = torch.cat([mrope_positions(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
                               for seq, n in zip(batch.seqs, batch.num_new_tokens)], 1).to(positions.device)
    return ids, embeds, positions


def attach_items(seq, input_ids: List[int], items: list, vocab_size: int) -> Tuple[List[int], List[int]]:
    """Adds a turn's images to ``seq`` (offsets made absolute; items a rewound session dropped are gone);
    returns the turn's ids with pad ids at the placeholders, and the prompt's real ids for the detokenizer."""
    base = seq.num_tokens
    kept = [it for it in seq.mm_items if it.offset < base]
    ids = list(input_ids)
    for it in items:
        if not 0 <= it.offset < it.end <= len(ids):
            raise ValueError(f"an image's placeholder tokens {it.offset}:{it.end} are outside the prompt")
        ids[it.offset:it.end] = [pad_id(vocab_size, it.content_hash)] * it.length
        kept.append(it.shifted(base))
    seq.mm_items = kept
    seq.mrope_delta = sum(it.mrope_delta for it in kept)
    prompt_ids = [t for t in seq.token_ids if t < vocab_size] + list(input_ids)
    return ids, prompt_ids
