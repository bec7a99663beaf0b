"""Qwen2-VL / Qwen2.5-VL: a ViT with 2-D rotary and a 2x2 patch merger, and a Qwen2 text model whose
rotary runs over three position rows (temporal, height, width: M-RoPE).

Image tokens sit in the prompt as ``<|vision_start|><|image_pad|> * n <|vision_end|>``; their
positions come from :func:`mrope_positions` (the equivalent of transformers' ``get_rope_index``):
text continues one past the largest position used so far, an image's tokens take its merged
``(t, h, w)`` grid offset by the position where it starts. Tokens after the last image (and every
decode token) have the same value ``index + delta`` in all three rows, so decode needs one
1-D position per token like any text model.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .llama import LlamaModel

import kernels


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def mrope_section_of(cfg: dict) -> List[int]:
    """``mrope_section`` from ``text_config.rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x)."""
    for scope in (cfg.get("text_config") or {}, cfg):
        for key in ("rope_parameters", "rope_scaling"):
            section = (scope.get(key) or {}).get("mrope_section")
            if section:
                return list(section)
    raise ValueError("Qwen2-VL config has no mrope_section in rope_parameters / rope_scaling")


# ---------------------------------------------------------------------------------------------
# M-RoPE positions
# ---------------------------------------------------------------------------------------------

def image_num_tokens(grid_thw: Sequence[int], spatial_merge_size: int) -> int:
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (spatial_merge_size ** 2)


def mrope_positions(token_ids: Sequence[int], image_grids: Sequence[Sequence[int]], image_token_id: int,
                    spatial_merge_size: int, start: int = 0) -> Tuple[torch.Tensor, int]:
    """Positions ``[3, len(token_ids)]`` of a token run whose first token sits at position ``start``
    (text continues from there), and the position the next token takes (max used + 1).

    Each maximal run of ``image_token_id`` belongs to the next grid of ``image_grids`` (in order) and
    must hold exactly that image's ``t*h*w / merge**2`` tokens.
    """
    n = len(token_ids)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    out = torch.empty(3, n, dtype=torch.long)
    is_image = (ids == image_token_id).tolist()
    grids = iter(image_grids)
    pos, i, top = start, 0, start - 1
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            out[:, i:j] = torch.arange(pos, pos + j - i)
            pos += j - i
            top = max(top, pos - 1)
            i = j
            continue
        grid = next(grids, None)
        if grid is None:
            raise ValueError("the prompt has more image placeholder runs than images")
        t, h, w = int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size
        count = t * h * w
        if i + count > n or not all(is_image[i:i + count]) or (i + count < n and is_image[i + count]):
            raise ValueError(f"image placeholder run at token {i} does not hold the image's {count} tokens")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[:, i:i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
        top = max(top, int(out[:, i:i + count].max()))
        pos += max(h, w)  # as transformers: text after an image continues at its start + max(h, w)
        i += count
    if next(grids, None) is not None:
        raise ValueError("more images than image placeholder runs in the prompt")
    return out, max(pos, top + 1)


class MRotaryEmbedding(nn.Module):
    """cos/sin ``[T, head_dim // 2]`` from positions ``[3, T]`` (or ``[T]``, the same in every row):
    frequency ``j`` takes its angle from row ``r`` where ``j`` falls in section ``r`` of ``mrope_section``,
    which is what transformers does before duplicating halves (neox layout), so the usual rotary kernel applies."""

    def __init__(self, head_dim: int, base: float, mrope_section: Sequence[int]):
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.base = base
        # Plain lists: the model is built on the meta device, tensors are made where first used.
        self.row_of = [r for r, n in enumerate(mrope_section) for _ in range(n)]
        self._inv_freq: dict = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        device = positions.device
        if device not in self._inv_freq:
            inv = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
            self._inv_freq[device] = (inv.to(device), torch.tensor(self.row_of, device=device))
        inv_freq, row_of = self._inv_freq[device]
        if positions.dim() == 1:
            freqs = positions.float()[:, None] * inv_freq
        else:
            freqs = positions[row_of].t().float() * inv_freq  # [T, D/2]: column j from row row_of[j]
        return freqs.cos().to(dtype).contiguous(), freqs.sin().to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------

class VisionRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu, "silu": F.silu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _act(name: str):
    if name not in _ACTS:
        raise NotImplementedError(f"vision activation {name!r} is not supported ({', '.join(_ACTS)} are)")
    return _ACTS[name]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        k = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The stride equals the kernel: the conv is one matmul over each flattened patch.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, cu_seqlens: List[int]):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = kernels.apply_rotary(q.contiguous(), k.contiguous(), cos, sin)
        return self.proj(segment_attention(q, k, v.contiguous(), cu_seqlens).reshape(n, -1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: List[int]) -> torch.Tensor:
    """Bidirectional attention within each segment ``cu_seqlens[i]:cu_seqlens[i+1]`` of ``q/k/v [N, H, D]``.
    Segments of equal length (the windows of Qwen2.5-VL, same-size images) run as one batched call."""
    out = torch.empty_like(q)
    by_len: dict = {}
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if e > s:
            by_len.setdefault(e - s, []).append(s)
    for n, starts in by_len.items():
        idx = (torch.tensor(starts)[:, None] + torch.arange(n)).to(q.device)  # [S, n]
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [S, H, n, D]
        out[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


class VisionMlp(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _act(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMlp(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = _act(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, rms: bool):
        super().__init__()
        self.norm1 = VisionRMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = VisionRMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, context_dim: int, merge: int, rms: bool):
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = VisionRMSNorm(context_dim) if rms else nn.LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class VisionTransformer(nn.Module):
    """``pixel_values [num_patches, C * tp * p * p]`` (as the image processor emits them, patches of each
    2x2 merge window adjacent) and ``grid_thw`` per image -> ``[num_patches / merge**2, text hidden]``."""

    def __init__(self, vcfg: dict, text_hidden: int, qwen25: bool):
        super().__init__()
        self.qwen25 = qwen25
        self.merge = vcfg.get("spatial_merge_size", 2)
        self.patch_size = vcfg.get("patch_size", 14)
        if qwen25:
            dim, out_dim = vcfg["hidden_size"], vcfg.get("out_hidden_size", text_hidden)
            self.window_size = vcfg.get("window_size", 112)
            self.fullatt_block_indexes = set(vcfg.get("fullatt_block_indexes", ()))
        else:
            dim, out_dim = vcfg["embed_dim"], vcfg.get("hidden_size", text_hidden)
        heads = vcfg["num_heads"]
        self.head_dim = dim // heads
        self.rope_theta = (vcfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        self.patch_embed = PatchEmbed(self.patch_size, vcfg.get("temporal_patch_size", 2),
                                      vcfg.get("in_channels", 3), dim)
        act = vcfg.get("hidden_act", "silu" if qwen25 else "quick_gelu")

        def mlp():
            if qwen25:
                return VisionGatedMlp(dim, vcfg["intermediate_size"], act)
            return VisionMlp(dim, int(dim * vcfg.get("mlp_ratio", 4)), act)

        self.blocks = nn.ModuleList(VisionBlock(dim, heads, mlp(), qwen25) for _ in range(vcfg["depth"]))
        self.merger = PatchMerger(out_dim, dim, self.merge, qwen25)

    def _rotary(self, grids: List[Tuple[int, int, int]], device):
        m = self.merge
        rows = []
        for t, h, w in grids:
            hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            hw = torch.stack([hp.reshape(shape).transpose(1, 2).flatten(),
                              wp.reshape(shape).transpose(1, 2).flatten()], -1)
            rows.append(hw.repeat(t, 1))
        pos = torch.cat(rows).to(device)
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, head_dim/2]: h freqs, then w
        return freqs.cos(), freqs.sin()

    def _windows(self, grids):
        """Qwen2.5-VL: the merge-unit order that groups each window together, and the window boundaries."""
        m = self.merge
        win = self.window_size // m // self.patch_size
        index, cu, base = [], [0], 0
        for t, h, w in grids:
            gh, gw = h // m, w // m
            idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
            ph, pw = -gh % win, -gw % win
            idx = F.pad(idx, (0, pw, 0, ph), value=-1)
            nh, nw = (gh + ph) // win, (gw + pw) // win
            idx = idx.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
            for window in idx.reshape(-1, win * win):
                keep = window[window >= 0]
                if len(keep):
                    index.append(keep + base)
                    cu.append(cu[-1] + len(keep) * m * m)
            base += t * gh * gw
        return torch.cat(index), cu

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in grid_thw]
        x = self.patch_embed(pixel_values)
        cos, sin = self._rotary(grids, x.device)
        cu_full = [0]  # full attention stays within each frame of each image
        for t, h, w in grids:
            for _ in range(t):
                cu_full.append(cu_full[-1] + h * w)
        window_index = None
        if self.qwen25:
            window_index, cu_win = self._windows(grids)
            unit = self.merge ** 2
            order = (window_index[:, None] * unit + torch.arange(unit)).flatten().to(x.device)
            x, cos, sin = x[order], cos[order], sin[order]
        cos, sin = cos.contiguous(), sin.contiguous()  # fp32 angles, as transformers
        for i, blk in enumerate(self.blocks):
            full = not self.qwen25 or i in self.fullatt_block_indexes
            x = blk(x, cos, sin, cu_full if full else cu_win)
        out = self.merger(x)
        if window_index is not None:
            out = out[torch.argsort(window_index).to(out.device)]
        return out


# ---------------------------------------------------------------------------------------------
# Language model and the whole
# ---------------------------------------------------------------------------------------------

class Qwen2VLTextModel(LlamaModel):
    """Qwen2's decoder (q/k/v biases) with M-RoPE: ``forward`` takes positions ``[T]`` or ``[3, T]``."""

    def __init__(self, args: ModelArgs, mrope_section: Sequence[int]):
        super().__init__(args, qkv_bias=True, qk_norm=False)
        self.rotary = MRotaryEmbedding(args.head_dim, args.rope_theta, mrope_section)


class Qwen2VLForConditionalGeneration(nn.Module):
    """Qwen2-VL (and, as a subclass, Qwen2.5-VL) on the engine: ``encode_images`` runs the vision tower,
    ``forward`` takes token ids, positions (``[T]`` or M-RoPE ``[3, T]``) and optional input embeddings."""

    is_multimodal = True
    uses_mrope = True
    qwen25 = False
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hf_config = args.hf_config
        self.image_token_id = hf_config.get("image_token_id", 151655)
        vcfg = hf_config.get("vision_config") or {}
        self.spatial_merge_size = vcfg.get("spatial_merge_size", 2)
        self.model = Qwen2VLTextModel(args, mrope_section_of(hf_config))
        self.visual = None
        if not getattr(args, "disable_vision_encoder", False):
            self.visual = VisionTransformer(vcfg, args.hidden_size, self.qwen25)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def encode_images(self, items) -> List[torch.Tensor]:
        """One ``[length_i, hidden]`` tensor per item (``pixel_inputs``: ``pixel_values``, ``image_grid_thw``)."""
        if self.visual is None:
            raise RuntimeError("the vision encoder is disabled (disable_vision_encoder=True); images cannot be used")
        device = self.lm_head.weight.device
        pixels = torch.cat([it.pixel_inputs["pixel_values"] for it in items]).to(device)
        grids = [g for it in items for g in it.pixel_inputs["image_grid_thw"].tolist()]
        return self.encode_pixels(pixels, grids)

    def encode_pixels(self, pixel_values: torch.Tensor, grid_thw) -> List[torch.Tensor]:
        """The vision tower on the image processor's batched output: one tensor per image."""
        out = self.visual(pixel_values, grid_thw)
        return list(out.split([image_num_tokens(g, self.spatial_merge_size) for g in grid_thw]))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                input_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def _shard_slice(self, shard) -> slice:
        a = self.args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        if isinstance(shard, str):
            return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[shard]
        return slice(shard * a.intermediate_size, (shard + 1) * a.intermediate_size)

    @staticmethod
    def _canonical(name: str) -> str:
        # transformers 5 saves (and some re-uploads use) model.language_model.* / model.visual.*.
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
        if name.startswith("model.visual."):
            return name[len("model."):]
        return name

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in; fails on unknown names, bad shapes and missing tensors."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = self._canonical(name)
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.args.tie_word_embeddings):
                continue
            if name.startswith("visual.") and self.visual is None:
                continue
            target, shard = name, None
            if name.startswith("model."):
                for hf_name, (fused, fused_shard) in self.packed_modules.items():
                    if f".{hf_name}." in name:
                        target, shard = name.replace(f".{hf_name}.", f".{fused}."), fused_shard
                        break
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            dest = params[target].data
            if shard is not None:
                dest = dest[self._shard_slice(shard)]
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add((target, shard))
        shards_of = {}
        for fused, shard in self.packed_modules.values():
            shards_of.setdefault(fused, []).append(shard)
        expected = {(p, shard) for p in params
                    for shard in (shards_of.get(p.split(".")[-2], [None]) if p.startswith("model.") else [None])}
        missing = sorted(str(m) for m in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: RMSNorm and gated-SiLU vision blocks, windowed attention except in ``fullatt_block_indexes``."""

    qwen25 = True
