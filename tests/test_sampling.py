"""Sampling on the CPU (csrc/cpu/sampling.cpp): process_logits keeps the reference's tokens (temperature, top-k,
top-p; ties at the top-p cut by index) with probabilities within the project's tolerance of an fp64 reference, leaves
non-finite rows to torch, gives the same bits on every variant; sample draws from the row's distribution, never a
token of zero mass, and reports rows that are not distributions as torch does; the CPU accept_sampling stays lossless.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from kangaroo_rt import _cpu_ext, ops, reference
from test_cpu_ext import DTYPES, cpu  # noqa: F401 (cpu: the extension module, a fixture)


def _logits(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _fp64(logits, temperature, top_k, top_p):
    """The kernel's contract in fp64 -> (probs fp64, kept bool, uncertain bool: tokens whose mass above lies within
    rounding of the top-p cut, where fp32 sums may fall either side)."""
    s32 = logits.float() / max(float(temperature), 1e-6)
    s = s32.double().reshape(-1, s32.shape[-1])
    # exp(s - max) below exp(-87) is 0 (the kernel's floor; torch gives denormals or 0 there)
    keep = (s32 - s32.amax(dim=-1, keepdim=True)).reshape(s.shape) >= -87
    uncertain = torch.zeros_like(keep)
    if top_k is not None and top_k < s.shape[-1]:
        kth = torch.topk(s, top_k, dim=-1).values[:, -1:]
        keep &= s >= kth
    e = torch.exp(s - s.max(dim=-1, keepdim=True).values) * keep
    if top_p is not None and top_p < 1.0:
        order = torch.sort(s.masked_fill(~keep, -math.inf), dim=-1, descending=True, stable=True).indices
        e_sorted = e.gather(1, order)
        above = e_sorted.cumsum(-1) - e_sorted
        total = e_sorted.sum(-1, keepdim=True)
        limit = top_p * total
        keep_sorted = above < limit
        keep_sorted[:, 0] = True
        unsure_sorted = (above - limit).abs() <= 2e-6 * total
        keep &= torch.zeros_like(keep).scatter(1, order, keep_sorted)
        uncertain = torch.zeros_like(keep).scatter(1, order, unsure_sorted)
    e = e * keep
    probs = e / e.sum(-1, keepdim=True)
    return probs.reshape(logits.shape), keep.reshape(logits.shape), uncertain.reshape(logits.shape)


CASES = [(1.0, None, None), (0.7, None, 0.9), (1.0, 50, None), (0.7, 50, 0.9), (0.3, None, 0.95), (1.5, None, 0.5),
         (1.0, 1000, 0.99), (0.8, 1, None), (1.0, None, 0.01), (2.0, 7, 1.0), (1.0, None, 0.999999)]


def test_process_logits_widens_its_candidates(cpu):
    """Flat rows, where the top_p mass lies far below the largest score (beyond the first candidates, within 8 of
    it, and the second, within 64), and a top_p whose float rounding would move the tail."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.stack([torch.linspace(0, -100, 2000)[torch.randperm(2000, generator=gen)],
                        torch.linspace(0, -30, 2000)[torch.randperm(2000, generator=gen)]])
    for top_p in (0.9999, 0.999999, 0.5):
        got = _cpu_ext.process_logits(rows, 1.0, None, top_p)
        want, keep, uncertain = _fp64(rows, 1.0, None, top_p)
        assert torch.equal((got > 0)[~uncertain], keep[~uncertain])
        assert (got - want).abs().max().item() < 1e-6
    assert int((_cpu_ext.process_logits(rows, 1.0, None, 0.9999)[0] > 0).sum()) > 160  # (160 lie within 8 of the max)
    for top_k in (1500, 30):  # the 1500th score lies 75 below the largest: past the second candidates too
        got = _cpu_ext.process_logits(rows, 1.0, top_k, 0.99)
        want, keep, uncertain = _fp64(rows, 1.0, top_k, 0.99)
        assert torch.equal((got > 0)[~uncertain], keep[~uncertain])
        assert (got - want).abs().max().item() < 1e-6
        assert torch.equal(_cpu_ext.process_logits(rows, 1.0, top_k, None) > 0, _fp64(rows, 1.0, top_k, None)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 49152), (3, 1003), (2, 3, 97), (4, 17), (1, 1)], ids=str)
