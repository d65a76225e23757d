"""Lazy, optional loading of the CPU extension ``kangaroo_rt._cpu`` and its ops with reference fallbacks.

``import kangaroo_rt`` never imports the extension: :mod:`kangaroo_rt.ops` looks for it (a ``find_spec``, nothing
imported) and loads it at the first dispatch of one of its ops to a CPU tensor (backend "cpu"). When it was not
built (``KANGAROO_RT_BUILD_CPU=0``, an install under pip's build isolation, no C++ compiler) the torch reference
serves, without a warning: that is an ordinary install. When it was built but does not load, one warning says why.
Build it with ``KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation -e .`` (see setup.py).

The op wrappers here take the exact signatures of :mod:`kangaroo_rt.reference` and route the inputs the kernels
do not cover (other dtypes or devices, mixed dtypes, a non-contiguous weight, bad shapes) to the reference, which
computes them or raises torch's own error. ``KANGAROO_RT_CPU_ISA`` naming a variant this CPU cannot run makes the
kernels raise ValueError at every call: it is a request that cannot be met, so it is never silently ignored.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import huge_mapping, reference

_MODULE = "kangaroo_rt._cpu"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_loaded = None
_load_error: Optional[str] = None
_warned = False


def is_built() -> bool:
    """Whether ``kangaroo_rt._cpu`` exists (checked without importing it)."""
    try:
        return importlib.util.find_spec(_MODULE) is not None
    except (ImportError, ValueError):
        return False


def load():
    """The extension module; ImportError with the reason and the build command when it cannot be loaded."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    if _load_error is None:
        try:
            _loaded = importlib.import_module(_MODULE)
            return _loaded
        except ImportError as exc:
            _load_error = str(exc) or type(exc).__name__
    raise ImportError(f"{_MODULE} is not available ({_load_error}); build it with "
                      "`KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation -e .` (needs a C++ compiler)")


def tensor_version(t: torch.Tensor) -> int:
    """``t._version``, the count of its in-place changes, which the caches of things derived from a tensor (packed
    copies, call plans, screens, RoPE tables) compare; -1 for an inference tensor (made under
    ``torch.inference_mode``), which keeps no count: a change made in place to one is not seen."""
    return -1 if t.is_inference() else t._version


PACK_ROWS = 16  # csrc/cpu/kr_cpu.h: KR_CPU_PACK_ROWS


def pack_rows_bf16(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) bf16 -> the same values in kr_cpu_pack_bf16's layout, computed with torch (the reference of
    ``_cpu.pack_bf16``, for tests): an (N, K + K % 2) tensor of panels of 16 rows (the last one what is left), each
    row as its pairs of bf16 (k = 2p low, 2p + 1 high; a zero after an odd K), stored pair by pair across the
    panel's rows."""
    n, k = weight.shape
    if k % 2:
        weight = torch.cat([weight, weight.new_zeros(n, 1)], dim=1)
    pairs = weight.contiguous().view(torch.int32)  # (N, K2): one 32-bit word per pair
    panels = [pairs[b:b + PACK_ROWS].t().contiguous().flatten() for b in range(0, n, PACK_ROWS)]
    flat = torch.cat(panels) if panels else pairs.flatten()
    return flat.view(weight.dtype).view(n, weight.shape[1])


# Packed copies of bf16 weights (kr_cpu_pack_bf16's layout: what the decode stacks stream), made once and kept while
# their weight lives, at the same memory and version: id(weight) -> (weakref to it, (data_ptr, _version), copy).
_packed: Dict[int, Tuple["weakref.ref[torch.Tensor]", Tuple[int, int], torch.Tensor]] = {}


def _packed_entry(weight: torch.Tensor) -> Optional[torch.Tensor]:
    entry = _packed.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == (weight.data_ptr(), tensor_version(weight)):
        return entry[2]
    return None


