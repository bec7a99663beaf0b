"""LLaVA 1.5 and LLaVA-NeXT prompt encoding (transformers' ``LlavaProcessor`` / ``LlavaNextProcessor``)."""
from __future__ import annotations

from typing import Dict, List

import torch

from .processor import VisionProcessor


class LlavaProcessor(VisionProcessor):
    def image_token_id(self) -> int:
        return self.hf_config.get("image_token_index", self.hf_config.get("image_token_id"))


class LlavaNextProcessor(LlavaProcessor):
    def split_pixel_inputs(self, out, num_images: int) -> List[Dict[str, torch.Tensor]]:
        # pixel_values is padded to the most tiles of the batch: keep each image's own tiles.
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        items = []
        for i in range(num_images):
            size = out["image_sizes"][i]
            n = image_size_to_num_patches(size.tolist(), self.hf_config["image_grid_pinpoints"],
                                          self.hf_config["vision_config"]["image_size"])
            items.append({"pixel_values": out["pixel_values"][i, :n].contiguous(),
                          "image_sizes": out["image_sizes"][i:i + 1]})
        return items

    def num_image_tokens(self, out, num_images: int) -> List[int]:
        proc = self.processor
        crop = proc.image_processor.crop_size
        height, width = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2
        drop_cls = 1 if proc.vision_feature_select_strategy == "default" else 0
        return [proc._get_number_of_features(h, w, height, width) - drop_cls for h, w in out["image_sizes"].tolist()]
