"""Qwen2-VL / Qwen2.5-VL prompt encoding: transformers' ``Qwen2VLImageProcessor`` (dynamic resolution)
for the pixels, and the placeholder expansion ``Qwen2VLProcessor`` does (each ``<|image_pad|>`` repeated
``t*h*w / merge**2`` times). ``Qwen2VLProcessor`` itself is not used: it also builds a video processor,
which needs torchvision; the image half is all we need and is exactly transformers'."""
from __future__ import annotations

from typing import List, Tuple

from ..models.qwen2_vl import mrope_positions
from .items import IMAGE_TOKEN, MultimodalItem, content_hash, split_runs
from .processor import VisionProcessor

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


class Qwen2VLProcessor(VisionProcessor):
    image_text = VISION_START + IMAGE_PAD + VISION_END

    def __init__(self, model_dir: str, tokenizer, hf_config: dict):
        from transformers import AutoImageProcessor
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.merge_size = (hf_config.get("vision_config") or {}).get("spatial_merge_size", 2)

    def place_images(self, text: str, num_images: int) -> str:
        # lmdeploy's Qwen2-VL rule and transformers' template for [image, ..., text]: images first, no newline.
        if IMAGE_TOKEN in text:
            return text
        return IMAGE_TOKEN * num_images + text

    def image_token_id(self) -> int:
        return self.hf_config.get("image_token_id", self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))

    def encode(self, prompt: str, images: list, add_special_tokens: bool) -> Tuple[List[int], List[MultimodalItem]]:
        # Qwen's own placeholder (what its HF chat template writes for an image part) counts as one too.
        prompt = prompt.replace(VISION_START + IMAGE_PAD + VISION_END, IMAGE_TOKEN)
        count = prompt.count(IMAGE_TOKEN)
        if count != len(images):
            raise ValueError(f"the prompt places {count} images ({IMAGE_TOKEN!r}) but {len(images)} were given")
        if not images:
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), []
        # A template (or user) that already wraps the placeholder in vision_start/end keeps one pair.
        prompt = prompt.replace(VISION_START + IMAGE_TOKEN + VISION_END, IMAGE_TOKEN)
        try:
            out = self.image_processor(images=list(images), return_tensors="pt")
        except ValueError as e:  # e.g. an aspect ratio over 200: name the images, not just the rule
            sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
            raise ValueError(f"the image processor refused an image ({e}); image sizes: {sizes}") from e
        grids = out["image_grid_thw"]
        lengths = [int(g.prod()) // self.merge_size ** 2 for g in grids]
        pieces = prompt.split(IMAGE_TOKEN)
        text = pieces[0] + "".join(VISION_START + IMAGE_PAD * n + VISION_END + rest
                                   for n, rest in zip(lengths, pieces[1:]))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        token_id = self.image_token_id()
        offsets = split_runs(ids, token_id, lengths)
        items, start = [], 0
        for i, (offset, length) in enumerate(zip(offsets, lengths)):
            n = length * self.merge_size ** 2
            pix = {"pixel_values": out["pixel_values"][start:start + n], "image_grid_thw": grids[i:i + 1]}
            start += n
            rel, nxt = mrope_positions([token_id] * length, grids[i:i + 1].tolist(), token_id, self.merge_size)
            items.append(MultimodalItem(offset, length, pix, content_hash(*pix.values()),
                                        mrope_positions=rel, mrope_delta=nxt - length))
        return ids, items
