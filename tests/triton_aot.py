"""Ahead-of-time compile of every Triton kernel, as its launcher calls it, for CUDA GPUs, on a machine without one.

Each launcher in kernels/ runs on ``meta`` tensors at LLM shapes (7B-like heads, head dims 64/128, vocab
32000, half and full precision) with its JIT kernels swapped for recorders, so nothing executes; every
distinct recorded launch (signature, constexprs, num_warps) is then compiled by ``triton.compile`` for each
target architecture down to a cubin (Triton's own ptxas), and the shared memory it needs is checked
against that architecture's per-block limit. This catches what TRITON_INTERPRET cannot: type and layout
errors of the compiler, unsupported operations, and kernels that would fail to launch for lack of
shared memory. Run it without TRITON_INTERPRET (the interpreter replaces the JIT functions):

    python tests/triton_aot.py [--arch 80,90]       # prints one line per compiled launch; exit 1 on failure
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the largest dynamic shared memory one block may use (bytes), by compute capability
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                  torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
MODULES = ("rms_norm", "rope_cache_append", "attention", "accept", "sampling")


class Launch:
    """One recorded kernel launch: the JIT function, its bound arguments and launch options."""

    def __init__(self, fn, args: Sequence[Any], kwargs: Dict[str, Any]):
        self.fn = fn
        names = fn.arg_names
        if len(args) > len(names):
            raise TypeError(f"{fn.__name__}: {len(args)} positional arguments for {len(names)} parameters")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        missing = [n for n in names if n not in bound]
        if missing:
            raise TypeError(f"{fn.__name__}: launch misses {missing}")
        self.options = {k: v for k, v in kwargs.items() if k not in names}
        self.signature: Dict[str, str] = {}
        self.constexprs: Dict[str, Any] = {}
        for param in fn.params:
            value = bound[param.name]
            if param.is_constexpr or value is None or (type(value) is int and value == 1):
                # Triton specializes ints equal to 1 (and None) into constants, as the launch would
                self.signature[param.name] = "constexpr"
                self.constexprs[param.name] = value
            else:
                self.signature[param.name] = _scalar_type(fn.__name__, param.name, value)

    @property
    def key(self) -> Tuple:
        return (self.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        ptrs = ",".join(sorted({t[1:] for t in self.signature.values() if t.startswith("*")}))
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.fn.__name__}[{ptrs}]({consts}; {opts})"


def _scalar_type(kernel: str, name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise TypeError(f"{kernel}: {name} has dtype {value.dtype}, which Triton does not take")
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{kernel}: {name} = {value!r} ({type(value).__name__}) is not a kernel argument type")


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch and runs nothing."""

    def __init__(self, fn, log: List[Launch]):
        self.fn, self.log = fn, log

    def __getitem__(self, grid) -> Callable[..., None]:
        def launch(*args, **kwargs):
            self.log.append(Launch(self.fn, args, kwargs))
        return launch


@contextlib.contextmanager
def recording(module) -> Iterator[List[Launch]]:
    """Swap every JIT kernel of ``module`` that a launcher calls (names ending in _kernel) for a recorder."""
    from triton.runtime.jit import JITFunction

    log: List[Launch] = []
    saved = {name: obj for name, obj in vars(module).items()
             if isinstance(obj, JITFunction) and name.endswith("_kernel")}
    if not saved:
        raise RuntimeError(f"{module.__name__} has no JIT kernels: is TRITON_INTERPRET set?")
    try:
        for name, fn in saved.items():
            setattr(module, name, _Recorder(fn, log))
        yield log
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _long(*shape):
    return _meta(*shape, dtype=torch.long)


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _calls_rms_norm(mod):
    for dtype in DTYPES:
        for shape in ((8, 7, 4096), (4, 5120), (2, 256)):
            x, w = _meta(*shape, dtype=dtype), _meta(shape[-1], dtype=dtype)
            mod.rms_norm(x, w, 1e-6)
            mod.add_rms_norm(x, _meta(*shape, dtype=dtype), w, 1e-6)


def _calls_rope_cache_append(mod):
    for dtype in DTYPES:
        for b, hq, hkv, q_len, d, t in ((1, 32, 32, 1, 128, 2048), (8, 32, 8, 7, 128, 4096), (4, 8, 2, 300, 64, 512)):
            q = _meta(b, q_len, hq, d, dtype=dtype).transpose(1, 2)  # strided as the model passes them
            k = _meta(b, q_len, hkv, d, dtype=dtype).transpose(1, 2)
            v = _meta(b, q_len, hkv, d, dtype=dtype).transpose(1, 2)
            cos, sin = _meta(b, q_len, d, dtype=dtype), _meta(b, q_len, d, dtype=dtype)
            caches = _meta(b, hkv, t, d, dtype=dtype), _meta(b, hkv, t, d, dtype=dtype)
            mod.rope_cache_append(q, k, v, cos, sin, *caches, _long(b, q_len))


