"""Plain-torch reference of every op on the decode path.

These are the semantics the Triton and CUDA versions are tested against, and the CPU path of the
runtime. Shapes are given on every tensor argument. Reductions (norms, softmax) run in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5; older releases take attention_math.
_SDPA_GQA = _TORCH >= (2, 5)
_FUSED_RMS_NORM = _TORCH >= (2, 4)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D); weight: (D,). Matches transformers' LlamaRMSNorm bit for bit in fp32."""
    if _FUSED_RMS_NORM and x.dtype == weight.dtype == torch.float32:  # one launch, the same bits
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (new_residual = x + residual, rms_norm(new_residual))."""
    new_residual = x + residual
    return new_residual, rms_norm(new_residual, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: (..., K); weight: (N, K); bias: (N,) or None -> (..., N): ``torch.nn.functional.linear``."""
    return torch.nn.functional.linear(x, weight, bias)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up, gate and up (..., n) -> (..., n)."""
    return torch.nn.functional.silu(gate) * up


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """positions: (B, q) int64; inv_freq: (D/2,) fp32 -> cos, sin: (B, q, D) in ``dtype``."""
    freqs = positions.float()[..., None] * inv_freq.float()  # (B, q, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, q, D); cos/sin: (B, q, D). Non-interleaved (rotate-half) convention of HF Llama."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> None:
    """Write k/v at per-row positions, in place.

    k_cache, v_cache: (B_max, Hkv, T_max, D); k, v: (B, Hkv, q, D); positions: (B, q) int64.
    Rows 0..B-1 of the cache are written. A position outside [0, T_max) writes nothing, as in the Triton
    and CUDA kernels (a kernel cannot raise, and a check here would cost a host sync).
    """
    batch, q_len, t_max = k.shape[0], k.shape[2], k_cache.shape[2]
    if batch * q_len == 0:
        return
    positions = positions.expand(batch, q_len)
    rows = torch.arange(batch, device=k.device)[:, None]  # (B, 1)
    ok = (positions >= 0) & (positions < t_max)  # (B, q)
    # Skipped without a host sync: an out-of-range entry rewrites its row's first in-range entry (same slot,
    # same value), or, in a row with none, the value its clamped slot already holds.
    first = ok.long().argmax(dim=1)  # (B,)
    any_ok = ok.any(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
    slots = torch.where(ok, positions, positions.gather(1, first[:, None])).clamp(0, t_max - 1)  # (B, q)
    keep = ok[:, :, None, None]  # (B, q, 1, 1)
    for cache, new in ((k_cache, k), (v_cache, v)):
        # Advanced indices on dims 0 and 2 around a slice put the indexed dims first: (B, q, Hkv, D).
        new = new.transpose(1, 2).to(cache.dtype)
        stand_in = torch.where(any_ok, new[rows[:, 0], first][:, None], cache[rows, :, slots])
        cache[rows, :, slots] = torch.where(keep, new, stand_in)


def rope_cache_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k, then the cache append of the rotated k and of v (the fused op's semantics).

    q: (B, Hq, q, D); k, v: (B, Hkv, q, D); cos, sin: (B, q, D); k_cache, v_cache: (B_max, Hkv, T_max, D);
    positions: (B, q) int64. Writes the caches in place (nothing at positions outside [0, T_max), see
    :func:`cache_append`) and returns the rotated q (B, Hq, q, D).
    """
    n_heads = q.shape[1]
    if q.dtype == k.dtype:  # one rotation of q and k stacked along the heads: half the launches
        qk = apply_rope(torch.cat([q, k], dim=1), cos, sin)
        cache_append(k_cache, v_cache, qk[:, n_heads:], v, positions)
        return qk[:, :n_heads]
    cache_append(k_cache, v_cache, apply_rope(k, cos, sin), v, positions)
    return apply_rope(q, cos, sin)


INVARIANT_MAX_QUERIES = 64  # on CPU, attention over at most this many queries runs one query at a time


