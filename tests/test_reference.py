"""The reference ops against plain-Python / independent formulations."""
import pytest
import torch

from kangaroo_rt import ops, reference


def _python_accept_greedy(drafts, n_drafts, target_tokens):
    acc, nxt = [], []
    for row, n, tgt in zip(drafts.tolist(), n_drafts.tolist(), target_tokens.tolist()):
        j = 0
        while j < n and row[j] == tgt[j]:
            j += 1
        acc.append(j)
        nxt.append(tgt[j])
    return acc, nxt


def test_accept_greedy_cases():
    # rows: no drafts; all accepted (bonus); first rejected; partial; placeholder after n_drafts.
    drafts = torch.tensor([[-1, -1, -1], [4, 5, 6], [9, 5, 6], [4, 5, 1], [4, -1, -1]])
    n_drafts = torch.tensor([0, 3, 3, 3, 1])
    target = torch.tensor([[7, 0, 0, 0], [4, 5, 6, 8], [4, 5, 6, 8], [4, 5, 6, 8], [4, 5, 6, 8]])
    acc, nxt = ops.accept_greedy(drafts, n_drafts, target)
    assert acc.tolist() == [0, 3, 0, 2, 1]
    assert nxt.tolist() == [7, 8, 4, 6, 5]


def test_accept_greedy_random_against_python():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        b, k, v = 6, 5, 4
        target = torch.randint(0, v, (b, k + 1), generator=gen)
        n = torch.randint(0, k + 1, (b,), generator=gen)
        drafts = torch.randint(0, v, (b, k), generator=gen)
        drafts = torch.where(torch.arange(k)[None] < n[:, None], drafts, -1)
        acc, nxt = ops.accept_greedy(drafts, n, target)
        ref_acc, ref_nxt = _python_accept_greedy(drafts, n, target)
        assert acc.tolist() == ref_acc and nxt.tolist() == ref_nxt


def test_accept_sampling_deterministic_edges():
    v = 5
    p = torch.full((2, 3, v), 0.0)
    q = torch.full((2, 2, v), 0.0)
    # Row 0: q == p (one-hot on the draft): always accepted, bonus from p at position 2.
    p[0, 0, 1] = p[0, 1, 2] = p[0, 2, 3] = 1.0
    q[0, 0, 1] = q[0, 1, 2] = 1.0
    # Row 1: the target gives the draft token zero mass: rejected at 0; residual = p[1, 0] (token 4).
    p[1, :, 4] = 1.0
    q[1, 0, 0] = q[1, 1, 0] = 1.0
    drafts = torch.tensor([[1, 2], [0, 0]])
    n = torch.tensor([2, 2])
    acc, nxt = ops.accept_sampling(drafts, n, p, q, torch.rand(2, 2))
    assert acc.tolist() == [2, 0] and nxt.tolist() == [3, 4]


def test_accept_sampling_is_lossless_for_one_position():
    """P(next token) after one draft equals p exactly in expectation: check empirically."""
    gen = torch.Generator().manual_seed(1)
    v, trials = 4, 40000
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    drafts = torch.multinomial(q.expand(trials, v), 1, replacement=True, generator=gen)
    tp = torch.stack([p, torch.tensor([1.0, 0, 0, 0])]).expand(trials, 2, v)  # bonus never matters here
    acc, nxt = ops.accept_sampling(drafts, torch.ones(trials, dtype=torch.long), tp,
                                   q.expand(trials, 1, v), torch.rand(trials, 1, generator=gen), gen)
    first = torch.where(acc == 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=v).float() / trials
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 3, None), (1.2, None, 0.8),
                                                     (0.9, 5, 0.5), (1.0, None, 0.999)])
def test_process_logits_matches_transformers(temperature, top_k, top_p):
    tr = pytest.importorskip("transformers")
    logits = torch.randn(4, 17)
    ref = logits.clone()
    ref = tr.TemperatureLogitsWarper(temperature)(None, ref)
    if top_k is not None:
        ref = tr.TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = tr.TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(ops.process_logits(logits, temperature, top_k, top_p), ref.softmax(-1))


