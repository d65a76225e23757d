"""One entry point per op on the decode path; the model and the Kangaroo loop call only these.

Each op has a registry of implementations by backend. Dispatch picks the first backend in the
preference order ``cuda -> cpu -> triton -> torch`` that has an implementation and supports the tensor's
device; ``KANGAROO_RT_BACKEND=torch|triton|cuda|cpu`` (or :func:`set_backend`) forces one. The choice is
cached per (op, device type, forced backend), so a call costs two environment reads and a dict lookup.
The torch backend (``kangaroo_rt.reference``) serves every op on every device and is the automatic
choice on CPU for every op the CPU extension lacks; Triton kernels (``kernels/``, imported at their first
dispatch, never at ``import kangaroo_rt``) serve CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``
only when the triton backend is forced. The CUDA extension's ops (``kangaroo_rt._C`` through
:mod:`kangaroo_rt._ext`, imported at the first CUDA dispatch) come first on CUDA tensors when it was built;
when it was not, one warning says so and the next backend serves. The CPU extension's ops (``linear``,
``rms_norm``, ``add_rms_norm``, ``rope_cache_append``, ``attention``: ``kangaroo_rt._cpu`` through
:mod:`kangaroo_rt._cpu_ext`, imported at the first CPU dispatch) come first on CPU tensors when it was built
(``make venv`` builds it); when it was not, torch serves them without a warning.
Its kernels give every row (and every query) the bits it has alone, whatever the batch, which Kangaroo's
exact verification needs and torch's CPU ops do not promise. :func:`backend_table` tells which backend serves
each op on a given device.

Two rules keep a kernel from being the wrong choice at run time:

- Kernels have no backward: a call that autograd records (grad enabled and an input that requires grad, as
  in adapter training) is served by the torch reference, whatever the backend.
- A kernel backend that loads but cannot run (an extension with no kernel image for this GPU, a Triton that
  cannot compile) raises at its first call: one warning says so, and from then on the next backend serves
  that op on that device type.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from typing import Callable, ContextManager, Dict, Optional, Set, Tuple

import torch

from . import _cpu_ext, _ext, reference

BACKENDS = ("cuda", "cpu", "triton", "torch")

# op name -> backend -> (implementation, device types it runs on)
_REGISTRY: Dict[str, Dict[str, Tuple[Callable, Tuple[str, ...]]]] = {}
_forced: Optional[str] = None
# (op, device type, requested backend, TRITON_INTERPRET) -> (backend name, implementation)
_RESOLVED: Dict[Tuple[str, str, Optional[str], Optional[str]], Tuple[str, Callable]] = {}
# (op, device type, backend) whose implementation raised at its first call: dispatch skips them.
_BROKEN: Set[Tuple[str, str, str]] = set()


class LazyKernel:
    """A Triton launcher loaded on first use: ``import kangaroo_rt`` never imports triton."""

    def __init__(self, module: str, attr: str) -> None:
        self.module = module
        self.attr = attr
        self._fn: Optional[Callable] = None

    def load(self) -> Callable:
        if self._fn is None:
            self._fn = getattr(load_kernel_module(self.module), self.attr)
        return self._fn

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyKernel(kangaroo_rt.kernels.{self.module}.{self.attr})"


class LazyExtensionOp(LazyKernel):
    """An op of a compiled extension, loaded at its first dispatch, never by ``import kangaroo_rt``: the CUDA
    extension ``kangaroo_rt._C`` (wrapped by :mod:`kangaroo_rt._ext`) by default, or the CPU extension
    ``kangaroo_rt._cpu`` (wrapped by :mod:`kangaroo_rt._cpu_ext`) with ``wrapper=_cpu_ext``."""

    def __init__(self, attr: str, wrapper=_ext) -> None:
        super().__init__(wrapper.__name__.rpartition(".")[2], attr)
        self.wrapper = wrapper

    def load(self) -> Callable:
        if self._fn is None:
            self.wrapper.load()  # ImportError saying why and how to build it
            self._fn = getattr(self.wrapper, self.attr)
        return self._fn

    def __repr__(self) -> str:
        return f"LazyExtensionOp({self.wrapper._MODULE}.{self.attr})"


def _register_checkout_kernels() -> None:
    """In a source checkout, make the top-level ``kernels/`` folder the package ``kangaroo_rt.kernels``.

    ``kernels/`` has no ``__init__.py`` on purpose: a folder without one is only a namespace portion
    (PEP 420), which the import system ranks below every regular module or package of the same name
    anywhere on ``sys.path``. So a clone's root on ``sys.path`` (``python -m pytest``, ``python -c``)
    can never shadow another distribution's top-level ``kernels`` (Hugging Face's, which transformers
    imports). A wheel ships the folder inside the package (setup.py ``package_dir``), where the import
    system finds ``kangaroo_rt.kernels`` by itself. A checkout (``PYTHONPATH=.`` or an editable
    install, whose finder does not resolve a namespace subpackage of a regular package) has the folder
    beside the package instead; this registers it, as the import system would a namespace package.
    Runs once, at ``import kangaroo_rt``: a stat and a spec lookup, nothing imported.
    """
    name = "kangaroo_rt.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "kernels")
    if not (os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(folder)):
        return  # not a checkout: load_kernel_module says what is missing
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    setattr(sys.modules["kangaroo_rt"], "kernels", module)


def load_kernel_module(name: str):
    """``kangaroo_rt.kernels.<name>``: from the package in an install, from ``kernels/`` in a checkout."""
    try:
        return importlib.import_module(f"kangaroo_rt.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != "kangaroo_rt.kernels":
            raise
        raise ModuleNotFoundError("kangaroo_rt.kernels is missing: neither the installed package has kernels/ "
                                  "nor is this a source checkout with a top-level kernels/ folder; reinstall "
                                  "kangaroo_rt", name=exc.name) from None


_register_checkout_kernels()


def triton_available() -> bool:
    """Whether triton is importable (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


# Triton's interpreter before 3.7 keeps a reduction's result as a one-element array rather than a scalar,
# so kernels that use one as a loop bound (attention) or store one (accept, sampling) fail under
# TRITON_INTERPRET=1 there. Compiled Triton is not affected: 3.6 compiles every kernel (tests/triton_aot.py).
MIN_INTERPRETER_TRITON = (3, 7)
_interpreter_checked: Optional[bool] = None


def triton_interpreter_supported() -> Tuple[bool, str]:
    """(whether this triton's interpreter runs the kernels of kernels/, why not), read from package metadata."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False, "triton is not installed"
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_INTERPRETER_TRITON:
        need = ".".join(map(str, MIN_INTERPRETER_TRITON))
        return False, (f"triton {version}'s interpreter (TRITON_INTERPRET=1) cannot run kangaroo_rt's kernels "
                       f"(it needs triton >= {need}; compiled kernels on a GPU are not affected)")
    return True, ""


def _interpreter_ok() -> bool:
    """triton_interpreter_supported(), warned once when it is not."""
    global _interpreter_checked
    if _interpreter_checked is None:
        ok, why = triton_interpreter_supported()
        if not ok:
            warnings.warn(f"{why}: the torch reference serves CPU tensors", RuntimeWarning)
        _interpreter_checked = ok
    return _interpreter_checked


def device_context(device: torch.device) -> ContextManager:
    """Make ``device`` the current CUDA device for what runs inside (nothing off CUDA). Triton launches, CUDA
    graph capture and replay use the current device, not the tensors': a model on ``cuda:1`` needs this at
    every entry point (``generate``, ``Engine.step``)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def register(op: str, backend: str, fn: Callable, device_types: Tuple[str, ...]) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` for the given device types.

    Device type ``"interpret"`` means CPU tensors under ``TRITON_INTERPRET=1``; such an implementation
    is used on CPU only when its backend is forced (the torch reference is the fast CPU path).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, tuple(device_types))
    _RESOLVED.clear()


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


def _device_ok(device_types: Tuple[str, ...], device_type: str, forced: bool, interpret: bool) -> bool:
    if device_type in device_types:
        return True
    # Under the Triton interpreter, Triton kernels run on CPU tensors, but only when asked for.
    return forced and interpret and device_type == "cpu" and "interpret" in device_types and _interpreter_ok()


def _usable(backend: str, fn: Callable) -> Optional[Callable]:
    """The callable behind ``fn``, loading a lazy kernel; None when it cannot be loaded."""
    if not isinstance(fn, LazyKernel):
        return fn
    if backend == "triton" and not triton_available():
        return None
    if backend == "cuda" and not _ext.is_available():  # not built: said once, then Triton / torch serve
        return None
    if backend == "cpu" and not _cpu_ext.is_available():  # not built: torch serves (said once if it fails to load)
        return None
    try:
        return fn.load()
    except ImportError as exc:
        warnings.warn(f"{fn!r} could not be loaded ({exc}); using another backend", RuntimeWarning)
        return None


class _FirstRun:
    """A kernel backend's implementation until its first call returns.

    A backend that loads but cannot run raises there (no kernel image for this GPU, a Triton compile error):
    the (op, device type, backend) is then marked broken, one line of warning says so, and the call is served
    again by the backend dispatch picks next. ValueError and TypeError are the caller's bad inputs and pass
    through. After one good call the plain implementation replaces this wrapper in the cache.
    """

    def __init__(self, op: str, device_type: str, backend: str, fn: Callable, key: Tuple) -> None:
        self.op, self.device_type, self.backend, self.fn, self.key = op, device_type, backend, fn, key

    def __call__(self, *args, **kwargs):
        try:
            result = self.fn(*args, **kwargs)
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            _BROKEN.add((self.op, self.device_type, self.backend))
            _RESOLVED.clear()
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            backend, fn = resolve(self.op, torch.device(self.device_type))
            warnings.warn(f"kangaroo_rt: the {self.backend} backend's {self.op} failed on {self.device_type} "
                          f"({type(exc).__name__}: {first_line}); {backend} serves it from now on", RuntimeWarning,
                          stacklevel=3)
            return fn(*args, **kwargs)
        if _RESOLVED.get(self.key, (None, None))[1] is self:
            _RESOLVED[self.key] = (self.backend, self.fn)
        return result


def _resolve_uncached(op: str, device_type: str, wanted: Optional[str], interpret: bool) -> Tuple[str, Callable]:
    impls = _REGISTRY[op]

    def works(name: str) -> bool:
        return (name in impls and (op, device_type, name) not in _BROKEN
                and _device_ok(impls[name][1], device_type, wanted is not None, interpret))

    if wanted is not None:
        if works(wanted):
            fn = _usable(wanted, impls[wanted][0])
            if fn is not None:
                return wanted, fn
        # A forced backend that lacks this op (or cannot run it) falls back to the reference, never to another kernel.
        return "torch", impls["torch"][0]
    for name in BACKENDS:
        if works(name):
            fn = _usable(name, impls[name][0])
            if fn is not None:
                return name, fn
    raise RuntimeError(f"no backend implements {op} on {device_type}")


def resolve(op: str, device: torch.device) -> Tuple[str, Callable]:
    """(backend name, implementation) that serves ``op`` on ``device``; cached per (op, device type, choice).
    A kernel backend's implementation comes wrapped by :class:`_FirstRun` until its first call returns."""
    return _resolve_as(op, device, _requested_backend(), os.environ.get("TRITON_INTERPRET"))


def backends(names: Tuple[str, ...], device: torch.device) -> Tuple[str, ...]:
    """The backend that serves each op of ``names`` on ``device`` (the environment read once for all)."""
    wanted, interpret = _requested_backend(), os.environ.get("TRITON_INTERPRET")
    return tuple(_resolve_as(op, device, wanted, interpret)[0] for op in names)


def _resolve_as(op: str, device: torch.device, wanted: Optional[str], interpret: Optional[str]):
    key = (op, device.type, wanted, interpret)
    hit = _RESOLVED.get(key)
    if hit is None:
        name, fn = _resolve_uncached(op, device.type, wanted, interpret == "1")
        hit = _RESOLVED[key] = (name, fn if name == "torch" else _FirstRun(op, device.type, name, fn, key))
    return hit


def _serve(op: str, device: torch.device, *differentiable: torch.Tensor) -> Callable:
    """The implementation of ``op`` for tensors on ``device``; the torch reference when autograd records
    through any of ``differentiable`` (no kernel has a backward)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        return _REGISTRY[op]["torch"][0]
    return resolve(op, device)[1]


def backend_table(device: torch.device | str = "cpu") -> Dict[str, str]:
    """{op: backend} as dispatch would choose on ``device`` now."""
    device = torch.device(device)
    return {op: resolve(op, device)[0] for op in sorted(_REGISTRY)}


_ALL = ("cpu", "cuda", "mps", "xpu", "meta")
_TORCH_OPS = ("linear", "rms_norm", "add_rms_norm", "rope_cache_append", "attention", "silu_mul",
              "process_logits", "sample", "argmax", "greedy_with_confidence", "accept_greedy", "accept_sampling",
              "commit_tokens", "accept_greedy_commit")
for _name in _TORCH_OPS:
    register(_name, "torch", getattr(reference, _name), _ALL)

# op -> (module in kernels/, launcher): Triton kernels, one file per op, loaded at first dispatch.
TRITON_KERNELS = {
    "rms_norm": ("rms_norm", "rms_norm"),
    "add_rms_norm": ("rms_norm", "add_rms_norm"),
    "rope_cache_append": ("rope_cache_append", "rope_cache_append"),
    "attention": ("attention", "attention"),
    "greedy_with_confidence": ("sampling", "greedy_with_confidence"),
    "accept_greedy": ("accept", "accept_greedy"),
    "accept_sampling": ("accept", "accept_sampling"),
    "commit_tokens": ("accept", "commit_tokens"),
    "accept_greedy_commit": ("accept", "accept_greedy_commit"),
}
for _name, (_module, _attr) in TRITON_KERNELS.items():
    register(_name, "triton", LazyKernel(_module, _attr), ("cuda", "interpret"))

# The CUDA extension's ops (csrc/), preferred on CUDA tensors when kangaroo_rt._C was built.
for _name in _ext.OPS:
    register(_name, "cuda", LazyExtensionOp(_name), ("cuda",))

# The CPU extension's ops (csrc/cpu/), preferred on CPU tensors when kangaroo_rt._cpu was built.
for _name in _cpu_ext.OPS:
    register(_name, "cpu", LazyExtensionOp(_name, _cpu_ext), ("cpu",))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: (..., K) @ weight (N, K)^T (+ bias (N,)) -> (..., N), as ``torch.nn.functional.linear``. On CPU with the
    CPU extension, fp32/bf16 rows get the bits they have alone whatever the batch (csrc/cpu/linear.cpp)."""
    if bias is None:
        return _serve("linear", x.device, x, weight)(x, weight, None)
    return _serve("linear", x.device, x, weight, bias)(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) -> (..., D)."""
    return _serve("rms_norm", x.device, x, weight)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (x + residual, rms_norm(x + residual))."""
    return _serve("add_rms_norm", x.device, x, residual, weight)(x, residual, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: (..., n) each -> (..., n), the activation of a Llama MLP."""
    return _serve("silu_mul", gate.device, gate, up)(gate, up)


def rope_cache_append(q, k, v, cos, sin, k_cache, v_cache, positions) -> torch.Tensor:
    """Rotate q (B, Hq, q, D) and k (B, Hkv, q, D), write rotated k and v into the caches at positions (B, q).

    Returns the rotated q (B, Hq, q, D); cos/sin: (B, q, D).
    """
    return _serve("rope_cache_append", q.device, q, k, v, cos, sin)(q, k, v, cos, sin, k_cache, v_cache, positions)


def attention(q, k_cache, v_cache, positions, kv_len=None) -> torch.Tensor:
    """q: (B, Hq, q, D) over the cache with per-row positions (B, q) -> (B, Hq, q, D)."""
    return _serve("attention", q.device, q, k_cache, v_cache)(q, k_cache, v_cache, positions, kv_len)


def process_logits(logits, temperature, top_k, top_p) -> torch.Tensor:
    """(..., V) logits -> (..., V) fp32 probabilities after temperature / top-k / top-p."""
    return _serve("process_logits", logits.device, logits)(logits, temperature, top_k, top_p)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
           u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row drawn from probs (B, V) fp32 -> (B,) int64, as ``torch.multinomial(probs, 1)`` draws it (on
    CPU with the extension: one pass per row, from one float64 uniform per row of ``generator``); u (B,) float64 in
    [0, 1): those uniforms instead of the generator's (see :func:`kangaroo_rt.reference.sample`)."""
    return resolve("sample", probs.device)[1](probs, generator, u)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...,) int64: the first index of the largest logit (a NaN the largest), as ``argmax(-1)``."""
    return resolve("argmax", logits.device)[1](logits)


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


def commit_tokens(out, n_gen, finished, tokens, count, eos):
    """See :func:`kangaroo_rt.reference.commit_tokens` (in place on out / n_gen / finished)."""
    return resolve("commit_tokens", tokens.device)[1](out, n_gen, finished, tokens, count, eos)


def accept_greedy_commit(drafts, n_drafts, target_tokens, out, n_gen, finished, pos, eos):
    """See :func:`kangaroo_rt.reference.accept_greedy_commit` (fused accept + commit, no host sync)."""
    return resolve("accept_greedy_commit", drafts.device)[1](drafts, n_drafts, target_tokens, out, n_gen,
                                                             finished, pos, eos)