def _visible(positions: torch.Tensor, t: int) -> torch.Tensor:
    """(B, q) absolute query positions -> (B, 1, q, T) bool: key slot j is visible to a query at p iff j <= p."""
    key_pos = torch.arange(t, device=positions.device)
    return (key_pos <= positions[:, :, None])[:, None]


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              kv_len: Optional[int] = None) -> torch.Tensor:
    """Causal attention of new queries over a static cache, per-row positions, GQA without repeat.

    q: (B, Hq, q, D); k_cache, v_cache: (B_max, Hkv, T_max, D) already holding the new keys;
    positions: (B, q) int64, the absolute position of each query. Query at position p sees keys
    0..p of its own row. kv_len: how many cache slots to read (>= max(positions) + 1; default all).
    Returns (B, Hq, q, D).

    One fused ``scaled_dot_product_attention`` call (``enable_gqa``, torch >= 2.5), which on CPU is the
    fast path: about a quarter of the launches of :func:`attention_math`, which has the same semantics.
    """
    q_len = q.shape[2]
    if q.device.type == "cpu" and 1 < q_len <= INVARIANT_MAX_QUERIES:
        # A batched CPU matmul rounds a query row differently with the number of rows, and the fused kernel
        # with the number of key slots: one query at a time, reading the slots a single step at its position
        # reads (max position + 1), gives a verify pass over k+1 tokens the bits of k+1 single steps
        # (row-count invariance: exact Kangaroo == plain in every dtype). Prefill (more queries) keeps the
        # batched, compute-bound call.
        last = positions.max(dim=0).values.tolist()  # (q,) the largest position of each query column
        return torch.cat([attention(q[:, :, i:i + 1].contiguous(), k_cache, v_cache, positions[:, i:i + 1],
                                    last[i] + 1) for i in range(q_len)], dim=2)
    if not _SDPA_GQA or q.dtype != k_cache.dtype:
        return attention_math(q, k_cache, v_cache, positions, kv_len)
    batch = q.shape[0]
    t = k_cache.shape[2] if kv_len is None else kv_len
    return torch.nn.functional.scaled_dot_product_attention(
        q, k_cache[:batch, :, :t], v_cache[:batch, :, :t], attn_mask=_visible(positions, t), enable_gqa=True)


def attention_math(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                   kv_len: Optional[int] = None) -> torch.Tensor:
    """:func:`attention` spelled out (matmul, mask, fp32 softmax, matmul); shapes as there."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    t = k_cache.shape[2] if kv_len is None else kv_len
    k = k_cache[:batch, :, :t]  # (B, Hkv, T, D)
    v = v_cache[:batch, :, :t]
    # (B, Hkv, group * q, D): the query heads that share one kv head are stacked along the rows.
    qg = q.reshape(batch, n_kv, group * q_len, head_dim)
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * (head_dim ** -0.5)  # (B, Hkv, G*q, T)
    scores = scores.view(batch, n_kv, group, q_len, t).masked_fill(~_visible(positions, t)[:, None], float("-inf"))
    probs = torch.softmax(scores.view(batch, n_kv, group * q_len, t), dim=-1)
    out = torch.matmul(probs, v.float())  # (B, Hkv, G*q, D)
    return out.reshape(batch, n_heads, q_len, head_dim).to(q.dtype)


def process_logits(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' order and tie rules) -> probabilities.

    logits: (..., V) -> probs (..., V) in fp32, rows summing to 1.
    """
    scores = logits.float() / max(float(temperature), 1e-6)
    vocab = scores.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return torch.softmax(scores, dim=-1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> (...,) int64: ``logits.argmax(dim=-1)``, the first maximal index (a NaN counts as the
    largest). A 16-bit CPU tensor is widened to fp32 first (exact, so the same index): torch's CPU argmax over
    49152 bf16 logits takes several times as long as the widening plus an fp32 argmax."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return logits.argmax(dim=-1)


def head_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K), a head weight (V, K) -> (M,) int64: the greedy token of the head's logits in x's dtype, the first
    maximal index (what the screened head of csrc/cpu/head_screen.cpp chooses without reading the whole head)."""
    return argmax(torch.nn.functional.linear(x, weight.to(x.dtype)))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """fp64 x -> the nearest integers, halves away from zero (as csrc/cpu/head_screen.cpp rounds)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5).to(x.dtype))


