"""kangaroo_rt.ops dispatch of the Triton kernels, their loading, and the whole model on the triton backend."""
import os
import subprocess
import sys

import pytest
import torch

from kernel_checks import kernel_module
import kangaroo_rt as K
from kangaroo_rt import _cpu_ext, graphs, ops, reference
from kangaroo_rt.testing import agreeing_pair, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_OPS = set(ops.TRITON_KERNELS)


def _run_python(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


def _without_cpu_extension_ops(table):
    """The table less the ops the CPU extension serves on CPU when it is built (tests/test_linear.py)."""
    assert all(backend == ("cpu" if op in _cpu_ext.OPS and _cpu_ext.is_available() else "torch")
               for op, backend in table.items() if backend in ("cpu", "torch")), table
    return {op: backend for op, backend in table.items() if op not in _cpu_ext.OPS}


def test_cpu_dispatch_is_torch_unless_triton_is_forced(monkeypatch):
    kernel_module("rms_norm")
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    assert set(_without_cpu_extension_ops(ops.backend_table("cpu")).values()) == {"torch"}  # TRITON_INTERPRET=1 too
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "triton")
    table = ops.backend_table("cpu")
    assert {op for op, backend in table.items() if backend == "triton"} == KERNEL_OPS
    assert table["process_logits"] == table["linear"] == "torch"  # no kernel: forced backend -> the reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert set(ops.backend_table("cpu").values()) == {"torch"}  # no interpreter: CPU tensors stay on torch
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    assert set(ops.backend_table("cuda").values()) == {"torch"}


def test_an_interpreter_too_old_for_the_kernels_leaves_cpu_tensors_on_torch(monkeypatch):
    """Triton < 3.7's interpreter cannot run the kernels: forced triton on CPU falls back, warned once."""
    import importlib.metadata
    import warnings

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.6.0" if name == "triton" else
                        real_version(name))
    monkeypatch.setattr(ops, "_interpreter_checked", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "triton")
    ok, why = ops.triton_interpreter_supported()
    assert not ok and "3.6.0" in why and ">= 3.7" in why
    ops._RESOLVED.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = ops.backend_table("cpu"), ops.backend_table("cpu")
        assert set(first.values()) == set(second.values()) == {"torch"}
        assert len([w for w in caught if "interpreter" in str(w.message)]) == 1
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.7.1")
        assert ops.triton_interpreter_supported() == (True, "")
    finally:
        ops._RESOLVED.clear()


def test_cuda_prefers_triton_and_falls_back_without_it(monkeypatch):
    kernel_module("rms_norm")
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    # Without the CUDA extension (a built one outranks Triton for its own ops).
    monkeypatch.setattr(ops._ext, "is_available", lambda: False)
    ops._RESOLVED.clear()
    table = ops.backend_table("cuda")
    assert {op for op, backend in table.items() if backend == "triton"} == KERNEL_OPS
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    ops._RESOLVED.clear()
    try:
        assert set(ops.backend_table("cuda").values()) == {"torch"}
    finally:
        ops._RESOLVED.clear()


def test_set_backend_forces_and_restores(monkeypatch):
    kernel_module("rms_norm")
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    automatic = ops.resolve("rms_norm", torch.device("cpu"))[0]  # "cpu" where the CPU extension is built
    assert automatic in ("cpu", "torch")
    ops.set_backend("triton")
    try:
        assert ops.resolve("rms_norm", torch.device("cpu"))[0] == "triton"
        x, w = torch.randn(2, 3, 32), torch.randn(32)
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    finally:
        ops.set_backend(None)
    assert ops.resolve("rms_norm", torch.device("cpu"))[0] == automatic


def test_entry_points_make_the_model_device_current(monkeypatch):
    """Triton launches and graph capture go to the current CUDA device: generate and Engine.step make the
    model's device current (a model on cuda:1 would otherwise launch on cuda:0)."""
    import contextlib

    cuda1 = ops.device_context(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(cuda1, torch.cuda.device) and cuda1.idx == 1
    assert isinstance(ops.device_context(torch.device("cpu")), contextlib.nullcontext)
    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield

    monkeypatch.setattr(ops, "device_context", recording)
    target, adapter = agreeing_pair(tiny_config(num_layers=3), 1)
    model = K.KangarooModel(target, adapter, exit_layer=1)
    ids = torch.randint(0, 90, (1, 5))
    for kc, graphs_on in ((None, False), (K.KangarooConfig(gamma=2), False), (K.KangarooConfig(gamma=2), True)):
        model.generate(ids, max_new_tokens=3, kangaroo=kc, cuda_graphs=graphs_on)
    engine = K.Engine(model, max_batch=1, max_len=32)
    engine.add_request(ids[0].tolist())
    engine.step()
    assert entered == [torch.device("cpu")] * 4


def test_import_does_not_import_triton():
    res = _run_python("import sys, kangaroo_rt, kangaroo_rt.ops as o; o.backend_table('cpu'); "
                      "assert 'triton' not in sys.modules, 'triton imported'; print('ok')")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_kernels_load_from_a_source_checkout():
    """With PYTHONPATH=. and no install finder, kernels/ is registered as the package kangaroo_rt.kernels."""
    pytest.importorskip("triton")
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import kangaroo_rt.kernels.rms_norm as m\n"
        "print(*sys.modules['kangaroo_rt.kernels'].__path__)\n"
        "print(m.__name__, m.__file__)\n"
    )
    res = _run_python(code, TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stderr
    folder, name, path = res.stdout.split()
    assert os.path.samefile(folder, os.path.join(ROOT, "kernels"))
    assert name == "kangaroo_rt.kernels.rms_norm"
    assert os.path.samefile(path, os.path.join(ROOT, "kernels", "rms_norm.py"))


def test_full_model_on_triton_backend_gives_the_torch_tokens(monkeypatch):
    """Greedy generation (plain and Kangaroo, batch 2, ragged prompts) with every kernel under the
    interpreter equals the torch backend token for token."""
    kernel_module("attention")
    cfg = tiny_config(num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=64, eos_token_id=5)
    target, adapter = agreeing_pair(cfg, 1)
    model = K.KangarooModel(target, adapter, exit_layer=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, cfg.vocab_size, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a shorter, left-padded prompt
    kw = dict(attention_mask=mask, max_new_tokens=6)
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    plain = model.generate(ids, kangaroo=None, **kw)
    spec = model.generate(ids, kangaroo=K.KangarooConfig(gamma=3, eta=0.0), **kw)
    assert torch.equal(plain, spec)
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "triton")
    assert ops.backend_table("cpu")["attention"] == "triton"
    assert torch.equal(model.generate(ids, kangaroo=K.KangarooConfig(gamma=3, eta=0.0), **kw), plain)
    # The fixed-shape rounds CUDA graphs capture, on the kernels: attention over the whole cache (kv_len =
    # max_len), a bucket of 4 rows for 3 (one finished padding row), the fused accept + commit.
    ids3, mask3 = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[1:]])
    kw3 = dict(kw, attention_mask=mask3)
    want = model.generate(ids3, kangaroo=None, **kw3)
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    assert torch.equal(want, model.generate(ids3, kangaroo=None, **kw3))
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "triton")
    got = model.generate(ids3, kangaroo=K.KangarooConfig(gamma=3, eta=0.3), cuda_graphs=True, **kw3)
    assert model.graph_runner.last_mode == "sync"
    assert torch.equal(got, want)
