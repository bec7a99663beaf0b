"""Tiny random vision-language models (LLaVA 1.5, LLaVA-NeXT) in the HF layout, built on the spot, and images."""
from __future__ import annotations

import os

import numpy as np
import torch

from tiny_models import tiny_tokenizer_dir

IMAGE_TOKEN = "<image>"
# The chat template llava-hf ships for llava-1.5 (a "USER: <image>\n... ASSISTANT:" layout).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_image(seed: int, size=(40, 30)):
    """A random RGB PIL image (``size`` is (width, height))."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _tokenizer(root: str):
    from transformers import AutoTokenizer
    path = os.path.join(root, "vl-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(root))
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _widen(model) -> None:
    with torch.no_grad():  # HF's init is small; widen it so logits are not all near-ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.05)
            elif p.dim() > 1:
                p.normal_(0, 0.2 if "language_model" in name or "projector" in name else 0.08)
            else:
                p.normal_(0, 0.02)


def _configs(tokenizer, image_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    return vision, text


def build_tiny_llava(root: str, seed: int = 0, next_: bool = False, feature_layer=-2, strategy: str = "default") -> str:
    """LLaVA 1.5 (``next_=False``: a 32px image in 8px patches -> 16 tokens) or LLaVA-NeXT (any-resolution
    tiling over 32px tiles) with a tiny CLIP tower and a tiny Llama; returns the folder."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor,
                              LlavaProcessor)
    layers = "_".join(str(x) for x in (feature_layer if isinstance(feature_layer, list) else [feature_layer]))
    tag = "" if (feature_layer, strategy) == (-2, "default") else f"-{strategy}{layers}"
    path = os.path.join(root, f"{'llava-next' if next_ else 'llava'}{tag}-s{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = _tokenizer(root)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    image_size = 32
    vision, text = _configs(tokenizer, image_size)
    torch.manual_seed(seed)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    if next_:
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                 image_grid_pinpoints=pinpoints, vision_feature_layer=feature_layer,
                                 vision_feature_select_strategy=strategy)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                       vision_feature_select_strategy=strategy, chat_template=LLAVA_TEMPLATE,
                                       num_additional_image_tokens=1)
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                             vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(size=size, crop_size=crop)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy=strategy, chat_template=LLAVA_TEMPLATE,
                                       num_additional_image_tokens=1)
    _widen(model)
    model = model.float()
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def load_reference(path: str):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, torch_dtype=torch.float32).eval()


def load_processor(path: str):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(path)