def packed_bf16(weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The packed copies (``_cpu.pack_bf16``) of contiguous (N, K) bf16 CPU ``weights``, for the decode stacks
    (``packed=True``): made at the first call (those missing together, in one mapping in 2 MB pages where
    :mod:`kangaroo_rt.huge_mapping` allows, as the weights themselves are placed) and kept while their weight lives
    at the same memory, unchanged (an in-place change, such as ``load_state_dict``, bumps its version: a new copy is
    made; a fused projection's tensor follows its views' changes: ``FusedRows.serves``). A weight's copy doubles its
    memory; decoding then streams only the copy."""
    out: List[Optional[torch.Tensor]] = [_packed_entry(w) for w in weights]
    missing = [i for i, p in enumerate(out) if p is None]
    if missing:
        cpu = load()
        shapes = [(weights[i].shape[0], weights[i].shape[1] + weights[i].shape[1] % 2) for i in missing]
        room = huge_mapping.copy_room([(shape, torch.bfloat16) for shape in shapes])
        for j, i in enumerate(missing):
            w = weights[i]
            packed = cpu.pack_bf16(w, out=room[j] if room is not None else None)
            key = id(w)
            _packed[key] = (weakref.ref(w, lambda _, key=key: _packed.pop(key, None)), (w.data_ptr(), tensor_version(w)),
                            packed)
            out[i] = packed
    return out  # type: ignore[return-value]


def packs() -> bool:
    """Whether the loaded extension reads bf16 weights packed (``pack_bf16``; builds before 2026-12-06 read them
    row-major, which ``benchmarks/bench_ab.py --in-process`` swaps in under this module)."""
    return hasattr(load(), "pack_bf16")


def _packed_kw(packed: bool) -> dict:
    """The ``packed`` keyword of a stack call, given only when set (an extension without packing has none)."""
    return {"packed": True} if packed else {}


def pack_matrices(weights: List[Optional[torch.Tensor]], dtype: torch.dtype) -> bool:
    """For a bf16 decode stack's argument list: replaces each matrix (a 2-d weight; norms are 1-d, absent ones None)
    by its packed copy (:func:`packed_bf16`) and returns True; False, changing nothing, for other dtypes (the fp32
    kernel reads row-major weights) or where :func:`packs` is False."""
    if dtype != torch.bfloat16 or not packs():
        return False
    at = [i for i, w in enumerate(weights) if w is not None and w.dim() == 2]
    for i, p in zip(at, packed_bf16([weights[i] for i in at])):
        weights[i] = p
    return True


def is_available() -> bool:
    """Whether the extension loads. Not built: False, silently. Built but not loadable: False, said once."""
    global _warned
    if _loaded is not None:
        return True
    if not is_built():
        return False
    try:
        load()
        return True
    except ImportError as exc:
        if not _warned:
            _warned = True
            warnings.warn(f"kangaroo_rt: CPU ops use torch because {exc}", RuntimeWarning, stacklevel=2)
        return False


PhaseTimes = Dict[str, Tuple[int, int, int]]


@contextlib.contextmanager
def phase_times():
    """Time the phases of the extension's one-call regions (the decoder stack, the draft chain, the target pass)
    while the block runs: yields a dict that is filled on exit with ``{kind: (body_ns, wait_ns, phases)}`` summed
    over the threads, kinds as ``_cpu.phase_stats`` names them ('layers.gate_up', 'layers.gate_up[n]' over more than
    one row, 'shallow.*', 'adapter.*', 'head', 'draft_head', 'screen', 'other'). ``wait_ns`` is a thread's time
    claiming chunks and waiting at the phase's end for the other threads' last ones. For profiling: the totals are
    process-wide, so one such block at a time."""
    cpu = load()
    times: PhaseTimes = {}
    was_on = cpu.phase_stats_enable(True)
    cpu.phase_stats(reset=True)
    try:
        yield times
    finally:
        times.update(cpu.phase_stats(reset=True))
        cpu.phase_stats_enable(was_on)


def _linear_ok(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Inputs the kernel computes as torch.nn.functional.linear would: dense CPU tensors of one dtype, fp32 or
    bf16, a contiguous (N, K) weight, x (..., K), bias (N,) or None. (Called on every linear of a decode step:
    attribute checks only.)"""
    dtype = x.dtype
    if not (dtype in _KERNEL_DTYPES and weight.dtype == dtype and x.is_cpu and weight.is_cpu
            and x.layout == torch.strided and weight.layout == torch.strided and weight.dim() == 2
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and weight.is_contiguous()):
        return False
    return bias is None or (bias.dtype == dtype and bias.is_cpu and bias.layout == torch.strided
                            and bias.dim() == 1 and bias.shape[0] == weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: (..., K); weight: (N, K); bias: (N,) or None -> (..., N) in x's dtype. Each output row has the bits it
    has when computed alone, whatever the other rows (csrc/cpu/linear.cpp).

    Except in a prefill: bf16 x with more than ``reference.INVARIANT_MAX_QUERIES`` tokens on its second-to-last
    axis (a (B, q, K) prompt of q > 64, or an (M, K) matrix of M > 64) goes to torch, whose blocked oneDNN GEMM
    over AVX512-BF16's dot products is 1.0-1.5x the kernel at 128-600 rows here (the kernel is tuned for a
    handful of rows; docs/design.md). Its bits depend on the row count, as attention's do over more than
    64 queries; decode, draft and verify steps never have that many tokens a row, and a prompt's prefill is shared
    by plain and Kangaroo decoding. In fp32 the kernel stays: it is faster than torch's GEMM at every size here.

    A bf16 weight is read through its packed copy (:func:`packed_bf16`, made at its first call here and kept), the
    layout the kernel streams at the memory's rate: the same bits as the row-major weight."""
    if not _linear_ok(x, weight, bias) or (
            x.dtype == torch.bfloat16 and x.dim() >= 2 and x.shape[-2] > reference.INVARIANT_MAX_QUERIES):
        return reference.linear(x, weight, bias)
    if x.dtype == torch.bfloat16 and packs():
        return load().linear(x, packed_bf16([weight])[0], bias, packed=True)
    return load().linear(x, weight, bias)


def _dense(*tensors: torch.Tensor) -> bool:
    """Dense CPU tensors of one kernel dtype."""
    dtype = tensors[0].dtype
    return dtype in _KERNEL_DTYPES and all(t.dtype == dtype and t.is_cpu and t.layout == torch.strided
                                           for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D); weight: (D,) -> (..., D). Row by row in a fixed order (csrc/cpu/rms_norm.cpp)."""
    if not (_dense(x, weight) and weight.dim() == 1 and x.dim() >= 1 and x.shape[-1] == weight.shape[0] > 0):
        return reference.rms_norm(x, weight, eps)
    return load().rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (x + residual, rms_norm(x + residual)); shapes as :func:`kangaroo_rt.reference.add_rms_norm`."""
    if not (_dense(x, residual, weight) and weight.dim() == 1 and x.dim() >= 1 and x.shape == residual.shape
            and x.shape[-1] == weight.shape[0] > 0):
        return reference.add_rms_norm(x, residual, weight, eps)
    return load().add_rms_norm(x, residual, weight, eps)


def rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions) -> torch.Tensor:
    """RoPE on q (B, Hq, q, D) and k (B, Hkv, q, D), k and v written into the caches at positions (B, q);
    -> rotated q. Bits of :func:`kangaroo_rt.reference.rope_cache_append` (csrc/cpu/rope_cache_append.cpp)."""
    if not (_dense(q, k, v, cos, sin, k_cache, v_cache) and q.dim() == k.dim() == v.dim() == k_cache.dim() == 4
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == 1
            and positions.dtype == torch.int64 and positions.is_cpu):
        return reference.rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions)
    return load().rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions)


