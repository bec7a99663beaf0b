"""The fields our models read from an HF ``config.json``, across transformers 4.x and 5.x spellings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: Optional[str]
    hf_config: Optional[dict] = None        # the whole config.json (a multimodal model reads its parts)
    disable_vision_encoder: bool = False    # build and load only its text model
    tp_rank: int = 0  # this process's rank in the tensor-parallel group
    tp_size: int = 1

    @property
    def local_num_kv_heads(self) -> int:
        """KV heads this rank holds: its share, or one replicated head when there are fewer than ranks."""
        return max(1, self.num_kv_heads // self.tp_size)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model to build")
        raw = cfg
        if isinstance(cfg.get("text_config"), dict):  # a vision-language model: the text model's fields
            cfg = {**cfg, **cfg["text_config"]}
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        num_heads = cfg["num_attention_heads"]
        return cls(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("bias", False))),
            dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            hf_config=raw,
        )
