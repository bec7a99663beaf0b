"""Prompt encoding for vision-language models: chat-templated text with ``IMAGE_TOKEN`` per image, plus the
images, to token ids and one ``MultimodalItem`` per image. Image preprocessing (resizing, tiling, token
counts) is transformers' own processor's."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .items import IMAGE_TOKEN, MultimodalItem, content_hash, placeholder_runs, split_runs


class VisionProcessor:
    """Base of a model family's prompt encoder (see notes/vl_contract.md for the contract)."""

    #: the model's own image placeholder in prompt text (what ``IMAGE_TOKEN`` becomes)
    image_text = "<image>"

    def __init__(self, model_dir: str, tokenizer, hf_config: dict):
        from transformers import AutoProcessor
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.processor = AutoProcessor.from_pretrained(model_dir)

    def place_images(self, text: str, num_images: int) -> str:
        """A user message's text with its images: lmdeploy's rule, one ``IMAGE_TOKEN`` line per image first,
        unless the text already places them."""
        if IMAGE_TOKEN in text:
            return text
        return f"{IMAGE_TOKEN}\n" * num_images + text

    def encode(self, prompt: str, images: list, add_special_tokens: bool) -> Tuple[List[int], List[MultimodalItem]]:
        count = prompt.count(IMAGE_TOKEN)
        if count != len(images):
            raise ValueError(f"the prompt places {count} images ({IMAGE_TOKEN!r}) but {len(images)} were given")
        if not images:
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return ids, []
        text = prompt.replace(IMAGE_TOKEN, self.image_text)
        out = self.processor(text=[text], images=list(images), return_tensors="pt",
                             add_special_tokens=add_special_tokens)
        ids = out["input_ids"][0].tolist()
        per_image = self.split_pixel_inputs(out, len(images))
        token_id = self.image_token_id()
        runs = placeholder_runs(ids, token_id)
        if len(runs) == len(images):
            spans = runs
        else:  # adjacent images: one run, cut by each image's own token count
            lengths = self.num_image_tokens(out, len(images))
            spans = list(zip(split_runs(ids, token_id, lengths), lengths))
        items = [MultimodalItem(offset, length, pix, content_hash(*pix.values()))
                 for (offset, length), pix in zip(spans, per_image)]
        return ids, items

    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_text)

    def split_pixel_inputs(self, out, num_images: int) -> List[Dict[str, torch.Tensor]]:
        """One dict of tensors per image from the processor's batched output."""
        return [{"pixel_values": out["pixel_values"][i:i + 1]} for i in range(num_images)]

    def num_image_tokens(self, out, num_images: int) -> List[int]:
        """Placeholder tokens of each image (needed only when images sit next to each other)."""
        total = sum(1 for t in out["input_ids"][0].tolist() if t == self.image_token_id())
        return [total // num_images] * num_images