def screen_estimate(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, qsum: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32/bf16 and a head's int8 form (``_cpu_ext.make_head_screen``'s q (V, kp) int8, scale (V,) fp32,
    qsum (V,) int32) -> (M, V) fp32: each logit's estimate from x's two int8 parts, the value the screened head's
    bounds are centred on (what ``_cpu_ext.screen_estimate`` computes, before its rounding to x's dtype). x ~ s1 u1
    + s2 u2 with s1 = absmax / 127 and u1 = round(x / s1), s2 and u2 the same of the residual x - s1 u1 (each scale
    rounded to fp32, 1 where it is 0); the integer dots d_i = u_i . q_v are exact, and the estimate is
    scale_v (s1 d1 + s2 d2) in fp32. A row with a non-finite value or one above 2^60 is NaN."""
    K = x.shape[-1]
    h = x.double()
    amax = h.abs().amax(dim=-1, keepdim=True)
    s1 = (amax / 127).float()
    s1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
    u1 = _round_half_away(h / s1.double()).clamp(-127, 127)
    r = h - s1.double() * u1
    s2 = (r.abs().amax(dim=-1, keepdim=True) / 127).float()
    s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
    u2 = _round_half_away(r / s2.double()).clamp(-127, 127)
    w = q[:, :K].to(torch.int64)
    d1 = (u1.to(torch.int64) @ w.t()).float()  # (exact int64 dots, rounded to fp32 as the kernel rounds its int32)
    d2 = (u2.to(torch.int64) @ w.t()).float()
    est = scale * ((s1 * d1) + (s2 * d2))
    bad = ~torch.isfinite(h).all(dim=-1, keepdim=True) | (amax > 2.0 ** 60)
    return est.masked_fill(bad, float("nan"))


def greedy_with_confidence(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits: (B, V) -> (argmax token (B,) int64, its softmax probability (B,) fp32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    conf, token = probs.max(dim=-1)
    return token, conf


def accept_greedy(drafts: torch.Tensor, n_drafts: torch.Tensor,
                  target_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance.

    drafts: (B, K) int64, -1 beyond each row's draft length; n_drafts: (B,) int64;
    target_tokens: (B, K+1) int64, the target's argmax at each verified position.
    Returns (accepted (B,) int64 in [0, n_drafts], next_token (B,) int64: correction or bonus).
    """
    k = drafts.shape[1]
    idx = torch.arange(k, device=drafts.device)
    match = (drafts == target_tokens[:, :k]) & (idx[None, :] < n_drafts[:, None])
    accepted = match.long().cumprod(dim=1).sum(dim=1)
    next_token = target_tokens.gather(1, accepted[:, None]).squeeze(1)
    return accepted, next_token


def accept_sampling(drafts: torch.Tensor, n_drafts: torch.Tensor, target_probs: torch.Tensor,
                    draft_probs: torch.Tensor, uniforms: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling acceptance (Leviathan et al. / Chen et al.), lossless for ``target_probs``.

    drafts: (B, K) int64 (-1 placeholders); n_drafts: (B,); target_probs: (B, K+1, V);
    draft_probs: (B, K, V) (the distribution each draft was sampled from); uniforms: (B, K) in [0, 1).
    Draft i is accepted with probability min(1, p_i(d)/q_i(d)); at the first rejection j the next
    token is sampled from normalize(max(p_j - q_j, 0)); after a full acceptance it is sampled from p_k.
    Returns (accepted (B,), next_token (B,)).
    """
    accepted = accept_sampling_counts(drafts, n_drafts, target_probs, draft_probs, uniforms)
    return accepted, sample_after_acceptance(accepted, n_drafts, target_probs, draft_probs, generator)


def accept_sampling_counts(drafts: torch.Tensor, n_drafts: torch.Tensor, target_probs: torch.Tensor,
                           draft_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The acceptance half of :func:`accept_sampling`: accepted counts (B,) int64.

    Draft i is accepted when ``uniforms[i] * q_i(d_i) < p_i(d_i)``, for i < n_drafts, up to the first
    rejection. Shapes as in :func:`accept_sampling`.
    """
    k = drafts.shape[1]
    idx = torch.arange(k, device=drafts.device)
    safe = drafts.clamp(min=0)[..., None]  # (B, K, 1)
    p_d = target_probs[:, :k].gather(2, safe).squeeze(2)  # (B, K)
    q_d = draft_probs.gather(2, safe).squeeze(2)
    ok = (uniforms * q_d < p_d) & (idx[None, :] < n_drafts[:, None])
    return ok.long().cumprod(dim=1).sum(dim=1)  # (B,)


def sample_after_acceptance(accepted: torch.Tensor, n_drafts: torch.Tensor, target_probs: torch.Tensor,
                            draft_probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The token after the accepted run (B,): from normalize(max(p_j - q_j, 0)) at a rejection j,
    from p_k after a fully accepted chain. accepted, n_drafts: (B,); probs as in :func:`accept_sampling`."""
    return sample(after_acceptance_distribution(accepted, n_drafts, target_probs, draft_probs), generator)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
           u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row drawn from probs (B, V) (non-negative, any positive sum) -> (B,) int64:
    ``torch.multinomial(probs, 1)``; with uniforms u (B,) float64 in [0, 1) instead of the generator, the first
    index at which the running sum (in float64) passes u * the row's sum."""
    if u is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if not bool(((probs >= 0) & torch.isfinite(probs)).all()):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")
    cum = probs.double().cumsum(-1)
    total = cum[:, -1:]
    if not bool((total > 0).all()):
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
    token = torch.searchsorted(cum, u.to(cum.dtype)[:, None] * total, right=True)[:, 0]
    return token.clamp(max=probs.shape[-1] - 1)


def after_acceptance_distribution(accepted: torch.Tensor, n_drafts: torch.Tensor, target_probs: torch.Tensor,
                                  draft_probs: torch.Tensor) -> torch.Tensor:
    """The distribution (B, V) :func:`sample_after_acceptance` draws from: normalize(max(p_j - q_j, 0)) at a
    rejection j, p_k after a fully accepted chain."""
    batch = accepted.shape[0]
    vocab = target_probs.shape[-1]
    p_next = target_probs.gather(1, accepted[:, None, None].expand(batch, 1, vocab)).squeeze(1)
    rejected = accepted < n_drafts
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, vocab)], dim=1)  # (B, K+1, V)
    q_next = q_pad.gather(1, accepted[:, None, None].expand(batch, 1, vocab)).squeeze(1)
    residual = (p_next - q_next).clamp(min=0)
    norm = residual.sum(-1, keepdim=True)
    # A rejection implies p != q, so the residual has mass; guard against fp round-off anyway.
    residual = torch.where(norm > 0, residual / norm.clamp(min=1e-30), p_next)
    return torch.where(rejected[:, None], residual, p_next)


