"""kernels/attention.py against reference.attention: decode, verify, prefill, GQA, split-K."""
import pytest
import torch

from kernel_checks import HALF_DTYPES, assert_tolerance_rule, kernel_module
from kangaroo_rt import reference


def _case(b, hq, hkv, q_len, d, t_max, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(b + 1, hkv, t_max, d, generator=gen)
    vc = torch.randn(b + 1, hkv, t_max, d, generator=gen)
    q = torch.randn(b, q_len, hq, d, generator=gen).transpose(1, 2)  # strided, as the model passes it
    start = torch.randint(0, t_max - q_len + 1, (b,), generator=gen)
    start[0] = t_max - q_len  # a row whose chunk ends at max_len - 1 (fills the cache)
    if b > 1:
        start[1] = 0  # a row starting at position 0
    positions = start[:, None] + torch.arange(q_len)[None]
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(kc), cast(vc), positions.to(device)


# (batch, q heads, kv heads, q_len, head_dim, max_len, num_splits): GQA ratios 1/4/8, q_len 1..7,
# head dims 16/64/128, a split-K merge with empty and partial splits, and a prefill-sized chunk.
SHAPES = [
    (1, 4, 4, 1, 64, 40, 1),
    (3, 8, 2, 7, 64, 40, 1),
    (2, 8, 1, 3, 128, 40, 1),
    (8, 2, 2, 1, 64, 24, 1),
    (4, 8, 1, 5, 128, 130, 3),
    (2, 4, 1, 2, 16, 130, 2),
    (5, 4, 4, 6, 32, 70, None),
    (2, 4, 1, 40, 32, 48, None),
]


@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max,splits", SHAPES)
def test_attention_matches_reference(b, hq, hkv, q_len, d, t_max, splits):
    attn = kernel_module("attention")
    q, kc, vc, positions = _case(b, hq, hkv, q_len, d, t_max)
    out = attn.attention(q, kc, vc, positions, None, splits)
    torch.testing.assert_close(out, reference.attention(q, kc, vc, positions), atol=2e-5, rtol=1e-5)


def test_attention_kv_len_and_stale_slots_are_never_read():
    """Slots past each row's last position (stale data of rolled-back drafts) and past kv_len are
    never read: filling them with NaN changes nothing."""
    attn = kernel_module("attention")
    q, kc, vc, positions = _case(3, 8, 2, 4, 64, 100, seed=1)
    kv_len = int(positions.max()) + 1
    ref = reference.attention(q, kc, vc, positions, kv_len)
    for row in range(3):
        stale = slice(int(positions[row, -1]) + 1, None)
        kc[row, :, stale] = float("nan")
        vc[row, :, stale] = float("nan")
    for splits in (1, 2):
        out = attn.attention(q, kc, vc, positions, kv_len, splits)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_attention_split_choice_fills_the_gpu_only_on_cuda(monkeypatch):
    attn = kernel_module("attention")
    assert attn.choose_num_splits(2, 4096, torch.device("cpu")) == 1
    monkeypatch.setattr(attn, "_sm_count", lambda index: 132)  # an H100 SXM, without asking a GPU
    gpu = torch.device("cuda", 0)
    assert attn.choose_num_splits(32, 256, gpu) == 1  # short contexts: one pass
    assert attn.choose_num_splits(200, 4096, gpu) == 1  # rows x heads already fill the SMs
    assert attn.choose_num_splits(32, 512, gpu) == 2  # at most one split per 256 keys
    assert attn.choose_num_splits(32, 8192, gpu) == 9  # about two programs per SM
    assert attn.choose_num_splits(1, 1 << 20, gpu) == 64  # capped


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max", [(1, 32, 8, 1, 128, 2048), (4, 32, 8, 7, 128, 1024),
                                                    (8, 32, 32, 1, 128, 512), (2, 32, 4, 300, 128, 512),
                                                    (3, 16, 2, 5, 64, 4096)])
def test_attention_half_precision_tolerance_rule(dtype, b, hq, hkv, q_len, d, t_max):
    attn = kernel_module("attention")
    q, kc, vc, positions = _case(b, hq, hkv, q_len, d, t_max, dtype=dtype, device="cuda")
    exact = reference.attention(q.double(), kc.double(), vc.double(), positions)
    assert_tolerance_rule(attn.attention(q, kc, vc, positions), reference.attention(q, kc, vc, positions), exact)


def test_unsupported_head_dim_uses_the_reference():
    attn = kernel_module("attention")
    q, kc, vc, positions = _case(2, 4, 2, 3, 24, 16)
    assert not attn.supports(24) and attn.supports(16) and attn.supports(128)
    torch.testing.assert_close(attn.attention(q, kc, vc, positions), reference.attention(q, kc, vc, positions))