def attention(q, k_cache, v_cache, positions, kv_len=None) -> torch.Tensor:
    """Causal attention of q (B, Hq, q, D) over the caches at per-row positions (B, q) -> (B, Hq, q, D).

    Up to ``reference.INVARIANT_MAX_QUERIES`` queries (plain, draft and verify steps) each query runs alone in a
    fixed order (csrc/cpu/attention.cpp): a verify pass has the bits of single steps. Prefill (more queries) is
    compute-bound and keeps torch's fused kernel, which is faster there.
    """
    if not (q.dim() == 4 and 0 < q.shape[2] <= reference.INVARIANT_MAX_QUERIES and _dense(q, k_cache, v_cache)
            and q.stride(-1) == 1 and k_cache.dim() == 4 and k_cache.stride(-1) == 1
            and positions.dtype == torch.int64 and positions.is_cpu):
        return reference.attention(q, k_cache, v_cache, positions, kv_len)
    return load().attention(q, k_cache, v_cache, positions, kv_len)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (..., n) each -> (..., n) (csrc/cpu/silu_mul.cpp): torch's roundings with the kernels' own
    exp, elementwise, so the layer stack computes it without torch."""
    if not (_dense(gate, up) and gate.dim() >= 1 and gate.shape == up.shape and gate.stride(-1) == 1
            and up.stride(-1) == 1):
        return reference.silu_mul(gate, up)
    return load().silu_mul(gate, up)


def _logits_ok(logits: torch.Tensor) -> bool:
    return (logits.dtype in _KERNEL_DTYPES and logits.is_cpu and logits.layout == torch.strided and logits.dim() >= 1
            and 0 < logits.shape[-1] < 2 ** 31 - 1)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.argmax` (csrc/cpu/argmax.cpp: the same index, one pass per row)."""
    if not _logits_ok(logits):
        return reference.argmax(logits)
    return load().argmax(logits)


