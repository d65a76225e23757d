"""kernels/rope_cache_append.py against reference.rope_cache_append (RoPE + KV-cache append)."""
import pytest
import torch

from kernel_checks import HALF_DTYPES, assert_tolerance_rule, kernel_module
from kangaroo_rt import reference


def _case(b, hq, hkv, q_len, d, t_max, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    # q/k/v as the model makes them: views of (B, q, H, D) projections transposed to (B, H, q, D).
    q = torch.randn(b, q_len, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(b, q_len, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(b, q_len, hkv, d, generator=gen).transpose(1, 2)
    start = torch.randint(0, t_max - q_len + 1, (b,), generator=gen)
    start[0] = t_max - q_len  # writes the last slot
    if b > 1:
        start[1] = 0
    positions = start[:, None] + torch.arange(q_len)[None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = reference.rope_cos_sin(positions, inv_freq, dtype)
    kc = torch.randn(b + 1, hkv, t_max, d, generator=gen)
    vc = torch.randn(b + 1, hkv, t_max, d, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cos.to(device), sin.to(device), cast(kc), cast(vc), positions.to(device)


SHAPES = [(1, 4, 4, 1, 64, 16), (3, 8, 2, 7, 64, 20), (2, 8, 1, 3, 128, 12), (8, 4, 1, 1, 128, 9),
          (2, 4, 2, 5, 16, 11)]


@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max", SHAPES)
def test_rope_cache_append_matches_reference(b, hq, hkv, q_len, d, t_max):
    mod = kernel_module("rope_cache_append")
    q, k, v, cos, sin, kc, vc, positions = _case(b, hq, hkv, q_len, d, t_max)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = reference.rope_cache_append(q, k, v, cos, sin, kc_ref, vc_ref, positions)
    q_out = mod.rope_cache_append(q, k, v, cos, sin, kc, vc, positions)
    torch.testing.assert_close(q_out, q_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kc, kc_ref, atol=1e-6, rtol=1e-5)  # every other slot untouched
    assert torch.equal(vc, vc_ref)


def test_rope_cache_append_broadcast_positions():
    """Prefill passes arange positions expanded over the batch (stride 0)."""
    mod = kernel_module("rope_cache_append")
    q, k, v, _, _, kc, vc, _ = _case(2, 4, 2, 6, 32, 8)
    positions = torch.arange(6).expand(2, 6)
    cos, sin = reference.rope_cos_sin(positions, 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)), torch.float32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = reference.rope_cache_append(q, k, v, cos, sin, kc_ref, vc_ref, positions)
    torch.testing.assert_close(mod.rope_cache_append(q, k, v, cos, sin, kc, vc, positions), q_ref)
    torch.testing.assert_close(kc, kc_ref)
    assert torch.equal(vc, vc_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max", [(1, 32, 8, 1, 128, 64), (8, 32, 8, 7, 128, 256),
                                                    (2, 32, 32, 300, 128, 512), (4, 16, 2, 3, 64, 32)])
def test_rope_cache_append_half_precision_tolerance_rule(dtype, b, hq, hkv, q_len, d, t_max):
    mod = kernel_module("rope_cache_append")
    q, k, v, cos, sin, kc, vc, positions = _case(b, hq, hkv, q_len, d, t_max, dtype=dtype, device="cuda")
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc64, vc64 = kc.double(), vc.double()
    q_out = mod.rope_cache_append(q, k, v, cos, sin, kc, vc, positions)
    q_ref = reference.rope_cache_append(q, k, v, cos, sin, kc_ref, vc_ref, positions)
    q_exact = reference.rope_cache_append(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                                          kc64, vc64, positions)
    assert_tolerance_rule(q_out, q_ref, q_exact)
    assert_tolerance_rule(kc, kc_ref, kc64)
    assert torch.equal(vc, vc_ref)


def test_non_power_of_two_head_dim_uses_the_reference():
    mod = kernel_module("rope_cache_append")
    q, k, v, cos, sin, kc, vc, positions = _case(2, 4, 2, 3, 24, 8)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = reference.rope_cache_append(q, k, v, cos, sin, kc_ref, vc_ref, positions)
    torch.testing.assert_close(mod.rope_cache_append(q, k, v, cos, sin, kc, vc, positions), q_ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def _rope_backends(device):
    """(name, rope_cache_append) of every backend that runs on ``device``: the reference, Triton (the
    interpreter on CPU), the CUDA extension on a GPU when it is built."""
    from kangaroo_rt import _ext

    yield "torch", reference.rope_cache_append
    yield "triton", kernel_module("rope_cache_append").rope_cache_append
    if device == "cuda" and _ext.is_built():
        yield "cuda", _ext.load().rope_cache_append


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_positions_outside_the_cache_write_nothing_on_every_backend(device):
    """One semantics on the three backends: a position < 0 or >= T_max writes no key or value (a kernel
    cannot raise without a host sync), every in-range one is written, q is rotated regardless."""
    q, k, v, cos, sin, kc, vc, _ = _case(3, 4, 2, 4, 32, 8, device=device)
    positions = torch.tensor([[5, 6, 7, 8], [-1, 0, 1, 2], [8, 9, -3, 100]], device=device)  # row 2: none in range
    rotated_k = reference.apply_rope(k, cos, sin)
    want_k, want_v = kc.clone(), vc.clone()
    for b in range(3):
        for t in range(4):
            p = int(positions[b, t])
            if 0 <= p < 8:
                want_k[b, :, p], want_v[b, :, p] = rotated_k[b, :, t], v[b, :, t]
    for name, fn in _rope_backends(device):
        k_cache, v_cache = kc.clone(), vc.clone()
        q_out = fn(q, k, v, cos, sin, k_cache, v_cache, positions)
        torch.testing.assert_close(q_out, reference.apply_rope(q, cos, sin), msg=name)
        torch.testing.assert_close(k_cache, want_k, msg=name)
        assert torch.equal(v_cache, want_v), name
