"""Architecture name (``config.json`` ``architectures[0]``) -> model class."""
from __future__ import annotations

from torch import nn

from .config import ModelArgs
from .internlm2 import InternLM2ForCausalLM
from .llama import LlamaForCausalLM
from .llava import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from .qwen2 import Qwen2ForCausalLM
from .qwen2_vl import Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
from .qwen3 import Qwen3ForCausalLM

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}


def build_model(args: ModelArgs) -> nn.Module:
    cls = MODEL_CLASSES.get(args.architecture)
    if cls is None:
        raise NotImplementedError(f"architecture {args.architecture!r} is not supported; "
                                  f"supported: {', '.join(sorted(MODEL_CLASSES))}")
    return cls(args)
