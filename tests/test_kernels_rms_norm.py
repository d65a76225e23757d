"""kernels/rms_norm.py against reference.rms_norm / reference.add_rms_norm."""
import pytest
import torch

from kernel_checks import HALF_DTYPES, assert_tolerance_rule, kernel_module
from kangaroo_rt import reference

SHAPES = [(1, 64), (3, 5, 128), (2, 7, 96), (4, 4096), (1, 1, 3000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape):
    mod = kernel_module("rms_norm")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    torch.testing.assert_close(mod.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_reference(shape):
    mod = kernel_module("rms_norm")
    gen = torch.Generator().manual_seed(1)
    x, r = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    w = torch.randn(shape[-1], generator=gen)
    new_r, normed = mod.add_rms_norm(x, r, w, 1e-5)
    ref_r, ref_normed = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(new_r, ref_r)
    torch.testing.assert_close(normed, ref_normed, atol=1e-5, rtol=1e-5)


def test_rms_norm_strided_rows():
    """A non-contiguous input (a slice of a wider hidden state) is read through its row stride."""
    mod = kernel_module("rms_norm")
    x = torch.randn(6, 80)[:, :64]
    w = torch.randn(64)
    torch.testing.assert_close(mod.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (8, 7, 4096), (300, 5120), (2, 3000)])
def test_rms_norm_half_precision_tolerance_rule(dtype, shape):
    mod = kernel_module("rms_norm")
    x = torch.randn(shape, device="cuda").to(dtype)
    r = torch.randn(shape, device="cuda").to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    assert_tolerance_rule(mod.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6),
                          reference.rms_norm(x.double(), w.double(), 1e-6))
    new_r, normed = mod.add_rms_norm(x, r, w, 1e-6)
    ref_r, ref_normed = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(new_r, ref_r)
    assert_tolerance_rule(normed, ref_normed, reference.rms_norm(ref_r.double(), w.double(), 1e-6))
