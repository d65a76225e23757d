"""The accept kernel: speculative acceptance (greedy and sampling) and the commit of a round.

One program per row, no host sync. Greedy: the accepted count is the first index where the draft
differs from the target's argmax (or the row's draft count), the next token is the target's choice
there (correction, or bonus after a full chain). Sampling: draft i is accepted when
``u_i * q_i(d_i) < p_i(d_i)``; the token after the run is drawn in torch
(:func:`kangaroo_rt.reference.sample_after_acceptance`) so that the random stream is the reference's.
The commit writes a row's valid tokens into the output buffer at its own offset ``n_gen``, stops after
the first EOS, and updates ``n_gen``, ``finished`` (and, fused with greedy acceptance, ``pos``) in place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kangaroo_rt import reference


@triton.jit
def _commit_row(
    b, run, idx, count,  # row index; (BLOCK,) int64 candidate tokens; (BLOCK,) slot index; scalar count
    out_ptr, out_row_stride, out_width,
    n_gen_ptr, finished_ptr, eos_ptr, n_eos,
    HAS_EOS: tl.constexpr,
):
    """Commit ``run[:count]`` of row ``b`` up to its first EOS; returns the number committed."""
    was_finished = tl.load(finished_ptr + b) != 0
    n_gen = tl.load(n_gen_ptr + b)
    valid = (idx < count) & (was_finished == 0)
    hit = valid & (idx < 0)
    if HAS_EOS:
        for e in range(n_eos):
            hit = hit | (valid & (run == tl.load(eos_ptr + e)))
        first_eos = tl.min(tl.where(hit, idx, 1 << 30), axis=0)
        valid = valid & (idx <= first_eos)
    committed = tl.sum(valid.to(tl.int64), axis=0)
    cols = n_gen + idx
    tl.store(out_ptr + b * out_row_stride + cols, run, mask=valid & (cols < out_width))
    n_gen = n_gen + committed
    done = was_finished | (tl.max(hit.to(tl.int32), axis=0) > 0)
    tl.store(n_gen_ptr + b, n_gen)
    tl.store(finished_ptr + b, done.to(tl.uint8))
    return committed


@triton.jit
def _greedy_count(b, idx, drafts_ptr, sdb, sdk, n_drafts_ptr, target_ptr, stb, stk, K):
    """(accepted, next token) of row ``b`` under greedy acceptance, and the row's drafts (BLOCK,)."""
    n = tl.load(n_drafts_ptr + b)
    d = tl.load(drafts_ptr + b * sdb + idx * sdk, mask=idx < K, other=-1)
    tgt = tl.load(target_ptr + b * stb + idx * stk, mask=idx < K, other=-1)
    match = (d == tgt) & (idx < n) & (idx < K)
    accepted = tl.min(tl.where(match, 1 << 30, idx), axis=0).to(tl.int64)
    next_token = tl.load(target_ptr + b * stb + accepted * stk)
    return accepted, next_token, d


