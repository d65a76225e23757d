"""ops dispatch at run time: autograd goes to the torch reference, a backend that cannot run falls back once."""
import warnings

import pytest
import torch

from kangaroo_rt import ops, reference


def _nograd_rms_norm(x, weight, eps):
    """A kernel as autograd sees one: right values, no graph."""
    with torch.no_grad():
        return reference.rms_norm(x, weight, eps)


@pytest.fixture
def dispatch_state(monkeypatch):
    """Fresh dispatch caches, restored afterwards."""
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_BROKEN", set())
    ops._RESOLVED.clear()
    yield monkeypatch
    ops._RESOLVED.clear()


def _force_on_cpu(monkeypatch, op, fn):
    """Register ``fn`` as the triton backend of ``op`` on CPU tensors and force that backend."""
    monkeypatch.setitem(ops._REGISTRY, op, dict(ops._REGISTRY[op], triton=(fn, ("cpu",))))
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "triton")
    ops._RESOLVED.clear()


def test_calls_autograd_records_go_to_the_reference(dispatch_state):
    _force_on_cpu(dispatch_state, "rms_norm", _nograd_rms_norm)
    x, w = torch.randn(3, 16), torch.randn(16, requires_grad=True)
    out = ops.rms_norm(x, w, 1e-6)
    assert out.requires_grad
    out.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert not ops.rms_norm(x, w, 1e-6).requires_grad  # no autograd: the kernel serves
    assert ops.resolve("rms_norm", x.device)[0] == "triton"


def test_a_backend_that_fails_at_run_time_falls_back_once(dispatch_state):
    calls = []

    def broken(x, weight, eps):
        calls.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore detail")

    _force_on_cpu(dispatch_state, "rms_norm", broken)
    x, w = torch.randn(2, 8), torch.randn(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.rms_norm(x, w, 1e-6)
        second = ops.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(first, reference.rms_norm(x, w, 1e-6))
    torch.testing.assert_close(second, first)
    assert len(calls) == 1  # tried once, then skipped
    messages = [str(c.message) for c in caught if "rms_norm" in str(c.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "no kernel image" in messages[0], messages
    assert ops.resolve("rms_norm", x.device)[0] == "torch"


def test_bad_inputs_are_not_a_broken_backend(dispatch_state):
    def strict(x, weight, eps):
        raise ValueError("weight must be (D,)")

    _force_on_cpu(dispatch_state, "rms_norm", strict)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    assert ops.resolve("rms_norm", torch.device("cpu"))[0] == "triton"


def test_a_backend_that_ran_once_is_called_directly(dispatch_state):
    _force_on_cpu(dispatch_state, "rms_norm", _nograd_rms_norm)
    x, w = torch.randn(2, 8), torch.randn(8)
    assert isinstance(ops.resolve("rms_norm", x.device)[1], ops._FirstRun)
    ops.rms_norm(x, w, 1e-6)
    assert ops.resolve("rms_norm", x.device)[1] is _nograd_rms_norm