def greedy_with_confidence(logits: torch.Tensor):
    """See :func:`kangaroo_rt.reference.greedy_with_confidence` (csrc/cpu/argmax.cpp): the same token (0 with a NaN
    probability on a row holding a NaN, +inf or only -inf, where torch's softmax is NaN throughout); its probability
    as 1 / sum_j exp(x_j - max) in a fixed order, within a few ulps of torch's softmax."""
    if not _logits_ok(logits):
        return reference.greedy_with_confidence(logits)
    return load().greedy_with_confidence(logits)


class InvalidDistribution(ValueError, RuntimeError):
    """torch's error for sampling inputs that are no distribution (NaN, negative or infinite probabilities, a zero
    sum, top_k <= 0), raised as a ValueError too: a caller's bad input, which must not make :mod:`kangaroo_rt.ops`
    count the extension's op as broken and hand it to torch for the rest of the process."""


NOT_A_DISTRIBUTION = "probability tensor contains"  # the one-call paths' message for it, torch.multinomial's


@contextlib.contextmanager
def _distribution_errors():
    """A one-call path's refusal of a sampled position that is no distribution (a ValueError with
    :data:`NOT_A_DISTRIBUTION`) re-raised as :class:`InvalidDistribution`, as the step-by-step path raises it."""
    try:
        yield
    except ValueError as exc:
        if NOT_A_DISTRIBUTION in str(exc) and not isinstance(exc, InvalidDistribution):
            raise InvalidDistribution(str(exc)) from exc
        raise


def _torch_error(fn, *args):
    """fn(*args) (the reference), its RuntimeError re-raised as :class:`InvalidDistribution`."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        if isinstance(exc, ValueError):
            raise
        raise InvalidDistribution(str(exc)) from exc


def filter_args(vocab: int, top_k: Optional[int], top_p: Optional[float]) -> tuple:
    """(top_k, top_p) as the kernels take them for rows of ``vocab`` logits: 0 and 1.0 for none."""
    k = 0 if top_k is None or top_k >= vocab else int(top_k)
    return k, 1.0 if top_p is None or top_p >= 1.0 else float(top_p)


def process_logits(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                   top_p: Optional[float]) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.process_logits` (csrc/cpu/sampling.cpp): the same kept tokens, found among
    the scores near the largest instead of by a sort of the whole row (tokens tied at the top-p cut: the lower indices
    first, where torch's unstable sort keeps any of them), and their probabilities within a few ulp of torch's
    softmax. Rows with a NaN or +inf score, or only -inf ones, are torch's."""
    vocab = logits.shape[-1] if logits.dim() else 0
    if not (_logits_ok(logits) and temperature == temperature and (top_k is None or 0 < top_k)
            and (top_p is None or top_p == top_p)):
        return _torch_error(reference.process_logits, logits, temperature, top_k, top_p)
    probs, left = load().process_logits(logits, float(temperature), *filter_args(vocab, top_k, top_p))
    if bool(left.any()):
        probs[left] = reference.process_logits(logits[left], temperature, top_k, top_p)
    return probs


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
           u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.sample` (csrc/cpu/sampling.cpp): a draw from each row, as
    ``torch.multinomial`` makes it, from one float64 uniform per row of ``generator`` or the given ones ``u`` (so a
    seed gives other tokens than torch's draw does, from the same distribution). Rows that are not distributions get
    torch's error."""
    if not (probs.dtype == torch.float32 and probs.is_cpu and probs.layout == torch.strided and probs.dim() == 2
            and probs.shape[1] > 0 and (generator is None or generator.device.type == "cpu")
            and (u is None or (u.dtype == torch.float64 and u.is_cpu and u.shape == probs.shape[:1]))):
        return _torch_error(reference.sample, probs, generator, u)
    if u is None:
        u = torch.rand(probs.shape[0], dtype=torch.float64, generator=generator)
    tokens = load().sample(probs, u)
    if bool((tokens < 0).any()):
        return _torch_error(reference.sample, probs, generator, u)  # torch's error for that row
    return tokens


def accept_sampling(drafts, n_drafts, target_probs, draft_probs, uniforms, generator=None):
    """See :func:`kangaroo_rt.reference.accept_sampling` (csrc/cpu/sampling.cpp): its acceptance test, then the next
    token drawn as :func:`sample` draws, from max(p - q, 0) unnormalized (the draw divides by the sum), one float64
    uniform of ``generator`` a row."""
    tensors = (drafts, n_drafts, target_probs, draft_probs, uniforms)
    if not (all(t.is_cpu and t.layout == torch.strided for t in tensors) and drafts.dim() == 2
            and target_probs.dtype == draft_probs.dtype == uniforms.dtype == torch.float32
            and drafts.dtype == n_drafts.dtype == torch.long and (generator is None or generator.device.type == "cpu")
            and target_probs.dim() == 3 and target_probs.shape[1] == drafts.shape[1] + 1):
        accepted = reference.accept_sampling_counts(drafts, n_drafts, target_probs, draft_probs, uniforms)
        dist = reference.after_acceptance_distribution(accepted, n_drafts, target_probs, draft_probs)
        return accepted, sample(dist, generator)
    u_next = torch.rand(drafts.shape[0], dtype=torch.float64, generator=generator)
    B, K = drafts.shape
    if not ((K <= 1 or drafts.stride(1) == 1) and (B <= 1 or K == 0 or drafts.stride(0) >= K)):
        drafts = torch.empty(drafts.shape, dtype=torch.long).copy_(drafts)  # rows of their own, unit column stride
    accepted, nxt = load().accept_sampling(drafts, n_drafts.contiguous(),
                                           target_probs.contiguous(), draft_probs.contiguous(), uniforms.contiguous(),
                                           u_next)
    if bool((nxt < 0).any()):  # not a distribution: torch's error
        dist = reference.after_acceptance_distribution(accepted, n_drafts, target_probs, draft_probs)
        return accepted, _torch_error(reference.sample, dist, generator, u_next)
    return accepted, nxt


def _round_state_ok(tokens: torch.Tensor, out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor,
                    counts: torch.Tensor, eos: Optional[torch.Tensor], *more: torch.Tensor) -> bool:
    """The decode state the commit kernels index by raw pointer: int64 tokens (B, n) and out (>= B, W) of unit
    column stride, contiguous (>= B,) int64 counters (n_gen, ``more``) and bool flags, integer counts (B,) and eos
    ids, all on the CPU."""
    if not (tokens.dim() == 2 and tokens.dtype == torch.long and tokens.is_cpu):
        return False
    batch = tokens.shape[0]
    rows = (n_gen, finished, *more)
    return (out.dtype == torch.long and out.is_cpu and out.dim() == 2 and out.shape[0] >= batch
            and out.stride(1) == 1 and finished.dtype == torch.bool
            and all(t.is_cpu and t.dim() == 1 and t.shape[0] >= batch and t.is_contiguous() for t in rows)
            and all(t.dtype == torch.long for t in (n_gen, *more))
            and counts.is_cpu and counts.dim() == 1 and counts.shape[0] == batch and not counts.is_floating_point()
            and (eos is None or (eos.is_cpu and not eos.is_floating_point())))


def commit_tokens(out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, tokens: torch.Tensor,
                  count: torch.Tensor, eos: Optional[torch.Tensor]) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.commit_tokens` (in place; csrc/cpu/accept.cpp). Like the CUDA kernel, it
    writes only the committed tokens, at columns < W: the trash column's contents are unspecified either way."""
    if not _round_state_ok(tokens, out, n_gen, finished, count, eos):
        return reference.commit_tokens(out, n_gen, finished, tokens, count, eos)
    return load().commit_tokens(out, n_gen, finished, tokens, count, eos)


