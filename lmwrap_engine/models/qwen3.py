"""Qwen3: Llama with per-head RMSNorm on q and k before the rotary embedding."""
from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
