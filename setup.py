"""Packaging for kangaroo_rt.

The pure-Python install always works. The optional CUDA extension ``kangaroo_rt._C`` (csrc/*.cu +
csrc/bindings.cpp) is built only when asked for or when everything it needs is present:

    KANGAROO_RT_BUILD_CUDA=0      never build it (pure-Python install)
    KANGAROO_RT_BUILD_CUDA=1      build it; fail with a clear error when that is impossible
    KANGAROO_RT_BUILD_CUDA unset  build it when csrc/bindings.cpp exists, torch has CUDA
                                  (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME / nvcc);
                                  otherwise say why in one line and install pure-Python
    MAX_JOBS                      parallel compile jobs (read by torch's ninja build)
    TORCH_CUDA_ARCH_LIST          target architectures, default "8.0;9.0"

torch is imported only when the extension may be built. Under pip's default build isolation torch is
not importable, so a CUDA build needs ``pip install --no-build-isolation`` (or
``python setup.py build_ext --inplace``).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(message):
    print(f"kangaroo_rt setup: {message}", file=sys.stderr)


def _read_build_flag():
    value = os.environ.get("KANGAROO_RT_BUILD_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"kangaroo_rt setup: KANGAROO_RT_BUILD_CUDA must be 0 or 1, got {value!r}")
    return value


def _has_cuda_headers(folder):
    return os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h"))


def _set_cuda_home():
    """Without CUDA_HOME/CUDA_PATH, torch guesses the toolkit from the folder of ``nvcc`` on PATH, which a
    wrapper script (/usr/local/bin/nvcc) misleads: point CUDA_HOME at nvcc's real toolkit or /usr/local/cuda
    when that guess would have no headers. Runs before torch.utils.cpp_extension reads it."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(nvcc)) if nvcc else None
    if guess is None or _has_cuda_headers(guess):
        return
    for candidate in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if _has_cuda_headers(candidate):
            os.environ["CUDA_HOME"] = candidate
            return


def _cuda_extension():
    """Return (ext_modules, cmdclass) for kangaroo_rt._C, or ([], {}) for a pure-Python install."""
    flag = _read_build_flag()
    if flag == "0":
        _say("KANGAROO_RT_BUILD_CUDA=0: pure-Python install (no kangaroo_rt._C)")
        return [], {}
    forced = flag == "1"

    def skip(reason):
        if forced:
            raise SystemExit(f"kangaroo_rt setup: KANGAROO_RT_BUILD_CUDA=1 but kangaroo_rt._C cannot be built: {reason}")
        _say(f"pure-Python install (no kangaroo_rt._C): {reason}")
        return [], {}

    if not os.path.isfile(os.path.join(ROOT, "csrc", "bindings.cpp")):
        return skip("csrc/bindings.cpp not found")
    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return skip(f"torch is not importable in the build environment ({exc}); "
                    "use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} was built without CUDA")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if not _has_cuda_headers(CUDA_HOME):
        return skip(f"the CUDA toolkit torch found, CUDA_HOME={CUDA_HOME}, has no include/cuda_runtime.h: "
                    "set CUDA_HOME to the toolkit's folder, e.g. /usr/local/cuda")

    max_jobs = os.environ.get("MAX_JOBS", "").strip()
    if max_jobs and not (max_jobs.isdigit() and int(max_jobs) > 0):
        raise SystemExit(f"kangaroo_rt setup: MAX_JOBS must be a positive integer, got {max_jobs!r}")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    cuda_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    sources = cuda_sources + [os.path.join("csrc", "bindings.cpp")]
    _say(f"building kangaroo_rt._C from {len(sources)} files with CUDA {torch.version.cuda} at {CUDA_HOME}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={max_jobs or 'default'}")
    extension = CUDAExtension(
        name="kangaroo_rt._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}


def _packages():
    packages = find_packages(where=ROOT, include=["kangaroo_rt", "kangaroo_rt.*"])
    packages.append("kangaroo_rt.kernels")
    packages += ["kangaroo_rt.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))]
    return packages


def _long_description():
    path = os.path.join(ROOT, "README.md")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _cuda_extension()

setup(
    name="kangaroo_rt",
    version="0.1.0",
    description="Kangaroo self-speculative decoding runtime (arXiv 2404.18911)",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir={"kangaroo_rt.kernels": "kernels"},
    package_data={
        "kangaroo_rt": [f"assets/**/*.{ext}" for ext in ("json", "jsonl", "safetensors", "bin", "md", "txt")],
    },
    # Lower bounds only: a user's own environment may hold anything newer. The versions the suite last passed
    # with are pinned in constraints.txt (`make venv` installs with it, `make lock` moves it). Add an upper bound
    # only for a known break, with the reason beside it. transformers >= 4.56: `from_pretrained(dtype=...)`.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "dev": ["pytest>=7", "transformers>=4.56", "safetensors", "tokenizers", "scipy", "openai>=1.30", "httpx"],
        "hf": ["transformers>=4.56", "safetensors", "tokenizers"],
        "bench": ["matplotlib", "tqdm"],
        "triton": ["triton>=3.0"],
        "serve": ["fastapi>=0.100", "uvicorn>=0.23"],
        # `kangaroo-rt fetch smollm2` and .gguf targets: transformers' GGUF loader (versions it was checked with)
        "gguf": ["gguf==0.19.0", "accelerate==1.16.0"],
    },
    entry_points={"console_scripts": ["kangaroo-rt = kangaroo_rt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
