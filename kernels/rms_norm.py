"""RMSNorm and residual-add + RMSNorm, one program per row (Liger-Kernel style).

Semantics of :func:`kangaroo_rt.reference.rms_norm`: the row is normalised in fp32, cast back to the
input dtype, then multiplied by the weight; the fused variant first forms ``x + residual`` in the input
dtype and returns it as the new residual.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # (N, D) rows of the input, row stride x_row_stride, unit column stride
    residual_ptr,  # (N, D) added to x first when HAS_RESIDUAL
    new_residual_ptr,  # (N, D) out: x + residual when HAS_RESIDUAL
    weight_ptr,  # (D,)
    out_ptr,  # (N, D) out: the normed rows
    x_row_stride,
    residual_row_stride,
    new_residual_row_stride,
    out_row_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        tl.store(new_residual_ptr + row * new_residual_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_square = tl.sum(xf * xf, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_row_stride + cols, w * normed, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (N, D) with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x: torch.Tensor, residual, weight: torch.Tensor, eps: float):
    shape = x.shape
    n_cols = shape[-1]
    x2 = _rows(x)
    n_rows = x2.shape[0]
    out = torch.empty(shape, dtype=torch.result_type(weight, x), device=x.device)
    out2 = out.view(-1, n_cols)
    if residual is not None:
        r2 = _rows(residual)
        new_residual = torch.empty(shape, dtype=x.dtype, device=x.device)
        nr2 = new_residual.view(-1, n_cols)
    else:
        r2 = nr2 = x2
        new_residual = None
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if n_rows > 0:
        _rms_norm_kernel[(n_rows,)](
            x2, r2, nr2, weight.contiguous(), out2,
            x2.stride(0), r2.stride(0), nr2.stride(0), out2.stride(0),
            n_cols, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )
    return new_residual, out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D); weight: (D,) -> (..., D)."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., D); weight: (D,) -> (x + residual, rms_norm(x + residual))."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        residual = residual.to(x.dtype).expand_as(x)
    return _launch(x, residual, weight, eps)
