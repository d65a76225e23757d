"""Attention of new queries over the static KV cache with per-row positions (decode, verify, prefill).

Semantics of :func:`kangaroo_rt.reference.attention`: the query at absolute position ``p`` of row ``b``
sees keys ``0..p`` of row ``b`` (the cache already holds the new keys), so one kernel is causal inside
the new chunk and ragged across rows.

GQA without repeating k/v: one program serves one kv head of one row and a block of ``BLOCK_M`` query
rows taken from the ``group * q_len`` (query head, token) pairs that share that kv head, so each key
block is loaded once for the whole group (decode q_len 1, verify q_len gamma+1, prefill q_len in the
hundreds all map onto the same tiles). Flash-decoding: when rows x kv heads do not fill the GPU, the key
range is split over ``num_splits`` programs that write unnormalised partial outputs with their running
max and sum, and a second kernel merges them. Softmax statistics and both products are fp32.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from kangaroo_rt import reference

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: exp(_NEG - _NEG) stays 1, never NaN


@triton.jit
def _attention_kernel(
    q_ptr,  # (B, Hq, q, D), any strides
    k_ptr, v_ptr,  # (B_max, Hkv, T_max, D) caches
    pos_ptr,  # (B, q) int64 absolute positions of the queries
    out_ptr,  # (B, Hq, q, D) contiguous, written when NUM_SPLITS == 1
    part_acc_ptr,  # (B, Hq, q, S, D) fp32 unnormalised partial outputs, when NUM_SPLITS > 1
    part_stats_ptr,  # (B, Hq, q, S, 2) fp32 running max and sum-exp per split
    n_kv_heads, q_len, group, kv_len, split_size, scale,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    spb, spt,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    # int64 index math throughout: no int32 overflow, and the interpreter skips its overflow checks.
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,) of the group * q_len rows
    row_ok = rows < group * q_len
    t = rows % q_len
    head = kvh * group + rows // q_len
    d = tl.arange(0, HEAD_DIM).to(tl.int64)
    q = tl.load(q_ptr + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    pos = tl.load(pos_ptr + b * spb + t * spt, mask=row_ok, other=-1)  # (BLOCK_M,)

    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, kv_len)
    hi = tl.minimum(hi, (tl.max(pos, axis=0) + 1).to(tl.int32))  # no row of this block sees further
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n  # (BLOCK_N,) key positions
        n_ok = n < hi
        k_t = tl.load(k_base + n[None, :] * skt + d[:, None] * skd, mask=n_ok[None, :], other=0.0)  # (D, BLOCK_N)
        s = tl.dot(q, k_t.to(q.dtype), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N) fp32
        visible = (n[None, :] <= pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * svt + d[None, :] * svd, mask=n_ok[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new

    out_row = (b * n_kv_heads * group + head) * q_len + t  # (BLOCK_M,) row of the (B*Hq*q, ...) outputs
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        part = out_row * NUM_SPLITS + pid_s
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _attention_merge_kernel(
    part_acc_ptr,  # (R, S, D) fp32
    part_stats_ptr,  # (R, S, 2) fp32
    out_ptr,  # (R, D)
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM).to(tl.int64)
    base = row * NUM_SPLITS + s
    m = tl.load(part_stats_ptr + base * 2, mask=s_ok, other=_NEG)
    l = tl.load(part_stats_ptr + base * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.exp(m - m_all)  # (BLOCK_S,): 0 for splits that saw no key
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def supports(head_dim: int) -> bool:
    """Head dims the kernel tiles (powers of two from 16, as tl.dot needs); others use the reference."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(programs: int, kv_len: int, device: torch.device) -> int:
    """How many key splits fill the GPU: 1 unless rows x kv heads x query blocks leave SMs idle."""
    if device.type != "cuda" or kv_len < 512:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(kv_len, 256), triton.cdiv(2 * sms, programs), 64))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              kv_len: Optional[int] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """q: (B, Hq, q, D); k_cache, v_cache: (B_max, Hkv, T_max, D); positions: (B, q) int64;
    kv_len: cache slots to read (default all); num_splits: key splits (default: chosen for the device).
    Returns (B, Hq, q, D) in q's dtype. Head dims the kernel does not tile go to the torch reference."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv = k_cache.shape[1]
    if not supports(head_dim):
        return reference.attention(q, k_cache, v_cache, positions, kv_len)
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} kv heads")
    group = n_heads // n_kv
    kv_len = k_cache.shape[2] if kv_len is None else int(kv_len)
    out = torch.empty((batch, n_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    positions = positions.expand(batch, q_len)
    n_rows = group * q_len
    block_m = max(16, min(64, triton.next_power_of_2(n_rows)))
    block_n = 64 if head_dim <= 64 else 32
    m_blocks = triton.cdiv(n_rows, block_m)
    if num_splits is None:
        num_splits = choose_num_splits(batch * n_kv * m_blocks, kv_len, q.device)
    split_size = triton.cdiv(triton.cdiv(kv_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(kv_len, split_size)
    if num_splits > 1:
        part_acc = torch.empty((batch, n_heads, q_len, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_stats = torch.empty((batch, n_heads, q_len, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_stats = out
    _attention_kernel[(batch * n_kv, m_blocks, num_splits)](
        q, k_cache, v_cache, positions, out, part_acc, part_stats,
        n_kv, q_len, group, kv_len, split_size, head_dim ** -0.5,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *positions.stride(),
        NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    if num_splits > 1:
        _attention_merge_kernel[(batch * n_heads * q_len,)](
            part_acc, part_stats, out,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, num_warps=4,
        )
    return out