@pytest.mark.parametrize("b,hq,hkv,q_len,d", [(1, 4, 4, 1, 64), (3, 8, 2, 7, 64), (2, 8, 1, 3, 128), (4, 4, 1, 1, 16)])
def test_attention_against_repeat_kv_sdpa(b, hq, hkv, q_len, d):
    t_max = 20
    gen = torch.Generator().manual_seed(0)
    kc = torch.randn(b + 1, hkv, t_max, d, generator=gen)
    vc = torch.randn(b + 1, hkv, t_max, d, generator=gen)
    q = torch.randn(b, hq, q_len, d, generator=gen)
    start = torch.randint(0, t_max - q_len + 1, (b,), generator=gen)  # ragged, including 0
    start[0] = t_max - q_len  # a row that fills the cache
    positions = start[:, None] + torch.arange(q_len)[None]
    out = ops.attention(q, kc, vc, positions)
    math = reference.attention_math(q, kc, vc, positions)  # the spelled-out path (torch < 2.5)
    torch.testing.assert_close(math, out, atol=1e-5, rtol=1e-5)
    kv_len = int(positions.max()) + 1
    torch.testing.assert_close(reference.attention(q, kc, vc, positions, kv_len), out, atol=1e-6, rtol=1e-6)
    for i in range(b):
        n_keys = int(positions[i, -1]) + 1
        k = kc[i, :, :n_keys].repeat_interleave(hq // hkv, dim=0)
        v = vc[i, :, :n_keys].repeat_interleave(hq // hkv, dim=0)
        mask = torch.arange(n_keys)[None] <= positions[i][:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(q[i], k, v, attn_mask=mask)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_cache_append_writes_only_given_positions():
    kc = torch.zeros(3, 2, 10, 4)
    vc = torch.zeros(3, 2, 10, 4)
    k = torch.randn(2, 2, 3, 4)
    v = torch.randn(2, 2, 3, 4)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    reference.cache_append(kc, vc, k, v, pos)
    torch.testing.assert_close(kc[0, :, :3], k[0])
    torch.testing.assert_close(vc[1, :, 5:8], v[1])
    assert kc[1, :, :5].abs().sum() == 0 and kc[2].abs().sum() == 0 and kc[0, :, 3:].abs().sum() == 0


@pytest.mark.parametrize("q_len", [1, 7])
def test_rope_cache_append_equals_rope_then_append(q_len):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, q_len, 64, generator=gen)
    k, v = torch.randn(2, 2, q_len, 64, generator=gen), torch.randn(2, 2, q_len, 64, generator=gen)
    positions = torch.tensor([[3], [11]]) + torch.arange(q_len)[None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    cos, sin = reference.rope_cos_sin(positions, inv_freq, torch.float32)
    kc, vc = torch.zeros(3, 2, 20, 64), torch.zeros(3, 2, 20, 64)
    q_rot = reference.rope_cache_append(q, k, v, cos, sin, kc, vc, positions)
    kc_ref, vc_ref = torch.zeros_like(kc), torch.zeros_like(vc)
    reference.cache_append(kc_ref, vc_ref, reference.apply_rope(k, cos, sin), v, positions)
    assert torch.equal(q_rot, reference.apply_rope(q, cos, sin))
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_rms_norm_fp32_fast_path_is_the_spelled_out_formula_bit_for_bit():
    x, w = torch.randn(4, 7, 256) * 3, torch.randn(256)
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(reference.rms_norm(x, w, 1e-5), w * xf)
    half = reference.rms_norm(x.half(), w.half(), 1e-5)  # the explicit path: fp32 statistics, cast, scale
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), w * xf, atol=2e-2, rtol=2e-2)


def test_rms_norm_and_fused_add():
    x, r, w = torch.randn(3, 5, 32), torch.randn(3, 5, 32), torch.randn(32)
    ref = w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref)
    new_r, normed = ops.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(new_r, x + r)
    torch.testing.assert_close(normed, ops.rms_norm(x + r, w, 1e-6))


def test_backend_table_and_override(monkeypatch):
    table = ops.backend_table("cpu")
    assert set(table) >= {"attention", "accept_greedy", "rms_norm", "rope_cache_append"}
    assert all(b in ops.BACKENDS for b in table.values())
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    assert set(ops.backend_table("cpu").values()) == {"torch"}
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="KANGAROO_RT_BACKEND"):
        ops.backend_table("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("fast")
