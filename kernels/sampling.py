"""Sampling kernels: greedy argmax with its softmax probability (the eta exit's confidence).

One program per row streams the vocabulary once in ``BLOCK_V`` chunks with an online softmax: a
running max, the sum of ``exp(x - max)`` rescaled whenever the max grows, and the index of the first
maximum. The confidence is ``1 / sum``: the softmax probability of the argmax, as in
:func:`kangaroo_rt.reference.greedy_with_confidence`, without materialising the probabilities.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_with_confidence_kernel(
    logits_ptr,  # (B, V), unit column stride
    token_ptr,  # (B,) int64 out
    conf_ptr,  # (B,) fp32 out
    row_stride, vocab,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    best = tl.max(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0) - float("inf")  # running max (scalar)
    best_idx = tl.sum(tl.zeros([BLOCK_V], dtype=tl.int64), axis=0)
    total = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)  # sum of exp(x - best)
    for start in range(0, vocab, BLOCK_V):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_idx = tl.min(tl.where(x == block_max, idx, vocab), axis=0).to(tl.int64)  # first maximum
        new_best = tl.maximum(best, block_max)
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best), axis=0)
        best_idx = tl.where(block_max > best, block_idx, best_idx)
        best = new_best
    tl.store(token_ptr + row, best_idx)
    tl.store(conf_ptr + row, 1.0 / total)


def greedy_with_confidence(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits: (B, V) -> (argmax token (B,) int64, its softmax probability (B,) fp32)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    token = torch.empty(batch, dtype=torch.long, device=logits.device)
    conf = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch:
        block = min(4096, triton.next_power_of_2(vocab))
        _greedy_with_confidence_kernel[(batch,)](logits, token, conf, logits.stride(0), vocab,
                                                 BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return token, conf