def _calls_attention(mod):
    # (B, Hq, Hkv, q_len, D, T_max, keys per split or 0): decode and GQA verify with split-K (and the merge),
    # prefill and a verify in one pass
    cases = [(1, 32, 32, 1, 128, 2048, mod.SPLIT_KEYS), (8, 32, 8, 7, 128, 4096, mod.SPLIT_KEYS),
             (2, 32, 32, 300, 128, 512, 0)]
    for dtype in DTYPES:
        for b, hq, hkv, q_len, d, t, split in cases + ([(4, 32, 8, 7, 64, 1024, 0)] if dtype == torch.float16 else []):
            q = _meta(b, q_len, hq, d, dtype=dtype).transpose(1, 2)  # strided as the model passes it
            caches = _meta(b, hkv, t, d, dtype=dtype), _meta(b, hkv, t, d, dtype=dtype)
            mod.attention(q, *caches, _long(b, q_len), split_size=split)


def _calls_accept(mod):
    for b, k in ((1, 6), (16, 8)):
        drafts, n_drafts, target = _long(b, k), _long(b), _long(b, k + 1)
        out, n_gen, pos = _long(b, 256), _long(b), _long(b)
        finished = _meta(b, dtype=torch.bool)
        mod.accept_greedy(drafts, n_drafts, target)
        for eos in (None, _long(2)):
            mod.accept_greedy_commit(drafts, n_drafts, target, out, n_gen, finished, pos, eos)
            mod.commit_tokens(out, n_gen, finished, target, n_drafts, eos)
        probs = _meta(b, k + 1, 32000, dtype=torch.float32)
        mod.accept_sampling_counts(drafts, n_drafts, probs, probs[:, :k], _meta(b, k, dtype=torch.float32))


def _calls_sampling(mod):
    for dtype in DTYPES:
        for b, vocab in ((1, 32000), (16, 32000), (4, 4096), (2, 151936)):
            mod.greedy_with_confidence(_meta(b, vocab, dtype=dtype))


CALLS: Dict[str, Callable] = {"rms_norm": _calls_rms_norm, "rope_cache_append": _calls_rope_cache_append,
                              "attention": _calls_attention, "accept": _calls_accept, "sampling": _calls_sampling}


def record_launches(modules: Sequence[str] = MODULES) -> List[Launch]:
    """The distinct launches the launchers of ``modules`` make at the shapes above."""
    from kangaroo_rt import ops

    seen: Dict[Tuple, Launch] = {}
    for name in modules:
        module = ops.load_kernel_module(name)
        with recording(module) as log:
            CALLS[name](module)
        if not log:
            raise RuntimeError(f"kernels/{name}.py launched nothing at the shapes of triton_aot.py")
        for launch in log:
            seen.setdefault(launch.key, launch)
    return list(seen.values())


def compile_launch(launch: Launch, arch: int):
    """triton.compile of one launch for sm_<arch>; returns the compiled kernel (its asm holds the cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch.fn, signature=dict(launch.signature), constexprs=dict(launch.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))


def check(archs: Sequence[int], modules: Sequence[str] = MODULES, echo: Callable[[str], None] = print) -> List[str]:
    """Compile every recorded launch for every arch; returns the failures (empty when all compiled and fit)."""
    failures = []
    launches = record_launches(modules)
    echo(f"{len(launches)} distinct launches of {len(modules)} kernel files, archs {', '.join(map(str, archs))}")
    for arch in archs:
        limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
        for launch in launches:
            start = time.perf_counter()
            try:
                compiled = compile_launch(launch, arch)
            except Exception as exc:  # any compiler error is a finding, reported with the launch
                failures.append(f"sm_{arch} {launch.describe()}: {type(exc).__name__}: {str(exc)[:2000]}")
                echo(f"FAIL sm_{arch} {launch.describe()}: {type(exc).__name__}")
                continue
            shared = compiled.metadata.shared
            line = f"sm_{arch} {launch.describe()}: shared {shared} B, {time.perf_counter() - start:.1f} s"
            if not compiled.asm.get("cubin"):
                failures.append(f"{line}: no cubin")
            elif shared > limit:
                failures.append(f"{line}: over the {limit} B per-block limit")
            echo(line)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="comma list of compute capabilities, e.g. 80,90")
    parser.add_argument("--modules", default=",".join(MODULES), help=f"comma list of {', '.join(MODULES)}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the JIT functions this compiles")
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be a comma list of integers, got {args.arch!r}")
    modules = [m for m in args.modules.split(",") if m.strip()]
    unknown = sorted(set(modules) - set(MODULES))
    if unknown or not archs:
        parser.error(f"unknown modules {unknown} (known: {', '.join(MODULES)})" if unknown else "no --arch given")
    failures = check(archs, modules)
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"{'FAILED: ' + str(len(failures)) if failures else 'all compiled'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
