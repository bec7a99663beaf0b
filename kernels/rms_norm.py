"""RMSNorm and fused residual-add + RMSNorm: one program per row, the whole row in registers."""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     stride_x, stride_res, stride_out, stride_res_out, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, WEIGHT_IN_X_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to x's dtype before the norm, exactly like `x + residual` in torch.
        x = x + tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(residual_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if WEIGHT_IN_X_DTYPE:
        # HF order: normalise in fp32, round to the activation dtype, then scale.
        y = (xf * rstd).to(x.dtype) * w
    else:
        y = xf * rstd * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, name: str, hidden: int) -> torch.Tensor:
    if t.shape[-1] != hidden:
        raise ValueError(f"{name} must have last dim {hidden}, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    try:
        return t.view(-1, hidden)
    except RuntimeError as e:
        raise ValueError(f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as rows") from e


def _launch(x: torch.Tensor, residual, weight: torch.Tensor, eps: float):
    if x.dim() < 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor, got {x.dtype} with shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous with shape ({hidden},), got {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
                             f"got {tuple(residual.shape)}, {residual.dtype}")
        tensors["residual"] = residual
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    x2 = _as_rows(x, "x", hidden)
    res2 = _as_rows(residual, "residual", hidden) if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    res_out = torch.empty_like(out) if residual is not None else out
    res_out2 = res_out.view(-1, hidden)
    rows = x2.shape[0]
    if rows == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block * x.element_size() // 512, 1), 16)
    _rms_norm_kernel[(rows,)](
        x2, res2, weight, out2, res_out2,
        x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, WEIGHT_IN_X_DTYPE=weight.dtype == x.dtype, BLOCK=block,
        num_warps=num_warps)
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32, returned in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``."""
    return _launch(x, residual, weight, eps)
