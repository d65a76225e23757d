"""Compile check of csrc/: every .cu builds with plain nvcc for an old (sm_70/sm_75) and the current
(sm_80, sm_90) architectures; the launcher header is plain C; bindings.cpp compiles against torch's headers.

Skipped, with the reason, where nvcc (or the CUDA headers, for bindings.cpp) is absent.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))


def _nvcc():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): the .cu compile check needs a CUDA toolkit")


def _archs(nvcc):
    """(old arch, the current ones) this nvcc can build: sm_70 where it still exists (toolkits < 13), else sm_75."""
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout.split()
    old = "70" if "compute_70" in listed else "75"
    current = [a for a in ("80", "90") if f"compute_{a}" in listed]
    return [old] + current


def _compile_cu(nvcc, archs, std, out_dir):
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd = [nvcc, "-c", f"-std={std}", "-O2", "-Werror", "all-warnings", f"-I{CSRC}", *gencode, *CU_FILES,
           "--output-directory", str(out_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    built = sorted(os.listdir(out_dir))
    assert built == sorted(os.path.basename(f)[:-3] + ".o" for f in CU_FILES)


@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_every_cu_file_compiles(tmp_path, std):
    """C++17 for every arch (torch < 2.12 builds, old toolkits); C++20, which torch >= 2.12's build passes to
    nvcc, for the current archs."""
    nvcc = _nvcc()
    assert CU_FILES, "csrc/ has no .cu files"
    archs = _archs(nvcc)
    _compile_cu(nvcc, archs if std == "c++17" else archs[1:] or archs, std, tmp_path)


def test_cu_files_do_not_include_torch():
    """The .cu files stay ATen/pybind11-free: all torch glue lives in bindings.cpp."""
    for path in CU_FILES + sorted(glob.glob(os.path.join(CSRC, "*.h"))):
        with open(path) as f:
            text = f.read()
        includes = [line for line in text.splitlines() if line.lstrip().startswith("#include")]
        assert includes, f"{os.path.basename(path)} includes nothing"
        for banned in ("torch/", "ATen/", "c10/", "pybind11", "Python.h"):
            assert not [i for i in includes if banned in i], f"{os.path.basename(path)} includes {banned}"


def test_launcher_header_is_plain_c(tmp_path):
    """kangaroo_rt.h declares C launchers: a .c file that uses it builds (nvcc hands .c files to the host C
    compiler, with the toolkit's include path)."""
    nvcc = _nvcc()
    src = tmp_path / "use_header.c"
    src.write_text('#include "kangaroo_rt.h"\nint main(void) { kr_rope_args a = {0}; return (int)a.batch; }\n')
    res = subprocess.run([nvcc, "-c", "-Xcompiler", "-std=c99,-Wall,-Werror", f"-I{CSRC}", str(src),
                          "-o", str(tmp_path / "use_header.o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def _torch_cxx_std():
    """The C++ standard torch's cpp_extension compiles extensions with: C++20 from torch 2.12 on."""
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 12) else "c++17"


def test_bindings_compile_against_torch_headers(tmp_path):
    """bindings.cpp, syntax only, against this torch's headers (~20 s). A CPU build of torch ships the
    c10/cuda headers but not the one that CMake generates for CUDA builds (cuda_cmake_macros.h): it is
    written into tmp_path with what a CUDA build of torch defines, so the check runs on CPU CI too."""
    from torch.utils.cpp_extension import CUDA_HOME, include_paths
    import sysconfig

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"]
    includes = [os.path.join(c, "include") for c in candidates if c]
    include = next((i for i in includes if os.path.isfile(os.path.join(i, "cuda_runtime.h"))), None)
    if include is None:
        pytest.skip(f"no cuda_runtime.h under {includes} (set CUDA_HOME to the CUDA toolkit)")
    torch_includes = include_paths()
    macros = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not any(os.path.isfile(os.path.join(p, macros)) for p in torch_includes):
        if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "CUDAGuard.h")) for p in torch_includes):
            pytest.skip(f"torch {torch.__version__} ships no c10/cuda headers")
        shim = tmp_path / macros
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        torch_includes = [str(tmp_path)] + torch_includes
    flags = [f"-I{p}" for p in torch_includes] + [f"-I{sysconfig.get_paths()['include']}", f"-I{include}",
                                                  f"-I{CSRC}"]
    res = subprocess.run([cxx, f"-std={_torch_cxx_std()}", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C",
                          "-DTORCH_API_INCLUDE_EXTENSION_H", *flags, os.path.join(CSRC, "bindings.cpp")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def test_extension_is_lazy_optional_and_said_once():
    """Without kangaroo_rt._C: import never loads it, CUDA dispatch falls through to Triton/torch after one
    warning, and the wrappers send CPU tensors to the reference."""
    code = (
        "import sys, warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "import kangaroo_rt\n"
        "from kangaroo_rt import _ext, ops, reference\n"
        "assert 'kangaroo_rt._C' not in sys.modules\n"
        "assert _ext.is_built() is False\n"
        "reg = {op for op, impls in ops._REGISTRY.items() if 'cuda' in impls}\n"
        "assert reg == set(_ext.OPS), reg\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    t1 = ops.backend_table('cuda'); ops._RESOLVED.clear(); t2 = ops.backend_table('cuda')\n"
        "assert 'cuda' not in set(t1.values()) | set(t2.values()), t1\n"
        "msgs = [str(w.message) for w in caught if 'kangaroo_rt._C' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'build_ext --inplace' in msgs[0], msgs\n"
        "x, w = torch.randn(2, 8), torch.randn(8)\n"
        "assert torch.equal(_ext.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))\n"
        "try:\n"
        "    _ext.load()\n"
        "    raise SystemExit('load() should fail')\n"
        "except ImportError as exc:\n"
        "    assert 'KANGAROO_RT_BUILD_CUDA=1' in str(exc)\n"
        "print('ok')\n"
    )
    if glob.glob(os.path.join(ROOT, "kangaroo_rt", "_C*")):
        pytest.skip("kangaroo_rt._C is built in this checkout: the absent-extension path cannot be shown here")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_bindings_check_row_inputs_and_clear_stale_errors():
    """bindings.cpp, read as text (its behaviour needs a GPU; tests/test_gpu_kernels_realistic.py runs it):
    every launcher goes through run_launcher, which clears an earlier error before the launch, so that the
    launcher's cudaGetLastError names this launch; n_drafts and count are checked to be (B,) before a kernel
    reads B values from them."""
    import re

    with open(os.path.join(CSRC, "bindings.cpp")) as f:
        text = f.read()
    helper = text[text.index("void run_launcher("):]
    assert helper.index("cudaGetLastError()") < helper.index("launcher()")
    launches = set(re.findall(r"\b(kr_(?!while_graph_create|while_graph_destroy|while_graph_supported)\w+)\(", text))
    assert launches, "no launcher calls found"
    for name in launches:
        for call in re.finditer(rf"\b{name}\(", text):
            before = text[max(0, call.start() - 60):call.start()]
            assert "run_launcher(" in before, f"{name} is called outside run_launcher"
    for fn, rows in (("accept_greedy", "n_drafts"), ("commit_tokens", "count"), ("accept_greedy_commit", "n_drafts")):
        body = text[re.search(rf"\n[\w:<>, ]+ {fn}\(", text).start():]
        body = body[:body.index("\n}\n")]
        assert f'check_rows({rows}, batch, "{rows}", what)' in body, fn