@pytest.mark.parametrize("temperature,top_k,top_p", CASES, ids=str)
def test_process_logits_against_fp64(cpu, dtype, shape, temperature, top_k, top_p):
    logits = _logits(shape, dtype, seed=shape[-1])
    got = _cpu_ext.process_logits(logits, temperature, top_k, top_p)
    want, keep, uncertain = _fp64(logits, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    sure = ~uncertain
    assert torch.equal((got > 0)[sure], keep[sure])
    # the project's tolerance: at most twice the error of torch's fp32 softmax over the same tokens
    s = (logits.float() / max(temperature, 1e-6)).masked_fill(~keep, -math.inf)
    torch_err = (torch.softmax(s, dim=-1).double() - want).abs().max().item()
    err = (got.double() - want).abs()[sure].max().item()
    assert err <= 2 * torch_err + 1e-9, (err, torch_err)
    if dtype == torch.float32 and not bool(uncertain.any()):  # distinct scores: the reference's very tokens
        assert torch.equal(got > 0, reference.process_logits(logits, temperature, top_k, top_p) > 0)


def test_process_logits_ties_at_the_cut_go_by_index(cpu):
    """Five tied scores straddle the top-p cut: the lower indices stay (torch's unstable sort keeps any of them)."""
    logits = torch.full((1, 40), -20.0)
    tied = [3, 9, 17, 25, 31]
    logits[0, tied] = 1.0
    logits[0, 0] = 1.5
    probs = _cpu_ext.process_logits(logits, 1.0, None, 0.55)
    mass_top = math.exp(1.5) / (math.exp(1.5) + 5 * math.exp(1.0))
    per_tied = (1 - mass_top) / 5
    n_tied = next(j for j in range(6) if mass_top + j * per_tied >= 0.55)  # tied tokens until the mass reaches 0.55
    assert (probs[0] > 0).nonzero().flatten().tolist() == [0] + tied[:n_tied]
    assert reference.process_logits(logits, 1.0, None, 0.55).gt(0).sum() == 1 + n_tied  # (as many as torch's)
    # top-k keeps every score tied with the k-th
    assert (_cpu_ext.process_logits(logits, 1.0, 2, None)[0] > 0).nonzero().flatten().tolist() == [0] + tied


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_process_logits_masked_and_non_finite_rows(cpu, dtype):
    logits = _logits((6, 300), torch.float32, seed=3)
    logits[0, 5:] = -math.inf  # masked logits: 0 exactly
    logits[1, 7] = math.nan
    logits[2, 9] = math.inf
    logits[3] = -math.inf
    logits[4, :3] = 3e38  # finite, but +inf once divided by a temperature below 1
    logits = logits.to(dtype)
    for temperature, top_k, top_p in [(0.9, None, None), (0.7, 10, 0.9), (1e-9, None, 0.8)]:
        got = ops.process_logits(logits, temperature, top_k, top_p)
        want = reference.process_logits(logits, temperature, top_k, top_p)
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, equal_nan=True, atol=1e-6, rtol=1e-5)
        assert torch.equal(got[0, 5:], torch.zeros(295))


def test_process_logits_falls_back_for_inputs_it_does_not_cover(cpu):
    logits = _logits((2, 50), torch.float16)
    torch.testing.assert_close(_cpu_ext.process_logits(logits, 0.7, 5, 0.9),
                               reference.process_logits(logits, 0.7, 5, 0.9))
    strided = _logits((50, 4), torch.float32).t()  # columns of stride 4: copied, same result
    torch.testing.assert_close(_cpu_ext.process_logits(strided, 1.0, None, 0.9),
                               _cpu_ext.process_logits(strided.contiguous(), 1.0, None, 0.9), atol=0, rtol=0)
    with pytest.raises(RuntimeError):
        _cpu_ext.process_logits(logits.float(), 1.0, 0, None)  # top_k = 0: torch's own error


