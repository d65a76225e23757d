"""Attention of new queries over the static KV cache with per-row positions (decode, verify, prefill).

Semantics of :func:`kangaroo_rt.reference.attention`: the query at absolute position ``p`` of row ``b``
sees keys ``0..p`` of row ``b`` (the cache already holds the new keys), so one kernel is causal inside
the new chunk and ragged across rows.

GQA without repeating k/v: one program serves one kv head of one row and a block of ``BLOCK_M`` query
rows taken from the ``group * q_len`` (query head, token) pairs that share that kv head, so each key
block is loaded once for the whole group (decode q_len 1, verify q_len gamma+1, prefill q_len in the
hundreds all map onto the same tiles). Softmax statistics and both products are fp32.

Flash-decoding (split-K) for decode and verify on CUDA: the key range is cut into splits of a fixed
``SPLIT_KEYS`` positions, each split's program writes an unnormalised partial output with its running max
and sum, and a second kernel merges them in split order, skipping splits in which a query saw no key. The
split boundaries are a function of position alone, not of ``kv_len``: a CUDA graph's call over the whole
cache (kv_len = capacity) and an eager call over the live length give the same bits, and the split count is
a runtime argument, so a growing context never recompiles the kernels.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from kangaroo_rt import reference

SPLIT_KEYS = 256
_BLOCK_M_MAX = 64  # query rows per program  # keys per split-K split (a multiple of every BLOCK_N)
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: exp(_NEG - _NEG) stays 1, never NaN


@triton.jit(do_not_specialize=["kv_len", "split_size", "num_splits"])
def _attention_kernel(
    q_ptr,  # (B, Hq, q, D), any strides
    k_ptr, v_ptr,  # (B_max, Hkv, T_max, D) caches
    pos_ptr,  # (B, q) int64 absolute positions of the queries
    out_ptr,  # (B, Hq, q, D) contiguous, written when not SPLIT
    part_acc_ptr,  # (B, Hq, q, S, D) fp32 unnormalised partial outputs, when SPLIT
    part_stats_ptr,  # (B, Hq, q, S, 2) fp32 running max and sum-exp per split
    n_kv_heads, q_len, group, kv_len, split_size, num_splits, scale,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    spb, spt,
    SPLIT: tl.constexpr,
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
    if not SPLIT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        part = out_row * num_splits + pid_s
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _attention_merge_kernel(
    part_acc_ptr,  # (R, S, D) fp32
    part_stats_ptr,  # (R, S, 2) fp32
    out_ptr,  # (R, D)
    num_splits,
    HEAD_DIM: tl.constexpr,
):
    """One output row: the splits in order, those where the row saw no key (sum 0) skipped exactly, so
    trailing empty splits (a call over the whole cache) change no bit."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM).to(tl.int64)
    base = row * num_splits
    m_all = tl.load(part_stats_ptr + base * 2)
    for s in range(1, num_splits):
        m_all = tl.maximum(m_all, tl.load(part_stats_ptr + (base + s) * 2))
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    l_all = tl.zeros([1], dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.load(part_stats_ptr + (base + s) * 2)
        l = tl.load(part_stats_ptr + (base + s) * 2 + 1)
        w = tl.exp(m - m_all)
        seen = l > 0
        acc = tl.where(seen, acc + tl.load(part_acc_ptr + (base + s) * HEAD_DIM + d) * w, acc)
        l_all = tl.where(seen, l_all + l * w, l_all)
    l_all = tl.where(l_all > 0, l_all, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, (acc / l_all).to(out_ptr.dtype.element_ty))


def supports(head_dim: int) -> bool:
    """Head dims the kernel tiles (powers of two from 16, as tl.dot needs); others use the reference."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_split_size(query_rows: int, device: torch.device) -> int:
    """Keys per split-K split, or 0 for one pass over all keys. Split on CUDA when the ``group * q_len``
    query rows of a kv head fit one query block (decode, verify): their partial outputs are a few percent of
    the keys read. Prefill's chunks keep one pass. Never a function of kv_len or the batch, so that every
    path (graph over the capacity, eager over the live length, any bucket) splits alike."""
    return SPLIT_KEYS if device.type == "cuda" and query_rows <= _BLOCK_M_MAX else 0


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              kv_len: Optional[int] = None, split_size: Optional[int] = None) -> torch.Tensor:
    """q: (B, Hq, q, D); k_cache, v_cache: (B_max, Hkv, T_max, D); positions: (B, q) int64;
    kv_len: cache slots to read (default all); split_size: keys per split-K split, 0 for none (default:
    :func:`choose_split_size`). Returns (B, Hq, q, D) in q's dtype. Head dims the kernel does not tile go to
    the torch reference."""
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
    block_m = max(16, min(_BLOCK_M_MAX, triton.next_power_of_2(n_rows)))
    block_n = 64 if head_dim <= 64 else 32
    m_blocks = triton.cdiv(n_rows, block_m)
    if split_size is None:
        split_size = choose_split_size(n_rows, q.device)
    if split_size < 0:
        raise ValueError(f"split_size must be >= 0, got {split_size}")
    split = split_size > 0
    # Split boundaries at multiples of split_size: splits past the rows' positions (kv_len = capacity) are empty.
    num_splits = triton.cdiv(kv_len, split_size) if split else 1
    if not split:
        split_size = kv_len
    if split:
        part_acc = torch.empty((batch, n_heads, q_len, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_stats = torch.empty((batch, n_heads, q_len, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_stats = out
    _attention_kernel[(batch * n_kv, m_blocks, num_splits)](
        q, k_cache, v_cache, positions, out, part_acc, part_stats,
        n_kv, q_len, group, kv_len, split_size, num_splits, head_dim ** -0.5,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *positions.stride(),
        SPLIT=split, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    if split:
        _attention_merge_kernel[(batch * n_heads * q_len,)](part_acc, part_stats, out, num_splits,
                                                            HEAD_DIM=head_dim, num_warps=4)
    return out