def accept_greedy_commit(drafts: torch.Tensor, n_drafts: torch.Tensor, target_tokens: torch.Tensor,
                         out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, pos: torch.Tensor,
                         eos: Optional[torch.Tensor]):
    """See :func:`kangaroo_rt.reference.accept_greedy_commit`: in place, one call (csrc/cpu/accept.cpp) where the
    reference takes about 25 tensor ops."""
    if not (_round_state_ok(drafts, out, n_gen, finished, n_drafts, eos, pos) and target_tokens.dtype == torch.long
            and target_tokens.is_cpu and target_tokens.shape == (drafts.shape[0], drafts.shape[1] + 1)):
        return reference.accept_greedy_commit(drafts, n_drafts, target_tokens, out, n_gen, finished, pos, eos)
    return load().accept_greedy_commit(drafts, n_drafts, target_tokens, out, n_gen, finished, pos, eos)


OPS = ("linear", "rms_norm", "add_rms_norm", "rope_cache_append", "attention", "silu_mul", "argmax",
       "greedy_with_confidence", "process_logits", "sample", "accept_sampling", "commit_tokens", "accept_greedy_commit")


def decoder_layers(hidden, positions, cos, sin, weights, qkv_bias, o_bias, k_caches, v_caches, n_heads: int,
                   n_kv_heads: int, head_dim: int, eps: float, kv_len=None, packed: bool = False) -> torch.Tensor:
    """A stack of decoder layers in one call (csrc/cpu_bindings_decode.cpp): the ops of :data:`OPS` in the order
    ``kangaroo_rt.model.DecoderLayer`` calls them, on the same kernels, so the same bits without a Python round
    trip per op. The caller (``Transformer.forward_layers``) checks that every op would be served by this
    extension; shapes are as there (weights: six per layer, fused q/k/v and gate/up; packed: a bf16 stack's
    matrices as :func:`packed_bf16` copies)."""
    return load().decoder_layers(hidden, positions, cos, sin, weights, qkv_bias, o_bias, k_caches, v_caches,
                                 n_heads, n_kv_heads, head_dim, eps, kv_len, **_packed_kw(packed))


