"""Lazy, optional loading of the CUDA extension ``kangaroo_rt._C`` and its ops with reference fallbacks.

``import kangaroo_rt`` never imports the extension; :mod:`kangaroo_rt.ops` loads it on the first dispatch
to a CUDA tensor (backend "cuda"). When it was not built (a pure-Python install, no CUDA toolkit) one
message says so, once, and dispatch falls through to Triton or torch. Build it with
``KANGAROO_RT_BUILD_CUDA=1 python setup.py build_ext --inplace`` (see setup.py).

The op wrappers here take the exact signatures of :mod:`kangaroo_rt.reference` and route inputs the
kernels do not cover (CPU tensors, other dtypes, mixed dtypes, odd head sizes) to the reference.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Optional, Tuple

import torch

from . import reference

_MODULE = "kangaroo_rt._C"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_loaded = None
_load_error: Optional[str] = None
_warned = False


def is_built() -> bool:
    """Whether ``kangaroo_rt._C`` exists (checked without importing it)."""
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
                      "`KANGAROO_RT_BUILD_CUDA=1 python setup.py build_ext --inplace` on a machine with a CUDA "
                      "toolkit and a CUDA build of torch")


def is_available() -> bool:
    """Whether the extension loads; says why not, once per process, the first time it does not."""
    global _warned
    if _loaded is not None:
        return True
    try:
        load()
        return True
    except ImportError as exc:
        if not _warned:
            _warned = True
            warnings.warn(f"kangaroo_rt: CUDA ops use Triton/torch because {exc}", RuntimeWarning, stacklevel=2)
        return False


def supports_while_graph() -> bool:
    """Whether the extension can build conditional while-node graphs here (CUDA >= 12.4)."""
    return is_available() and bool(load().while_graph_supported())


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return first.is_cuda and first.dtype in _KERNEL_DTYPES and all(t.dtype == first.dtype for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D); weight: (D,) -> (..., D)."""
    if not _kernel_ok(x, weight):
        return reference.rms_norm(x, weight, eps)
    return load().rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., D); weight: (D,) -> (x + residual, rms_norm(x + residual))."""
    if not _kernel_ok(x, residual, weight) or residual.shape != x.shape:
        return reference.add_rms_norm(x, residual, weight, eps)
    new_residual, out = load().add_rms_norm(x, residual, weight, float(eps))
    return new_residual, out


def rope_cache_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, q, D); k, v: (B, Hkv, q, D); cos, sin: (B, q, D); caches (B_max, Hkv, T_max, D);
    positions: (B, q) int64. Writes the rotated k and v into the caches; returns the rotated q."""
    if not _kernel_ok(q, k, v, cos, sin, k_cache, v_cache) or q.shape[-1] % 2 or positions.dtype != torch.long:
        return reference.rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions)
    return load().rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions)


def _long_ok(*tensors: torch.Tensor) -> bool:
    return tensors[0].is_cuda and all(t.dtype == torch.long for t in tensors)


def _state_ok(out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, *more: torch.Tensor) -> bool:
    """In-place state the kernel indexes by raw pointer: contiguous rows of the expected types."""
    return (out.dtype == torch.long and out.dim() == 2 and out.stride(1) == 1 and finished.dtype == torch.bool
            and all(t.dtype == torch.long and t.dim() == 1 and t.is_contiguous() for t in (n_gen, *more))
            and finished.dim() == 1 and finished.is_contiguous())


def accept_greedy(drafts: torch.Tensor, n_drafts: torch.Tensor,
                  target_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """drafts: (B, K) int64; n_drafts: (B,); target_tokens: (B, K+1) -> (accepted (B,), next_token (B,))."""
    if not _long_ok(drafts, target_tokens):
        return reference.accept_greedy(drafts, n_drafts, target_tokens)
    accepted, next_token = load().accept_greedy(drafts, n_drafts, target_tokens)
    return accepted, next_token


def commit_tokens(out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, tokens: torch.Tensor,
                  count: torch.Tensor, eos: Optional[torch.Tensor]) -> torch.Tensor:
    """See :func:`kangaroo_rt.reference.commit_tokens` (in place). Unlike the reference, which scatters masked
    entries into the trash column, csrc/accept.cu writes only valid tokens, at columns < W; the trash
    column's contents are unspecified either way."""
    if not (_long_ok(tokens) and _state_ok(out, n_gen, finished)):
        return reference.commit_tokens(out, n_gen, finished, tokens, count, eos)
    return load().commit_tokens(out, n_gen, finished, tokens, count, eos)


def accept_greedy_commit(drafts: torch.Tensor, n_drafts: torch.Tensor, target_tokens: torch.Tensor,
                         out: torch.Tensor, n_gen: torch.Tensor, finished: torch.Tensor, pos: torch.Tensor,
                         eos: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`kangaroo_rt.reference.accept_greedy_commit`: one launch, in place, no host sync."""
    if not (_long_ok(drafts, target_tokens) and _state_ok(out, n_gen, finished, pos)):
        return reference.accept_greedy_commit(drafts, n_drafts, target_tokens, out, n_gen, finished, pos, eos)
    accepted, next_token, committed = load().accept_greedy_commit(drafts, n_drafts, target_tokens, out, n_gen,
                                                                  finished, pos, eos)
    return accepted, next_token, committed


OPS = ("rms_norm", "add_rms_norm", "rope_cache_append", "accept_greedy", "commit_tokens", "accept_greedy_commit")
