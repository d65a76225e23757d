"""One entry point per op on the decode path; the model and the Kangaroo loop call only these.

Each op has a registry of implementations by backend. Dispatch picks, per call, the first backend in
the preference order ``cuda -> triton -> torch`` that has an implementation and supports the
tensor's device; ``KANGAROO_RT_BACKEND=torch|triton|cuda`` (or :func:`set_backend`) forces one.
The torch backend (``kangaroo_rt.reference``) serves every op on every device.
:func:`backend_table` tells which backend serves each op on a given device.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference

BACKENDS = ("cuda", "triton", "torch")

# op name -> backend -> (implementation, device types it runs on)
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Tuple[str, ...]]]] = {}
_forced: Optional[str] = None


def register(op: str, backend: str, fn: Callable, device_types: Tuple[str, ...]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` for the given device types."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, tuple(device_types))


def set_backend(name: Optional[str]) -> None:
    """Force one backend for every op (``None`` restores automatic choice and the env variable)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _forced = name


def _requested_backend() -> Optional[str]:
    if _forced is not None:
        return _forced
    env = os.environ.get("KANGAROO_RT_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"KANGAROO_RT_BACKEND={env!r} is not one of {BACKENDS}")
        return env
    return None


def _device_ok(device_types: Tuple[str, ...], device: torch.device) -> bool:
    if device.type in device_types:
        return True
    # Under the Triton interpreter, Triton kernels run on CPU tensors.
    return device.type == "cpu" and "interpret" in device_types and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, device: torch.device) -> Tuple[str, Callable]:
    """(backend name, implementation) that serves ``op`` on ``device``."""
    impls = _REGISTRY[op]
    wanted = _requested_backend()
    if wanted is not None:
        if wanted in impls and _device_ok(impls[wanted][1], device):
            return wanted, impls[wanted][0]
        if wanted != "torch":
            # A forced backend that lacks this op falls back to the reference, never to another kernel.
            return "torch", impls["torch"][0]
    for name in BACKENDS:
        if name in impls and _device_ok(impls[name][1], device):
            return name, impls[name][0]
    raise RuntimeError(f"no backend implements {op} on {device}")


def backend_table(device: torch.device | str = "cpu") -> Dict[str, str]:
    """{op: backend} as dispatch would choose on ``device`` now."""
    device = torch.device(device)
    return {op: resolve(op, device)[0] for op in sorted(_REGISTRY)}


_ALL = ("cpu", "cuda", "mps", "xpu", "meta")
for _name in ("rms_norm", "add_rms_norm", "apply_rope", "cache_append", "attention", "process_logits",
              "greedy_with_confidence", "accept_greedy", "accept_sampling"):
    register(_name, "torch", getattr(reference, _name), _ALL)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) -> (..., D)."""
    return resolve("rms_norm", x.device)[1](x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (x + residual, rms_norm(x + residual))."""
    return resolve("add_rms_norm", x.device)[1](x, residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, q, D); cos/sin: (B, q, D)."""
    return resolve("apply_rope", x.device)[1](x, cos, sin)


def cache_append(k_cache, v_cache, k, v, positions) -> None:
    """Write k/v (B, Hkv, q, D) into the caches (B_max, Hkv, T_max, D) at positions (B, q)."""
    return resolve("cache_append", k.device)[1](k_cache, v_cache, k, v, positions)


def attention(q, k_cache, v_cache, positions, kv_len=None) -> torch.Tensor:
    """q: (B, Hq, q, D) over the cache with per-row positions (B, q) -> (B, Hq, q, D)."""
    return resolve("attention", q.device)[1](q, k_cache, v_cache, positions, kv_len)


def process_logits(logits, temperature, top_k, top_p) -> torch.Tensor:
    """(..., V) logits -> (..., V) fp32 probabilities after temperature / top-k / top-p."""
    return resolve("process_logits", logits.device)[1](logits, temperature, top_k, top_p)


def greedy_with_confidence(logits):
    """(B, V) -> (token (B,), top-1 probability (B,))."""
    return resolve("greedy_with_confidence", logits.device)[1](logits)


def accept_greedy(drafts, n_drafts, target_tokens):
    """See :func:`kangaroo_rt.reference.accept_greedy`."""
    return resolve("accept_greedy", drafts.device)[1](drafts, n_drafts, target_tokens)


def accept_sampling(drafts, n_drafts, target_probs, draft_probs, uniforms, generator=None):
    """See :func:`kangaroo_rt.reference.accept_sampling`."""
    return resolve("accept_sampling", drafts.device)[1](drafts, n_drafts, target_probs, draft_probs,
                                                        uniforms, generator)
