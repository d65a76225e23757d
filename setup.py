"""Packaging for kangaroo_rt.

The pure-Python install always works. Two optional extensions, built independently of each other:

- ``kangaroo_rt._cpu``, the CPU kernels (csrc/cpu/*.cpp, plain C++17 with a C ABI, + csrc/cpu_bindings*.cpp):
  the decode path's kernels. Builds in about 35 s on 2 cores, about a minute with MAX_JOBS=1 (csrc/cpu/*.cpp take
  seconds; the rest is the torch headers of the two bindings files, which compile in parallel).
- ``kangaroo_rt._C``, the CUDA kernels (csrc/*.cu + csrc/bindings.cpp).

    KANGAROO_RT_BUILD_CPU=0       never build kangaroo_rt._cpu
    KANGAROO_RT_BUILD_CPU=1       build it; fail with a clear error when that is impossible
    KANGAROO_RT_BUILD_CPU unset   build it when csrc/cpu_bindings.cpp exists, torch is importable here and a
                                  C++ compiler is found (CXX, else c++ on PATH); otherwise say why in one line
    KANGAROO_RT_BUILD_CUDA=0      never build kangaroo_rt._C
    KANGAROO_RT_BUILD_CUDA=1      build it; fail with a clear error when that is impossible
    KANGAROO_RT_BUILD_CUDA unset  build it when csrc/bindings.cpp exists, torch has CUDA
                                  (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME / nvcc);
                                  otherwise say why in one line
    MAX_JOBS                      parallel compile jobs (read by torch's ninja build)
    TORCH_CUDA_ARCH_LIST          target architectures, default "8.0;9.0"

torch is imported only when an extension may be built. Under pip's default build isolation torch is not
importable, so either extension needs ``pip install --no-build-isolation`` (``make venv`` passes it) or
``python setup.py build_ext --inplace``. The CPU kernels are compiled without -ffast-math and with
-ffp-contract=off: their fixed reduction order (csrc/cpu/linear.cpp) needs strict IEEE arithmetic.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _say(message):
    print(f"kangaroo_rt setup: {message}", file=sys.stderr)


def _read_build_flag(name="KANGAROO_RT_BUILD_CUDA"):
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"kangaroo_rt setup: {name} must be 0 or 1, got {value!r}")
    return value


def _max_jobs():
    max_jobs = os.environ.get("MAX_JOBS", "").strip()
    if max_jobs and not (max_jobs.isdigit() and int(max_jobs) > 0):
        raise SystemExit(f"kangaroo_rt setup: MAX_JOBS must be a positive integer, got {max_jobs!r}")
    return max_jobs


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
    """Return (ext_modules, cmdclass) for kangaroo_rt._C, or ([], {}) when it is not built."""
    flag = _read_build_flag()
    if flag == "0":
        _say("KANGAROO_RT_BUILD_CUDA=0: no kangaroo_rt._C (CUDA ops use Triton/torch)")
        return [], {}
    forced = flag == "1"

    def skip(reason):
        if forced:
            raise SystemExit(f"kangaroo_rt setup: KANGAROO_RT_BUILD_CUDA=1 but kangaroo_rt._C cannot be built: {reason}")
        _say(f"no kangaroo_rt._C (CUDA ops use Triton/torch): {reason}")
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

    max_jobs = _max_jobs()
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


def _cxx_compiler():
    """The C++ compiler the build would use (CXX, else c++), when it is on PATH."""
    import shlex
    import shutil

    words = shlex.split(os.environ.get("CXX", "").strip() or "c++")
    return shutil.which(words[0]) if words else None


def _cpu_extension():
    """Return (ext_modules, cmdclass) for kangaroo_rt._cpu, or ([], {}) when it is not built."""
    flag = _read_build_flag("KANGAROO_RT_BUILD_CPU")
    if flag == "0":
        _say("KANGAROO_RT_BUILD_CPU=0: no kangaroo_rt._cpu (CPU linear layers use torch)")
        return [], {}
    forced = flag == "1"

    def skip(reason):
        if forced:
            raise SystemExit(f"kangaroo_rt setup: KANGAROO_RT_BUILD_CPU=1 but kangaroo_rt._cpu cannot be built: "
                             f"{reason}")
        _say(f"no kangaroo_rt._cpu (CPU linear layers use torch): {reason}")
        return [], {}

    bindings = os.path.join("csrc", "cpu_bindings.cpp")
    if not os.path.isfile(os.path.join(ROOT, bindings)):
        return skip(f"{bindings} not found")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        return skip(f"torch is not importable in the build environment ({exc}); "
                    "use pip install --no-build-isolation")
    compiler = _cxx_compiler()
    if compiler is None:
        return skip("no C++ compiler found (set CXX or put c++ on PATH)")
    if sys.platform == "win32":
        return skip("the build flags are written for GCC and Clang; Windows is not supported")
    max_jobs = _max_jobs()
    # -falign-functions=64 / -falign-loops=64: the kernels' loops keep their place against cache lines and the op
    # cache when other code changes size (docs/design.md: unaligned, a change elsewhere moved a pass by 3-30%).
    flags = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-falign-functions=64", "-falign-loops=64"]
    link = []
    # at::parallel_for is an inline template: with torch's OpenMP backend it must be compiled with -fopenmp, or
    # it runs serially (the loader then shares torch's libgomp, already loaded).
    if torch.backends.openmp.is_available() and sys.platform != "darwin":
        flags.append("-fopenmp")
        link.append("-fopenmp")
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    sources += [bindings, os.path.join("csrc", "cpu_bindings_decode.cpp")]
    _say(f"building kangaroo_rt._cpu from {len(sources)} files with {compiler}, MAX_JOBS={max_jobs or 'default'}")
    extension = CppExtension(
        name="kangaroo_rt._cpu",
        sources=sources,
        extra_compile_args=flags,
        extra_link_args=link,
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


cpu_modules, cpu_cmdclass = _cpu_extension()
cuda_modules, cuda_cmdclass = _cuda_extension()
ext_modules = cpu_modules + cuda_modules
cmdclass = {**cpu_cmdclass, **cuda_cmdclass}

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
        "kangaroo_rt": [f"assets/**/*.{ext}" for ext in ("json", "jsonl", "safetensors", "bin", "md", "txt", "png")],
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
        # `kangaroo-rt bench --llama-cpp`: llama.cpp as a baseline. Compiles llama.cpp from source (about 20 minutes
        # on 2 cores), so it is never in `make venv`'s extras; see the README, "llama.cpp baseline".
        "llamacpp": ["llama-cpp-python==0.3.36", "gguf==0.19.0"],
    },
    entry_points={"console_scripts": ["kangaroo-rt = kangaroo_rt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