def commit_tokens(out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, tokens: torch.Tensor,
                  count: torch.Tensor, eos: Optional[torch.Tensor]) -> torch.Tensor:
    """Append the first ``count`` tokens of each row to the output buffer, stopping after an EOS. In place.

    out: (B, W) int64 with W >= n_gen + n + 1, its last column a trash slot; n_gen: (B,) int64 tokens
    generated so far; finished: (B,) bool (finished rows commit nothing); tokens: (B, n) int64;
    count: (B,) int64; eos: (E,) int64 ids or None. Row b's valid tokens go to
    ``out[b, n_gen[b]:]``; then ``n_gen += committed`` and ``finished |= hit EOS``
    (per-row token limits are the caller's: ``finished |= n_gen >= max_new``, once, after the commit).
    Returns the number of tokens committed per row (B,) int64.
    """
    n = tokens.shape[1]
    idx = torch.arange(n, device=tokens.device)
    valid = (idx[None, :] < count[:, None]) & ~finished[:, None]
    hit_eos = torch.zeros_like(valid)
    if eos is not None:
        hit_eos = torch.isin(tokens, eos) & valid
        # Keep tokens up to and including the first EOS.
        after_eos = (hit_eos.long().cumsum(dim=1) - hit_eos.long()) > 0
        valid = valid & ~after_eos
    committed = valid.long().sum(dim=1)
    trash = out.shape[1] - 1
    cols = torch.where(valid, n_gen[:, None] + idx[None, :], torch.full_like(idx, trash)[None, :])
    out.scatter_(1, cols, tokens)  # invalid entries land in the trash column
    n_gen += committed
    finished |= hit_eos.any(dim=1)
    return committed


def accept_greedy_commit(drafts: torch.Tensor, n_drafts: torch.Tensor, target_tokens: torch.Tensor,
                         out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, pos: torch.Tensor,
                         eos: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance fused with the commit of one Kangaroo round, all in place, no host sync.

    drafts: (B, K) int64 (-1 placeholders); n_drafts: (B,); target_tokens: (B, K+1) int64; out, n_gen,
    finished, eos as in :func:`commit_tokens`; pos: (B,) int64 position of each row's newest
    token, advanced by ``accepted + 1`` on rows that were not finished. Commits the accepted drafts and
    the correction/bonus token (up to an EOS). Returns (accepted (B,), next_token (B,), committed (B,)).
    """
    accepted, next_token = accept_greedy(drafts, n_drafts, target_tokens)
    run = torch.cat([drafts, torch.zeros_like(next_token)[:, None]], dim=1)  # (B, K+1)
    run.scatter_(1, accepted[:, None], next_token[:, None])
    was_active = ~finished
    committed = commit_tokens(out, n_gen, finished, run, accepted + 1, eos)
    pos += torch.where(was_active, accepted + 1, torch.zeros_like(accepted))
    return accepted, next_token, committed