def _chain_args(state, chain, embed, rope_tables, stack, caches, adapter_weights, adapter_caches, head, head_ids,
                n_heads: int, n_kv_heads: int, head_dim: int, eps: float, adapter_eps: float, eta: float,
                head_q8: Optional[tuple] = None) -> Tuple[tuple, dict]:
    """:func:`draft_chain`'s arguments as the binding takes them: (positional, keywords: packed, head_q8)."""
    weights, qkv_bias, o_bias, packed = stack
    adapter_weights, adapter_packed = adapter_weights
    if adapter_packed != packed:
        raise ValueError("draft_chain: the target's layers and the adapter must both be packed (bf16) or neither")
    if packed:
        head = packed_bf16([head])[0]
    return (state.pos, state.token, state.n_gen, state.max_new, state.finished, state.e_prev, chain.cap, chain.active,
            chain.conf, chain.x, chain.drafts, chain.n_drafts, chain.exits, embed, *rope_tables, weights, qkv_bias,
            o_bias, *caches, adapter_weights, *adapter_caches, head, head_ids, n_heads, n_kv_heads, head_dim, eps,
            adapter_eps, chain.drafts.shape[1], eta), {**_packed_kw(packed),
                                                       **({} if head_q8 is None else {"head_q8": list(head_q8)})}


def draft_chain(state, chain, embed, rope_tables, stack, caches, adapter_weights, adapter_caches, head, head_ids,
                n_heads: int, n_kv_heads: int, head_dim: int, eps: float, adapter_eps: float, eta: float,
                head_q8: Optional[tuple] = None, base_len: int = 0, sampled: Optional[tuple] = None) -> int:
    """A round's drafting in one call (csrc/cpu/draft.cpp), in place on ``chain``
    (:class:`kangaroo_rt.speculative.DraftChain`) from ``state`` (:class:`~kangaroo_rt.speculative.DecodeState`):
    the bits of the per-step path. ``rope_tables``: cos, sin (T, head_dim) of positions 0..T-1; ``stack``: the
    target's layers 0..l-1 as ``Transformer._cpu_stack`` gives them (weights, qkv biases, o biases, packed), and
    ``adapter_weights`` as ``Adapter._cpu_layer`` does (weights, packed; the head then packed too); ``caches`` and
    ``adapter_caches``: (k, v) lists and pairs. ``sampled``: (q (B, gamma, N) float32, out: each step's draft
    distribution over the head's rows; u (B, gamma) float64, the uniforms of the draws; each row's temperature (B,)
    float64 (0: a greedy row), top_k (B,) int64 (0: none), top_p (B,) float64 (1: none)), else greedy drafts.
    ``head_q8``: the head's int8 form (:func:`draft_head_q8`), whose estimates (:func:`screen_estimate`) are then the
    head's logits. The caller (``Decoder._cpu_chain``) checks that every op would be served by this extension.
    Returns k, the drafting steps run. A sampled row with no distribution to draw from raises
    :class:`InvalidDistribution`."""
    args, kwargs = _chain_args(state, chain, embed, rope_tables, stack, caches, adapter_weights, adapter_caches, head,
                               head_ids, n_heads, n_kv_heads, head_dim, eps, adapter_eps, eta, head_q8)
    with _distribution_errors():
        return load().draft_chain(*args, base_len=base_len, **kwargs, **_named(_CHAIN_SAMPLING, sampled))


_CHAIN_SAMPLING = ("sample_q", "sample_u", "temperature", "top_k", "top_p")
_PASS_SAMPLING = ("sample_u_next", "sample_u_accept", "sample_q", "sample_q_ids", "temperature", "top_k",
                  "top_p")


def _named(names: Tuple[str, ...], values: Optional[tuple]) -> dict:
    """A sampled call's arguments as keywords (none for a greedy one)."""
    return {} if values is None else dict(zip(names, values))


