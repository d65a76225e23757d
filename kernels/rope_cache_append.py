"""RoPE on q and k fused with the KV-cache append at per-row positions.

One program per (row, token) handles every head of that token: it rotates the ``Hq`` query heads into
a new tensor, and rotates the ``Hkv`` key heads and writes them, and the values, into the static
cache at ``positions[b, t]`` (nothing for a position outside [0, T_max), as in the reference and the CUDA
kernel). Rotate-half (non-interleaved) convention of HF Llama, computed in fp32. The same
launcher serves draft (q_len 1), verify (gamma+1) and prefill (the whole prompt).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kangaroo_rt import reference


@triton.jit
def _rotate(src, stride_h, stride_d, h, d, h_ok, cos1, cos2, sin1, sin2, HALF: tl.constexpr):
    """Rotate-half RoPE of the (BLOCK_H, 2 * HALF) rows at ``src`` in fp32 -> (first half, second half)."""
    x1 = tl.load(src + h[:, None] * stride_h + d[None, :] * stride_d, mask=h_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(src + h[:, None] * stride_h + (d[None, :] + HALF) * stride_d, mask=h_ok[:, None],
                 other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rope_cache_append_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, Hq, q, D), (B, Hkv, q, D), (B, Hkv, q, D), any strides
    cos_ptr, sin_ptr,  # (B, q, D)
    k_cache_ptr, v_cache_ptr,  # (B_max, Hkv, T_max, D)
    pos_ptr,  # (B, q) int64
    q_out_ptr,  # (B, Hq, q, D) contiguous, out
    q_len, n_q_heads, n_kv_heads, max_len,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    scb, sct, scd,
    ssb, sst, ssd,
    skcb, skch, skct, skcd,
    svcb, svch, svct, svcd,
    spb, spt,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
):
    bt = tl.program_id(0)
    b = (bt // q_len).to(tl.int64)
    t = (bt % q_len).to(tl.int64)
    d = tl.arange(0, HALF).to(tl.int64)
    cos1 = tl.load(cos_ptr + b * scb + t * sct + d[None, :] * scd).to(tl.float32)  # (1, HALF)
    cos2 = tl.load(cos_ptr + b * scb + t * sct + (d[None, :] + HALF) * scd).to(tl.float32)
    sin1 = tl.load(sin_ptr + b * ssb + t * sst + d[None, :] * ssd).to(tl.float32)
    sin2 = tl.load(sin_ptr + b * ssb + t * sst + (d[None, :] + HALF) * ssd).to(tl.float32)

    hq = tl.arange(0, BLOCK_HQ).to(tl.int64)
    hq_ok = hq < n_q_heads
    r1, r2 = _rotate(q_ptr + b * sqb + t * sqt, sqh, sqd, hq, d, hq_ok, cos1, cos2, sin1, sin2, HALF)
    dst = q_out_ptr + ((b * n_q_heads + hq[:, None]) * q_len + t) * (2 * HALF) + d[None, :]
    tl.store(dst, r1.to(q_out_ptr.dtype.element_ty), mask=hq_ok[:, None])
    tl.store(dst + HALF, r2.to(q_out_ptr.dtype.element_ty), mask=hq_ok[:, None])

    p = tl.load(pos_ptr + b * spb + t * spt)
    hk = tl.arange(0, BLOCK_HKV).to(tl.int64)
    hk_ok = (hk < n_kv_heads) & (p >= 0) & (p < max_len)  # a position outside the cache writes nothing
    r1, r2 = _rotate(k_ptr + b * skb + t * skt, skh, skd, hk, d, hk_ok, cos1, cos2, sin1, sin2, HALF)
    dst = k_cache_ptr + b * skcb + p * skct + hk[:, None] * skch
    tl.store(dst + d[None, :] * skcd, r1.to(k_cache_ptr.dtype.element_ty), mask=hk_ok[:, None])
    tl.store(dst + (d[None, :] + HALF) * skcd, r2.to(k_cache_ptr.dtype.element_ty), mask=hk_ok[:, None])
    v_src = v_ptr + b * svb + t * svt + hk[:, None] * svh
    v_dst = v_cache_ptr + b * svcb + p * svct + hk[:, None] * svch
    for half in tl.static_range(2):
        cols = d[None, :] + half * HALF
        v = tl.load(v_src + cols * svd, mask=hk_ok[:, None], other=0.0)
        tl.store(v_dst + cols * svcd, v.to(v_cache_ptr.dtype.element_ty), mask=hk_ok[:, None])


def rope_cache_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, q, D); k, v: (B, Hkv, q, D); cos, sin: (B, q, D); caches (B_max, Hkv, T_max, D);
    positions: (B, q) int64. Writes the rotated k and v into the caches (nothing at positions outside
    [0, T_max)); returns the rotated q. A head_dim that is not a power of two goes to the torch reference."""
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv = k.shape[1]
    if head_dim < 2 or head_dim & (head_dim - 1):  # the kernel tiles power-of-two halves
        return reference.rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions)
    q_out = torch.empty((batch, n_q_heads, q_len, head_dim), dtype=torch.result_type(q, cos), device=q.device)
    if batch * q_len == 0:
        return q_out
    cos = cos.expand(batch, q_len, head_dim)
    sin = sin.expand(batch, q_len, head_dim)
    positions = positions.expand(batch, q_len)
    _rope_cache_append_kernel[(batch * q_len,)](
        q, k, v, cos, sin, k_cache, v_cache, positions, q_out,
        q_len, n_q_heads, n_kv, k_cache.shape[2],
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(),
        *k_cache.stride(), *v_cache.stride(), *positions.stride(),
        HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HKV=triton.next_power_of_2(n_kv),
        num_warps=4,
    )
    return q_out