@triton.jit
def _accept_greedy_kernel(
    drafts_ptr,  # (B, K) int64, -1 placeholders
    n_drafts_ptr,  # (B,) int64
    target_ptr,  # (B, K+1) int64 target argmax
    accepted_ptr, next_ptr,  # (B,) int64 out
    sdb, sdk, stb, stk, K,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    accepted, next_token, _ = _greedy_count(b, idx, drafts_ptr, sdb, sdk, n_drafts_ptr, target_ptr, stb, stk, K)
    tl.store(accepted_ptr + b, accepted)
    tl.store(next_ptr + b, next_token)


@triton.jit
def _accept_greedy_commit_kernel(
    drafts_ptr, n_drafts_ptr, target_ptr,  # as in _accept_greedy_kernel
    accepted_ptr, next_ptr, committed_ptr,  # (B,) int64 out
    out_ptr,  # (B, W) int64 output buffer
    n_gen_ptr,  # (B,) int64, in place
    finished_ptr,  # (B,) uint8 (a bool tensor's bytes), in place
    pos_ptr,  # (B,) int64, in place
    eos_ptr,  # (E,) int64
    sdb, sdk, stb, stk, K, out_row_stride, out_width, n_eos,
    HAS_EOS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    accepted, next_token, d = _greedy_count(b, idx, drafts_ptr, sdb, sdk, n_drafts_ptr, target_ptr, stb, stk, K)
    run = tl.where(idx == accepted, next_token, d)
    was_active = tl.load(finished_ptr + b) == 0
    committed = _commit_row(b, run, idx, accepted + 1, out_ptr, out_row_stride, out_width,
                            n_gen_ptr, finished_ptr, eos_ptr, n_eos, HAS_EOS)
    pos = tl.load(pos_ptr + b)
    tl.store(pos_ptr + b, tl.where(was_active, pos + accepted + 1, pos))
    tl.store(accepted_ptr + b, accepted)
    tl.store(next_ptr + b, next_token)
    tl.store(committed_ptr + b, committed)


@triton.jit
def _commit_kernel(
    tokens_ptr,  # (B, n) int64
    count_ptr,  # (B,) int64
    committed_ptr,  # (B,) int64 out
    out_ptr, n_gen_ptr, finished_ptr, eos_ptr,  # as in _accept_greedy_commit_kernel
    stb, stn, n, out_row_stride, out_width, n_eos,
    HAS_EOS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    run = tl.load(tokens_ptr + b * stb + idx * stn, mask=idx < n, other=0)
    count = tl.minimum(tl.load(count_ptr + b), n)
    committed = _commit_row(b, run, idx, count, out_ptr, out_row_stride, out_width,
                            n_gen_ptr, finished_ptr, eos_ptr, n_eos, HAS_EOS)
    tl.store(committed_ptr + b, committed)


@triton.jit
def _accept_sampling_kernel(
    drafts_ptr,  # (B, K) int64
    n_drafts_ptr,  # (B,) int64
    target_probs_ptr,  # (B, K+1, V)
    draft_probs_ptr,  # (B, K, V)
    uniforms_ptr,  # (B, K)
    accepted_ptr,  # (B,) int64 out
    sdb, sdk, spb, spk, spv, sqb, sqk, sqv, sub, suk, K,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    in_chain = idx < K
    n = tl.load(n_drafts_ptr + b)
    d = tl.load(drafts_ptr + b * sdb + idx * sdk, mask=in_chain, other=0)
    d = tl.maximum(d, 0)
    p_d = tl.load(target_probs_ptr + b * spb + idx * spk + d * spv, mask=in_chain, other=0.0)
    q_d = tl.load(draft_probs_ptr + b * sqb + idx * sqk + d * sqv, mask=in_chain, other=0.0)
    u = tl.load(uniforms_ptr + b * sub + idx * suk, mask=in_chain, other=1.0)
    ok = (u * q_d < p_d) & (idx < n) & in_chain
    tl.store(accepted_ptr + b, tl.min(tl.where(ok, 1 << 30, idx), axis=0).to(tl.int64))


def _block(k: int) -> int:
    return max(16, triton.next_power_of_2(k + 1))


def _state_ok(out: torch.Tensor, *rows: torch.Tensor) -> bool:
    """In-place state the kernels index as ``ptr + b`` (rows) and ``ptr + b * stride + col`` (out): 1-D
    contiguous rows, unit column stride. Other layouts go to the reference, as the CUDA extension's do."""
    return out.dim() == 2 and out.stride(1) == 1 and all(t.dim() == 1 and t.is_contiguous() for t in rows)


def _eos_args(eos: Optional[torch.Tensor], device: torch.device):
    if eos is None or eos.numel() == 0:
        return torch.empty(1, dtype=torch.long, device=device), 0, False
    eos = eos.reshape(-1).to(device=device, dtype=torch.long)
    return eos, eos.numel(), True


def accept_greedy(drafts: torch.Tensor, n_drafts: torch.Tensor,
                  target_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """drafts: (B, K) int64; n_drafts: (B,); target_tokens: (B, K+1) -> (accepted (B,), next_token (B,))."""
    batch, k = drafts.shape
    n_drafts = n_drafts.to(torch.long).contiguous()  # (B,) read as ptr + b
    accepted = torch.empty(batch, dtype=torch.long, device=drafts.device)
    next_token = torch.empty_like(accepted)
    if batch:
        _accept_greedy_kernel[(batch,)](drafts, n_drafts, target_tokens, accepted, next_token,
                                        drafts.stride(0), drafts.stride(1), *target_tokens.stride(), k,
                                        BLOCK=_block(k), num_warps=1)
    return accepted, next_token


def accept_sampling(drafts: torch.Tensor, n_drafts: torch.Tensor, target_probs: torch.Tensor,
                    draft_probs: torch.Tensor, uniforms: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """See :func:`kangaroo_rt.reference.accept_sampling`; the counts come from the kernel."""
    accepted = accept_sampling_counts(drafts, n_drafts, target_probs, draft_probs, uniforms)
    return accepted, reference.sample_after_acceptance(accepted, n_drafts, target_probs, draft_probs, generator)


def accept_sampling_counts(drafts: torch.Tensor, n_drafts: torch.Tensor, target_probs: torch.Tensor,
                           draft_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.accept_sampling_counts`: accepted counts (B,) int64."""
    batch, k = drafts.shape
    n_drafts = n_drafts.to(torch.long).contiguous()  # (B,) read as ptr + b
    accepted = torch.zeros(batch, dtype=torch.long, device=drafts.device)
    if batch and k:
        _accept_sampling_kernel[(batch,)](drafts, n_drafts, target_probs, draft_probs, uniforms, accepted,
                                          drafts.stride(0), drafts.stride(1), *target_probs.stride(),
                                          *draft_probs.stride(), *uniforms.stride(), k,
                                          BLOCK=_block(k), num_warps=1)
    return accepted


def commit_tokens(out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, tokens: torch.Tensor,
                  count: torch.Tensor, eos: Optional[torch.Tensor]) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.commit_tokens` (in place). Valid tokens are written at columns < W;
    invalid ones are skipped, never written to the trash column."""
    if not _state_ok(out, n_gen, finished):
        return reference.commit_tokens(out, n_gen, finished, tokens, count, eos)
    batch, n = tokens.shape
    count = count.to(torch.long).contiguous()  # (B,) read as ptr + b
    committed = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    eos_t, n_eos, has_eos = _eos_args(eos, tokens.device)
    if batch:
        _commit_kernel[(batch,)](tokens, count, committed, out, n_gen, finished.view(torch.uint8), eos_t,
                                 tokens.stride(0), tokens.stride(1), n, out.stride(0), out.shape[1],
                                 n_eos, HAS_EOS=has_eos, BLOCK=_block(n), num_warps=1)
    return committed


def accept_greedy_commit(drafts: torch.Tensor, n_drafts: torch.Tensor, target_tokens: torch.Tensor,
                         out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, pos: torch.Tensor,
                         eos: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`kangaroo_rt.reference.accept_greedy_commit`: one launch, in place, no host sync."""
    if not _state_ok(out, n_gen, finished, pos):
        return reference.accept_greedy_commit(drafts, n_drafts, target_tokens, out, n_gen, finished, pos, eos)
    batch, k = drafts.shape
    n_drafts = n_drafts.to(torch.long).contiguous()  # (B,) read as ptr + b
    accepted = torch.empty(batch, dtype=torch.long, device=drafts.device)
    next_token = torch.empty_like(accepted)
    committed = torch.empty_like(accepted)
    eos_t, n_eos, has_eos = _eos_args(eos, drafts.device)
    if batch:
        _accept_greedy_commit_kernel[(batch,)](
            drafts, n_drafts, target_tokens, accepted, next_token, committed,
            out, n_gen, finished.view(torch.uint8), pos, eos_t,
            drafts.stride(0), drafts.stride(1), *target_tokens.stride(), k, out.stride(0), out.shape[1],
            n_eos, HAS_EOS=has_eos, BLOCK=_block(k), num_warps=1,
        )
    return accepted, next_token, committed
