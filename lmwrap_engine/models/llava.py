"""LLaVA 1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``,
any-resolution tiling): a CLIP vision tower and an MLP projector feeding a Llama-family text model.

Weights load from both HF layouts: llava-hf's (``language_model.model.*``, ``vision_tower.*``,
``multi_modal_projector.*``) and transformers 5's (``model.language_model.*``, ``model.vision_tower.*``,
``lm_head.*``). With ``disable_vision_encoder`` only the text model is built and loaded.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPVisionModel
from .config import ModelArgs
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM

_TEXT_MODELS = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
_PROJ_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
              "relu": F.relu}


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = _PROJ_ACTS[act]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _rename(name: str) -> str:
    """A checkpoint name in either HF layout -> ours (the llava-hf layout)."""
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]  # transformers 5 drops the level
    return name


class LlavaForConditionalGeneration(nn.Module):
    is_multimodal = True
    uses_mrope = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        cfg = args.hf_config
        self.args = args
        text_type = cfg.get("text_config", {}).get("model_type", "llama")
        if text_type not in _TEXT_MODELS:
            raise NotImplementedError(f"LLaVA with a {text_type!r} text model is not supported "
                                      f"(supported: {', '.join(_TEXT_MODELS)})")
        self.language_model = _TEXT_MODELS[text_type](replace(args, architecture=text_type))
        self.has_vision = not args.disable_vision_encoder
        if self.has_vision:
            vcfg = cfg["vision_config"]
            layer = cfg.get("vision_feature_layer", -2)
            self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
            self.select_strategy = cfg.get("vision_feature_select_strategy", "default")
            self.vision_tower = CLIPVisionModel(vcfg)
            self.multi_modal_projector = LlavaMultiModalProjector(
                vcfg["hidden_size"] * len(self.feature_layers), args.hidden_size,
                cfg.get("projector_hidden_act", "gelu"), cfg.get("multimodal_projector_bias", True))

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, input_embeds=None) -> torch.Tensor:
        return self.language_model(input_ids, positions, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    # -- images -----------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features ``[num_tiles, tokens, hidden]`` of ``[num_tiles, 3, H, W]`` pixels."""
        states = self.vision_tower.vision_model.hidden_states(pixel_values, self.feature_layers)
        feats = torch.cat(states, -1)
        if self.select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def encode_images(self, items) -> List[torch.Tensor]:
        """Vision tower and projector, all images in one batch; ``[length, hidden]`` per item."""
        if not self.has_vision:
            raise RuntimeError("the vision encoder is disabled (disable_vision_encoder=True)")
        pixels = torch.cat([it.pixel_inputs["pixel_values"] for it in items]).to(self._device())
        feats = self.image_features(pixels)
        return [f.reshape(-1, f.shape[-1]) for f in feats.split([it.pixel_inputs["pixel_values"].shape[0]
                                                                   for it in items])]

    def _device(self):
        return self.multi_modal_projector.linear_1.weight.device

    # -- weights ----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Text weights through the text model's loader (its checks); vision ones by name, all required."""
        params = dict(self.named_parameters())
        loaded = set()

        def text_weights():
            for name, tensor in weights:
                name = _rename(name)
                if name.startswith("language_model."):
                    yield name[len("language_model."):], tensor
                    continue
                if not self.has_vision or name.endswith("position_ids"):
                    continue
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                dest = params[name].data
                if dest.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                dest.copy_(tensor)
                loaded.add(name)

        self.language_model.load_weights(text_weights())
        missing = sorted(n for n in params if not n.startswith("language_model.") and n not in loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} vision tensors, e.g. {missing[:3]}")


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        if self.has_vision:
            self.image_newline = nn.Parameter(torch.empty(args.hidden_size))

    def encode_images(self, items) -> List[torch.Tensor]:
        if not self.has_vision:
            raise RuntimeError("the vision encoder is disabled (disable_vision_encoder=True)")
        pixels = torch.cat([it.pixel_inputs["pixel_values"] for it in items]).to(self._device())
        feats = self.image_features(pixels).split([it.pixel_inputs["pixel_values"].shape[0] for it in items])
        return [self._pack(f, it.pixel_inputs["image_sizes"][0]) for f, it in zip(feats, items)]

    def _pack(self, feats: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """transformers' ``pack_image_features`` ("spatial_unpad"): the base tile, then the tiles' grid with
        the padding cut off and a newline embedding closing each row."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
        cfg = self.args.hf_config
        base, tiles = feats[0], feats[1:]
        if tiles.shape[0] == 0:
            return torch.cat([base, self.image_newline[None].to(base)], 0)
        side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
        rows, cols = get_anyres_image_grid_shape(image_size.tolist(), cfg["image_grid_pinpoints"],
                                                 cfg["vision_config"]["image_size"])
        grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, image_size.tolist())
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
        grid = torch.cat([grid, newline], -1).flatten(1, 2).transpose(0, 1)
        return torch.cat([base, grid], 0)