_VARIANT_SCRIPT = """
import hashlib, math, torch
from kangaroo_rt import _cpu
torch.manual_seed(0)
for n in (1, 7, 17, 64, 4099):
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, n) * 3).round().to(dtype)  # ties
        x[1, 1::5] = -math.inf
        for args in ((1.0, 0, 1.0), (0.7, 0, 0.9), (0.7, 3, 0.95), (1.3, 100, 1.0), (0.5, 0, 0.0)):
            probs, left = _cpu.process_logits(x, *args)
            assert not left.any()
            u = torch.tensor([0.0, 0.37, 1 - 2 ** -53], dtype=torch.float64)
            print(n, hashlib.sha256(probs.numpy().tobytes()).hexdigest()[:16], _cpu.sample(probs, u).tolist())
print(_cpu.isa())
"""


def test_every_variant_gives_the_same_bits(cpu):
    from test_cpu_ext import ROOT

    outputs = {}
    for isa in cpu.supported_isas():
        env = dict(os.environ, KANGAROO_RT_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        assert lines[-1] == isa
        outputs[isa] = lines[:-1]
    assert len({tuple(v) for v in outputs.values()}) == 1


def test_sample_draws_from_the_distribution(cpu):
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.15, 0.0, 0.25, 0.0] + [0.0] * 200)
    p[150], p[207] = 0.15, 0.1  # mass in the third and fourth chunks of 64
    trials = 40000
    tokens = ops.sample(p.expand(trials, -1).contiguous(), gen)
    assert tokens.dtype == torch.long and tokens.shape == (trials,)
    freq = torch.bincount(tokens, minlength=p.numel()).double() / trials
    assert bool((freq[p == 0] == 0).all())
    sigma = (p.double() * (1 - p.double()) / trials).sqrt()
    assert bool(((freq - p.double()).abs() <= 5 * sigma + 1e-12).all()), freq[:8]
    # an unnormalized row: the draw is from p / sum(p)
    tokens = ops.sample((3 * p).expand(trials, -1).contiguous(), gen)
    freq = torch.bincount(tokens, minlength=p.numel()).double() / trials
    assert bool(((freq - p.double()).abs() <= 5 * sigma + 1e-12).all())
    # seeded: the same tokens again
    a = ops.sample(p.expand(64, -1).contiguous(), torch.Generator().manual_seed(7))
    b = ops.sample(p.expand(64, -1).contiguous(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sample_edges(cpu):
    p = torch.zeros(3, 300)
    p[:, 70] = 0.5
    p[:, 200] = 0.5
    p[2, 299] = 1e-10
    u = torch.tensor([0.0, 1 - 2 ** -53, 1 - 2 ** -53], dtype=torch.float64)
    assert cpu.sample(p, u).tolist() == [70, 200, 299]  # never a token of zero mass, at either end of [0, 1)
    assert cpu.sample(p[:1], torch.tensor([0.4999999], dtype=torch.float64)).tolist() == [70]
    assert cpu.sample(p[:1], torch.tensor([0.5], dtype=torch.float64)).tolist() == [200]
    for bad in (-0.1, math.nan, math.inf):
        q = p[:1].clone()
        q[0, 5] = bad
        assert cpu.sample(q, torch.tensor([0.3], dtype=torch.float64)).tolist() == [-1]
        with pytest.raises(RuntimeError):
            ops.sample(q)  # torch.multinomial's error
    with pytest.raises(RuntimeError):
        ops.sample(torch.zeros(1, 10))
    assert ops.backend_table("cpu")["sample"] == "cpu"  # a caller's bad input: the kernel still serves
    with pytest.raises(ValueError):
        cpu.sample(p, torch.zeros(2, dtype=torch.float64))
    # given uniforms: the kernel's choice, and the reference's (its cumulative sum in float64)
    q = torch.rand(5, 300, generator=torch.Generator().manual_seed(3)) * (torch.rand(5, 300) < 0.2)
    u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ops.sample(q, u=u), reference.sample(q, u=u))


def test_accept_sampling_on_the_cpu_is_lossless(cpu):
    """The CPU op (the reference's acceptance, then the kernel's draw): P(first token) = p after one draft."""
    gen = torch.Generator().manual_seed(1)
    v, trials = 4, 40000
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    drafts = torch.multinomial(q.expand(trials, v), 1, replacement=True, generator=gen)
    tp = torch.stack([p, torch.tensor([1.0, 0, 0, 0])]).expand(trials, 2, v).contiguous()
    acc, nxt = _cpu_ext.accept_sampling(drafts, torch.ones(trials, dtype=torch.long), tp,
                                        q.expand(trials, 1, v).contiguous(), torch.rand(trials, 1, generator=gen), gen)
    first = torch.where(acc == 1, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=v).float() / trials
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert ops.backend_table("cpu")["accept_sampling"] == "cpu"
    assert ops.backend_table("cpu")["sample"] == "cpu" and ops.backend_table("cpu")["process_logits"] == "cpu"


def test_accept_sampling_kernel_against_the_reference(cpu):
    """The fused kernel: the reference's acceptance counts (the same float test) and, with the same uniforms, the
    next token the reference's distribution gives (rejections, full acceptances, rows without drafts, K = 0)."""
    gen = torch.Generator().manual_seed(7)
    B, K, V = 64, 4, 50

    def dist(*shape):
        x = torch.rand(*shape, generator=gen) ** 3 * (torch.rand(*shape, generator=gen) < 0.6)
        return x / x.sum(-1, keepdim=True)

    p, q = dist(B, K + 1, V), dist(B, K, V)
    n = torch.randint(0, K + 1, (B,), generator=gen)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    drafts[:8] = p[:8, :K].argmax(-1)  # likely accepted: some rows accept every draft
    drafts = torch.where(torch.arange(K)[None] < n[:, None], drafts, torch.full_like(drafts, -1))
    u = torch.rand(B, K, generator=gen)
    u[:8] = 0.0
    u_next = torch.rand(B, dtype=torch.float64, generator=gen)
    accepted, nxt = cpu.accept_sampling(drafts, n, p, q, u, u_next)
    want = reference.accept_sampling_counts(drafts, n, p, q, u)
    assert torch.equal(accepted, want)
    assert bool((accepted == n).any()) and bool((accepted < n).any()) and bool((n == 0).any())
    d = reference.after_acceptance_distribution(want, n, p, q)
    assert torch.equal(nxt, reference.sample(d, u=u_next))
    assert bool((d.gather(1, nxt[:, None]) > 0).all())
    a0, n0 = cpu.accept_sampling(drafts[:, :0], torch.zeros(B, dtype=torch.long), p[:, :1].contiguous(),
                                 q[:, :0].contiguous(), u[:, :0].contiguous(), u_next)
    assert bool((a0 == 0).all()) and torch.equal(n0, reference.sample(p[:, 0], u=u_next))
    with pytest.raises(ValueError):
        cpu.accept_sampling(drafts, n, p, q[:, :2].contiguous(), u, u_next)


def test_accept_sampling_kernel_edges(cpu):
    """A NaN at a rejection is torch's error, not a draw from the rest; drafts of odd strides are read as torch reads
    them; a draft of -1 within n_drafts is rejected."""
    p = torch.full((1, 2, 4), 0.25)
    q = torch.tensor([[[0.7, 0.1, 0.1, 0.1]]])
    drafts, n, u = torch.tensor([[0]]), torch.tensor([1]), torch.ones(1, 1)
    assert _cpu_ext.accept_sampling(drafts, n, p, q, u)[0].tolist() == [0]  # rejected: 0.7 > 0.25
    bad = p.clone()
    bad[0, 0, 2] = math.nan
    with pytest.raises(RuntimeError):
        _cpu_ext.accept_sampling(drafts, n, bad, q, u)
    wide = torch.zeros(3, 3, dtype=torch.long)[:, :1]  # (3, 1) of row stride 3
    odd = torch.zeros(1, 3, dtype=torch.long).t()  # (3, 1) of row stride 1
    for d in (wide, odd, torch.zeros(1, dtype=torch.long).expand(3, 1)):
        args = (d, torch.ones(3, dtype=torch.long), p.expand(3, -1, -1).contiguous(), q.expand(3, -1, -1).contiguous(),
                torch.zeros(3, 1))
        assert _cpu_ext.accept_sampling(*args)[0].tolist() == reference.accept_sampling_counts(*args).tolist() == [1] * 3
    u_next = torch.zeros(1, dtype=torch.float64)
    assert cpu.accept_sampling(torch.tensor([[-1]]), n, p, q, torch.zeros(1, 1), u_next)[0].tolist() == [0]
