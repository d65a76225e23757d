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


# (batch, q heads, kv heads, q_len, head_dim, max_len, keys per split or 0): GQA ratios 1/4/8, q_len 1..7,
# head dims 16/64/128, a split-K merge with empty and partial splits, and a prefill-sized chunk.
SHAPES = [
    (1, 4, 4, 1, 64, 40, 0),
    (3, 8, 2, 7, 64, 40, 0),
    (2, 8, 1, 3, 128, 40, 0),
    (8, 2, 2, 1, 64, 24, 0),
    (4, 8, 1, 5, 128, 130, 48),
    (2, 4, 1, 2, 16, 130, 64),
    (5, 4, 4, 6, 32, 70, None),
    (2, 4, 1, 40, 32, 48, None),
]


@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max,split", SHAPES)
def test_attention_matches_reference(b, hq, hkv, q_len, d, t_max, split):
    attn = kernel_module("attention")
    q, kc, vc, positions = _case(b, hq, hkv, q_len, d, t_max)
    out = attn.attention(q, kc, vc, positions, None, split)
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
    for split in (0, 32):
        out = attn.attention(q, kc, vc, positions, kv_len, split)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_attention_splits_decode_and_verify_on_cuda_only():
    """Split-K is chosen from the query rows of a kv head alone: never from kv_len or the batch, which differ
    between a graph's call (capacity, bucket) and an eager one (live length, batch)."""
    attn = kernel_module("attention")
    gpu = torch.device("cuda", 0)
    assert attn.choose_split_size(4, torch.device("cpu")) == 0
    assert attn.choose_split_size(4, gpu) == attn.choose_split_size(8 * 8, gpu) == attn.SPLIT_KEYS  # decode, verify
    assert attn.choose_split_size(4 * 300, gpu) == 0  # prefill: one pass


@pytest.mark.parametrize("split", [0, 64])
def test_graph_and_eager_calls_give_the_same_bits(split):
    """A CUDA graph's call reads the whole cache (kv_len = capacity), an eager one the live length: split
    boundaries at fixed positions, empty splits skipped, the merge in split order, so the bits agree (and,
    with the split count a runtime argument, no recompile as the context grows)."""
    attn = kernel_module("attention")
    q, kc, vc, positions = _case(3, 8, 2, 3, 32, 512, seed=2)
    positions = torch.tensor([[130, 131, 132], [5, 6, 7], [297, 298, 299]])
    live = int(positions.max()) + 1
    graph = attn.attention(q, kc, vc, positions, None, split)  # capacity 512: 8 splits of 64, 3 of them empty
    for kv_len in (live, live + 13, 384):
        assert torch.equal(attn.attention(q, kc, vc, positions, kv_len, split), graph), kv_len
    torch.testing.assert_close(graph, reference.attention(q, kc, vc, positions), atol=2e-5, rtol=1e-5)


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