def plan_draft_chain(*args, sampled: Optional[tuple] = None):
    """:func:`draft_chain`'s arguments without ``base_len``, checked once: a plan for :func:`decode_loop`; sampled
    as there (:func:`decode_loop` refills its uniforms every round)."""
    positional, kwargs = _chain_args(*args)
    return load().plan_draft_chain(*positional, **kwargs, **_named(_CHAIN_SAMPLING, sampled))


SCREEN_ENV = "KANGAROO_RT_HEAD_SCREEN"  # "0": the greedy passes compute the whole head (the A/B baseline)


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> the float32 values >= x (x >= 0), so that a bound stays a bound."""
    f = x.float()
    return torch.where(f.double() < x, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


def make_head_screen(weight: torch.Tensor, rows_at_once: int = 8192) -> Optional[tuple]:
    """The screened greedy head's tensors for a head weight (V, K) (csrc/cpu/head_screen.cpp): q (V, kp) int8 =
    round(W / scale) with one scale per row (absmax / 127), kp = K rounded up to 64 (zeros past K), scale (V,)
    float32, qsum (V,) int32, and the bounds err >= ||W - scale q|| and wnorm >= ||W|| per row (fp64, rounded up to
    float32). None for a weight with a non-finite value, of another dtype or with rows longer than 32768. About
    half the head's bytes in bf16 and a quarter in fp32, which the greedy passes read instead of it."""
    if weight.dim() != 2 or weight.dtype not in _KERNEL_DTYPES or weight.device.type != "cpu":
        return None
    V, K = weight.shape
    kp = (K + 63) // 64 * 64
    if kp > 32768:  # (the kernel's int32 dots)
        return None
    q = torch.zeros(V, kp, dtype=torch.int8)
    scale = torch.empty(V, dtype=torch.float32)
    qsum = torch.empty(V, dtype=torch.int32)
    err = torch.empty(V, dtype=torch.float32)
    wnorm = torch.empty(V, dtype=torch.float32)
    with torch.no_grad():
        for r0 in range(0, V, rows_at_once):
            w = weight[r0:r0 + rows_at_once].double()
            if not bool(torch.isfinite(w).all()):
                return None
            s = (w.abs().amax(dim=1) / 127).float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            qi = torch.round(w / s.double()[:, None]).clamp_(-127, 127)
            q[r0:r0 + rows_at_once, :K] = qi.to(torch.int8)
            scale[r0:r0 + rows_at_once] = s
            qsum[r0:r0 + rows_at_once] = qi.sum(dim=1).to(torch.int32)
            up = 1 + 1e-12  # the fp64 sums' rounding
            err[r0:r0 + rows_at_once] = _round_up_f32((w - s.double()[:, None] * qi).norm(dim=1) * up)
            wnorm[r0:r0 + rows_at_once] = _round_up_f32(w.norm(dim=1) * up)
    return q, scale, qsum, err, wnorm


def head_screen(head) -> Optional[tuple]:
    """``make_head_screen`` of an ``nn.Linear`` head's weight, made once and kept on the module while the weight is
    the same tensor at the same version; None where the screen is off (KANGAROO_RT_HEAD_SCREEN=0) or cannot serve."""
    if os.environ.get(SCREEN_ENV, "1") == "0":
        return None
    return _kept_screen(head)


DRAFT_INT8_ENV = "KANGAROO_RT_DRAFT_INT8"  # "0": Kangaroo's draft head computes its logits from its own weights


def draft_head_q8(head) -> Optional[tuple]:
    """The int8 form a draft head's logits are estimated from (:func:`screen_estimate`): ``make_head_screen`` of the
    head module's weight, kept on the module as :func:`head_screen` keeps it (the target's head shares the
    screened head's). None where it is off (KANGAROO_RT_DRAFT_INT8=0) or cannot serve."""
    if os.environ.get(DRAFT_INT8_ENV, "1") == "0":
        return None
    return _kept_screen(head)


def screen_estimate(x: torch.Tensor, screen: tuple) -> torch.Tensor:
    """x (M, K) fp32/bf16 and a head's int8 form (``make_head_screen``) -> (M, V) in x's dtype: each logit's estimate
    from the int8 rows and x's two int8 parts (csrc/cpu/head_screen.cpp, ``reference.screen_estimate``), rounded to
    the dtype; a row of a non-finite x is NaN. Not the head's logits (within the screen's bounds of them): Kangaroo's
    draft head reads these, half the bytes of a bf16 head, as the one-call draft chain does."""
    return load().screen_estimate(x, list(screen))


