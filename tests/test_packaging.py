"""Packaging: the top-level kernels/ folder never shadows another distribution's ``kernels``, the package
imports from a clone's root, an editable install and a wheel, and the package's modules import without cycles."""
import ast
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "kangaroo_rt")

# Run from the repository root with `python -c`, so that the root is sys.path[0], as `python -m pytest`,
# a notebook or a script in a clone has it. The Triton kernel runs in the interpreter on a CPU tensor.
ROOT_IMPORT = r"""
import importlib.util, os, sys
root = os.path.realpath(os.getcwd())
spec = importlib.util.find_spec("kernels")
origin = spec.origin if spec is not None else None
if origin is not None:
    clone_kernels = os.path.join(root, "kernels") + os.sep
    assert not os.path.realpath(origin).startswith(clone_kernels), f"kernels shadowed by the clone: {origin}"
from transformers import LlamaForCausalLM
import torch
import kangaroo_rt.kernels.rms_norm as k
from kangaroo_rt import reference
x, w = torch.randn(3, 64), torch.randn(64)
torch.testing.assert_close(k.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
print(origin)
print(os.path.realpath(k.__file__))
"""


def _python(code, cwd, **env):
    full_env = dict(os.environ, TRITON_INTERPRET="1", **env)
    full_env.pop("PYTHONPATH", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_kernels_folder_is_not_a_regular_package():
    """A folder without __init__.py is only a namespace portion (PEP 420): a regular ``kernels`` anywhere on
    sys.path wins over it. Adding one back would shadow Hugging Face's ``kernels`` again."""
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def test_repository_root_does_not_shadow_the_kernels_distribution():
    pytest.importorskip("transformers")
    pytest.importorskip("triton")
    res = _python(ROOT_IMPORT, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    origin, kernel_file = res.stdout.split()
    assert kernel_file == os.path.realpath(os.path.join(ROOT, "kernels", "rms_norm.py"))


def test_installed_kernels_distribution_is_the_one_transformers_gets():
    """With Hugging Face's kernels installed (transformers >= 5.25 depends on it), the root's folder must
    not be what `import kernels` returns there."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("the Hugging Face kernels distribution is not installed")
    res = _python("import kernels, os; print(os.path.realpath(kernels.__file__))", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    installed = os.path.realpath(str(dist.locate_file("kernels/__init__.py")))
    assert res.stdout.strip() == installed


def test_wheel_ships_the_kernels_inside_the_package(tmp_path):
    """A wheel built from the checkout carries kernels/ as kangaroo_rt/kernels/, and imports from there in
    a directory that is not the clone."""
    pytest.importorskip("setuptools")
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), ROOT], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, KANGAROO_RT_BUILD_CUDA="0", KANGAROO_RT_BUILD_CPU="0"))
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("kangaroo_rt-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    expected = {f"kangaroo_rt/kernels/{f}" for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py")}
    assert expected and expected <= names
    assert not any(n.startswith("kernels/") for n in names)
    code = ROOT_IMPORT.replace("import kangaroo_rt.kernels.rms_norm as k",
                               "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
                               "getattr(f, '__module__', '')]\nimport kangaroo_rt.kernels.rms_norm as k")
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = _python(code, cwd=work, PYTHONPATH=str(tmp_path / "site"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[1] == os.path.realpath(tmp_path / "site" / "kangaroo_rt" / "kernels" / "rms_norm.py")


def _module_imports():
    """kangaroo_rt module -> the kangaroo_rt modules it imports, anywhere in its body (functions included)."""
    modules = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    graph = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def test_no_import_cycles_among_the_package_modules():
    """Lower layers never import upward, not even inside a function. The package's __init__ (which imports
    the public API) is left out: every module imports it as its parent."""
    graph = {m: {d for d in deps if d != "kangaroo_rt"} for m, deps in _module_imports().items() if m != "kangaroo_rt"}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
