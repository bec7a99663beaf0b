"""Architecture -> its prompt encoder (imported lazily: most models take no images)."""
from __future__ import annotations

import importlib

VL_PROCESSORS = {
    "LlavaForConditionalGeneration": "lmwrap_engine.vl.llava:LlavaProcessor",
    "LlavaNextForConditionalGeneration": "lmwrap_engine.vl.llava:LlavaNextProcessor",
    "Qwen2VLForConditionalGeneration": "lmwrap_engine.vl.qwen2_vl:Qwen2VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "lmwrap_engine.vl.qwen2_vl:Qwen2VLProcessor",
}


def is_vision_model(architecture: str) -> bool:
    return architecture in VL_PROCESSORS


def build_processor(architecture: str, model_dir: str, tokenizer, hf_config: dict):
    """The ``VisionProcessor`` of a vision-language architecture."""
    module, name = VL_PROCESSORS[architecture].split(":")
    return getattr(importlib.import_module(module), name)(model_dir, tokenizer, hf_config)