def _kept_screen(head) -> Optional[tuple]:
    """``make_head_screen`` of a head module's weight (in 2 MB pages), made once and kept on the module while the
    weight is the same tensor at the same version; None where it cannot serve."""
    w = head.weight
    key = (w.data_ptr(), tensor_version(w), tuple(w.shape), w.dtype)
    kept = getattr(head, "_kr_head_screen", None)
    if kept is None or kept[0] != key:
        screen = make_head_screen(w.detach())
        # in 2 MB pages, as loading puts the weights (a step streams it: 0.81-0.93x the time in a scratch run on the
        # Zen 4 host, 1-8 rows against 4 KB pages; docs/design.md)
        kept = (key, tuple(huge_mapping.copy(screen)) if screen is not None else None)
        head._kr_head_screen = kept
    return kept[1]


def _pass_args(state, rope_tables, stack, caches, norm, head, q_len: int, n_heads: int, n_kv_heads: int,
               head_dim: int, eps: float, embed=None, chain=None, sampled: Optional[tuple] = None) -> tuple:
    weights, qkv_bias, o_bias, packed = stack
    exits = drafts = n_drafts = e_prev = None
    if chain is not None:
        exits, drafts, n_drafts, e_prev = chain.exits, chain.drafts, chain.n_drafts, state.e_prev
    return (state.pos, state.token, state.out, state.n_gen, state.finished, state.max_new, state.eos, e_prev, embed,
            exits, drafts, n_drafts, q_len, *rope_tables, weights, qkv_bias, o_bias, *caches, norm.weight, norm.eps,
            packed_bf16([head.weight])[0] if packed else head.weight, n_heads, n_kv_heads, head_dim, eps,
            None if sampled is not None else head_screen(head))


def target_pass(state, rope_tables, stack, caches, norm, head, q_len: int, n_heads: int, n_kv_heads: int,
                head_dim: int, eps: float, kv_len: int, embed=None, chain=None, sampled: Optional[tuple] = None):
    """A plain step (``embed`` given: from each row's token) or a verification of ``chain``'s first ``q_len - 1``
    drafts (from its exit states) with the final norm (an ``RMSNorm``), the head (an ``nn.Linear`` without bias),
    acceptance and commit in one call (csrc/cpu/target_pass.cpp), in place on ``state``; the bits and tokens of the
    step-by-step path. Greedy, or ``sampled``: (u_next (B,) float64, the uniforms of the next tokens' draws;
    u_accept (B, >= q_len - 1) float32, those of the acceptance tests; q (B, >= q_len - 1, N) float32, the drafts'
    probabilities over the head's rows or over the N token ids q_ids (N,) int64 (a draft vocabulary's; None: the
    head's rows); each row's temperature (B,) float64 (0: a greedy row), top_k (B,) int64 (0: none), top_p (B,)
    float64 (1: none)), as the samplers pick tokens with those uniforms. The caller (``Decoder._cpu_pass``) checks
    that every op would be served by this extension. Returns (accepted, committed) (B,) int64."""
    with _distribution_errors():
        return load().target_pass(*_pass_args(state, rope_tables, stack, caches, norm, head, q_len, n_heads,
                                              n_kv_heads, head_dim, eps, embed=embed, chain=chain, sampled=sampled),
                                  kv_len=kv_len, **_packed_kw(stack[3]), **_named(_PASS_SAMPLING, sampled))


def plan_target_pass(*args, sampled: Optional[tuple] = None, **kwargs):
    """:func:`target_pass`'s arguments without ``kv_len``, checked once (``q_len``: the most tokens a row a pass
    takes): a plan for :func:`decode_loop`, which refills a sampled plan's uniforms every round."""
    return load().plan_target_pass(*_pass_args(*args, sampled=sampled, **kwargs), **_packed_kw(args[2][3]),
                                   **_named(_PASS_SAMPLING, sampled))


def decode_loop(plan, draft_plan, max_rounds: int, generator: Optional[torch.Generator] = None):
    """Plain steps (``draft_plan`` None) or Kangaroo rounds until every row is finished, in one call with no Python
    between the steps (csrc/cpu_bindings_decode.cpp): the tokens and bits of calling :func:`target_pass` (and
    :func:`draft_chain`) once a step. Sampled plans draw each round's uniforms from ``generator`` (None: torch's
    default CPU generator) in ``BatchSampling``'s order: a seed gives the step-by-step path's tokens. It stops early,
    with the remaining rounds left to the caller, where a round would read past the cache. Returns (rounds R, active
    (R, B) bool, committed, n_drafts, accepted (R, B) int64, drafting steps (R,) int64, seconds drafting and
    verifying (R, 2) fp64)."""
    with _distribution_errors():
        rounds, *per_round = load().decode_loop(plan, draft_plan, max_rounds, generator)
    return (int(rounds), *per_round)
