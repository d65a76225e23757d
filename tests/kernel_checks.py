"""Shared setup and tolerance rule of the Triton kernel tests (tests/test_kernels_*.py).

Import this module before anything imports triton: without a GPU it turns on the Triton interpreter,
so the kernels run on CPU tensors (fp32, tiny shapes), as CI does with ``TRITON_INTERPRET=1``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kangaroo_rt import ops  # noqa: E402

CPU_DEVICE = "cpu"
HALF_DTYPES = [torch.float16, torch.bfloat16]


def kernel_module(name):
    """kangaroo_rt.kernels.<name>, skipping the calling test when triton is not installed."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1")
        ok, why = ops.triton_interpreter_supported()
        if not ok:
            pytest.skip(why)
    return ops.load_kernel_module(name)


def assert_tolerance_rule(kernel_out, torch_out, exact, slack=None):
    """docs/design.md, "Backends and the tolerance rule": the kernel's max error vs an fp64 result is at most 2x the torch
    implementation's error in the same dtype (plus a few ulps of the output, for exactly-rounded cases)."""
    exact = exact.double()
    err_kernel = (kernel_out.double() - exact).abs().max().item()
    err_torch = (torch_out.double() - exact).abs().max().item()
    if slack is None:
        slack = torch.finfo(kernel_out.dtype).eps * max(exact.abs().max().item(), 1.0)
    assert err_kernel <= 2 * err_torch + slack, f"kernel error {err_kernel:.3g} vs torch error {err_torch:.3g}"
