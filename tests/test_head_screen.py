"""The screened greedy head (csrc/cpu/head_screen.cpp): its bounds hold the logits the head computes, its choice is
the whole head's argmax (the first index of the largest logit in the dtype) for any rows, near ties and exact ties
included, a non-finite or all-zero input takes the whole head, and the one-call target pass chooses the same tokens
with it and without it."""
import os
import subprocess
import sys

import pytest
import torch

from kangaroo_rt import _cpu_ext, reference
from test_cpu_ext import DTYPES, cpu  # noqa: F401 (cpu: the extension module, a fixture)


def _head(V, K, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(V, K, generator=gen) * 0.05
    w[:, 3] *= 20  # a column of large weights, and one row far larger than the rest
    w[V // 2] *= 8
    return w.to(dtype)


def _rows(M, K, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 3
    x[:, K // 2] = 40.0  # an outlier dimension, as real hidden states have
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("V,K,M", [(1000, 576, 1), (1003, 576, 2), (517, 100, 3), (64, 64, 5), (9, 33, 8),
                                   (2050, 130, 1)])
def test_screened_argmax_is_the_heads_argmax(cpu, dtype, V, K, M):
    w, x = _head(V, K, dtype), _rows(M, K, dtype)
    screen = _cpu_ext.make_head_screen(w)
    assert screen[0].shape == (V, (K + 63) // 64 * 64) and screen[0].dtype == torch.int8
    want = reference.head_argmax(x, w)
    assert torch.equal(cpu.screened_argmax(x, w, list(screen)), want)
    assert torch.equal(cpu.argmax(cpu.linear(x, w)), want)  # (the kernel's head is the reference's here)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_bounds_hold_the_computed_and_the_exact_logits(cpu, dtype):
    V, K = 3000, 200
    w, x = _head(V, K, dtype, seed=3), _rows(4, K, dtype, seed=4)
    hi, lo = cpu.screen_bounds(x, list(_cpu_ext.make_head_screen(w)))
    exact = x.double() @ w.double().T
    computed = cpu.linear(x, w).double() if dtype == torch.float32 else None
    assert bool((lo <= exact).all()) and bool((exact <= hi).all())
    if computed is not None:
        assert bool((lo <= computed).all()) and bool((computed <= hi).all())
    gauss = (torch.randn(V, K, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    hi, lo = cpu.screen_bounds(x, list(_cpu_ext.make_head_screen(gauss)))
    spread = (x.double() @ gauss.double().T).std(dim=1)
    assert bool(((hi - lo).double().median(dim=1).values < 0.25 * spread).all())  # tight: few rows can win


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_each_rows_bounds_do_not_depend_on_the_other_rows(cpu, dtype):
    """The VNNI loop runs the prepared rows in groups (one group up to 6, groups of 4 beyond): every row count gives
    each row the bounds it has alone, bit for bit, and they hold the exact logits (V not a multiple of the 8-row
    blocks, so the portable tail runs too)."""
    V, K = 203, 150
    w = _head(V, K, dtype, seed=6)
    screen = list(_cpu_ext.make_head_screen(w))
    x = _rows(13, K, dtype, seed=7)
    alone = [cpu.screen_bounds(x[m:m + 1], screen) for m in range(13)]
    exact = x.double() @ w.double().T
    for M in (1, 2, 5, 6, 7, 8, 9, 13):
        hi, lo = cpu.screen_bounds(x[:M], screen)
        for m in range(M):
            assert torch.equal(hi[m], alone[m][0][0]) and torch.equal(lo[m], alone[m][1][0]), (M, m)
        assert bool((lo <= exact[:M]).all()) and bool((exact[:M] <= hi).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_ties_and_near_ties_choose_the_first_index(cpu, dtype):
    V, K = 700, 96
    w = _head(V, K, dtype, seed=5)
    x = _rows(3, K, dtype, seed=6)
    logits = torch.nn.functional.linear(x, w)
    best = int(logits[0].float().argmax())
    w = w.clone()
    w[best + 7] = w[best]  # an exact tie after the best: the first stays
    w[5] = w[best]  # and one before it: now the first
    near = w[best].float().clone()
    near[0] += 1e-3  # a near tie, which rounds to the same bf16 logit or not
    w[2] = near.to(dtype)
    screen = _cpu_ext.make_head_screen(w)
    want = reference.head_argmax(x, w)
    assert int(want[0]) in (2, 5)
    assert torch.equal(cpu.screened_argmax(x, w, list(screen)), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_non_finite_and_zero_rows_take_the_whole_head(cpu, dtype):
    V, K = 300, 64
    w = _head(V, K, dtype, seed=7)
    x = _rows(4, K, dtype, seed=8)
    x[1, 5] = float("nan")
    x[2, 9] = float("inf")
    x[3] = 0  # every logit 0: index 0
    screen = _cpu_ext.make_head_screen(w)
    got = cpu.screened_argmax(x, w, list(screen))
    assert torch.equal(got, reference.head_argmax(x, w))
    assert int(got[3]) == 0


def test_make_head_screen_bounds_and_refusals():
    w = _head(50, 70, torch.float32, seed=9)
    q, scale, qsum, err, wnorm = _cpu_ext.make_head_screen(w)
    wd = w.double()
    assert q.shape == (50, 128) and bool((q[:, 70:] == 0).all()) and bool((q.abs() <= 127).all())
    assert torch.equal(qsum, q.sum(1, dtype=torch.int32))
    assert bool(((wd - scale.double()[:, None] * q[:, :70].double()).norm(dim=1) <= err.double()).all())
    assert bool((wd.norm(dim=1) <= wnorm.double()).all())
    bad = w.clone()
    bad[7, 3] = float("inf")
    assert _cpu_ext.make_head_screen(bad) is None
    assert _cpu_ext.make_head_screen(w.half()) is None


def test_a_screen_for_another_head_is_refused(cpu):
    w = _head(40, 64, torch.float32)
    other = list(_cpu_ext.make_head_screen(_head(41, 64, torch.float32)))
    with pytest.raises(ValueError, match="not this head's|rows"):
        cpu.screened_argmax(_rows(1, 64, torch.float32), w, other)
    with pytest.raises(ValueError, match="head_screen must be"):
        cpu.screen_bounds(_rows(1, 64, torch.float32), other[:3])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kangaroo", [False, True], ids=["plain", "kangaroo"])
def test_one_call_passes_with_and_without_the_screen_agree(cpu, dtype, kangaroo, monkeypatch):
    """A random model's one-call passes (plain steps of 1 row, verifications of 2-5) with the screened head (the
    default; test_target_pass checks it against the step-by-step path) and with the whole head
    (KANGAROO_RT_HEAD_SCREEN=0): the same tokens, states and caches."""
    from test_target_pass import _run

    runs = {}
    for screen in ("1", "0"):
        monkeypatch.setenv(_cpu_ext.SCREEN_ENV, screen)
        runs[screen] = _run(True, dtype, 1, 1, 4, 0.0, False, None, 4, kangaroo)
    for a, b in zip(runs["1"], runs["0"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("V,K,M", [(1000, 576, 1), (1003, 576, 2), (517, 100, 3), (64, 64, 5), (9, 33, 8),
                                   (4096, 576, 1)])
def test_screen_estimate_is_the_reference_and_within_the_bounds(cpu, dtype, V, K, M):
    """The int8 head's estimates (what the draft chain reads as its head's logits): reference.screen_estimate's bits
    rounded to the dtype (the VNNI blocks and the portable tail alike: V % 8 != 0 included), inside the screen's
    bounds of the logits, and, for a head without outlier columns, close to them."""
    w, x = _head(V, K, dtype, seed=V), _rows(M, K, dtype, seed=K)
    screen = _cpu_ext.make_head_screen(w)
    est = cpu.screen_estimate(x, list(screen))
    assert est.dtype == dtype and est.shape == (M, V)
    ref = reference.screen_estimate(x, *screen[:3])
    assert torch.equal(est, ref.to(dtype))
    assert torch.equal(_cpu_ext.screen_estimate(x, screen), est)
    hi, lo = cpu.screen_bounds(x, list(screen))
    assert bool((lo <= ref).all()) and bool((ref <= hi).all())
    gauss = (torch.randn(V, K, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    exact = x.double() @ gauss.double().T
    error = cpu.screen_estimate(x, list(_cpu_ext.make_head_screen(gauss))).double() - exact
    assert bool((error.abs().max(dim=1).values < 0.05 * exact.std(dim=1)).all())  # close, as drafting needs


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_screen_estimate_rows_alone_and_non_finite_rows(cpu, dtype):
    """A row's estimates do not depend on the other rows; a row with a NaN or an infinity, or one too large for the
    bounds' arithmetic, is NaN throughout (a sampled draft then fails as it does on NaN logits), and a zero row is 0."""
    V, K = 203, 70
    w = _head(V, K, dtype, seed=7)
    screen = _cpu_ext.make_head_screen(w)
    x = _rows(5, K, dtype, seed=8)
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0
    x[4, 1] = 3e19
    est = cpu.screen_estimate(x, list(screen))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for m in range(5):  # the same bits, NaN rows included
        assert torch.equal(cpu.screen_estimate(x[m:m + 1], list(screen))[0].view(bits), est[m].view(bits))
    assert bool(est[1].isnan().all()) and bool(est[2].isnan().all()) and bool(est[4].isnan().all())
    assert bool((est[3] == 0).all()) and bool(torch.isfinite(est[0]).all())
    assert torch.equal(est.isnan(), reference.screen_estimate(x, *screen[:3]).isnan())
    assert cpu.screen_estimate(x[:0], list(screen)).shape == (0, V)
    with pytest.raises(ValueError, match="rows"):
        cpu.screen_estimate(x, list(_cpu_ext.make_head_screen(w[:-1]))[:3] + list(screen[3:]))


_VARIANT_SCRIPT = r"""
import hashlib, sys, torch
sys.path.insert(0, "tests")
from test_head_screen import _head, _rows
from kangaroo_rt import _cpu_ext, reference
cpu = _cpu_ext.load()
torch.set_num_threads(1)  # (the running floors' bounds depend on the order of the calls: one thread, one order)
for dtype in (torch.float32, torch.bfloat16):
    for M in (1, 3, 6):
        w, x = _head(1001, 200, dtype, seed=M), _rows(M, 200, dtype, seed=M + 1)
        screen = _cpu_ext.make_head_screen(w)
        for floors in (False, True):
            assert torch.equal(cpu.screened_argmax(x, w, list(screen), floors=floors), reference.head_argmax(x, w))
        assert torch.equal(cpu.screen_estimate(x, list(screen)), reference.screen_estimate(x, *screen[:3]).to(dtype))
        hi, lo = cpu.screen_bounds(x, list(screen), floors=True)
        print(dtype, M, hashlib.sha256(hi.numpy().tobytes() + lo.numpy().tobytes()).hexdigest())
print(cpu.isa())
"""


def test_every_variant_chooses_the_heads_argmax(cpu):
    """The portable screen (the AVX2 and portable variants) and the VNNI one: the same choices, the same estimates,
    and the same bounds with running floors called in the same order (V = 1001: the VNNI blocks and the portable
    tail)."""
    from test_cpu_ext import ROOT

    bounds = {}
    for isa in cpu.supported_isas():
        env = dict(os.environ, KANGAROO_RT_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        assert lines[-1] == isa
        bounds[isa] = lines[:-1]
    assert len({tuple(b) for b in bounds.values()}) == 1, bounds


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [6, 7, 8])
def test_running_floors_rule_rows_out_with_the_first_part(cpu, dtype, M):
    """With running floors (6 rows and more), every row's bounds are either both parts' bounds, bit for bit, or the
    first part's, whose upper bound is below the row's largest lower bound (a floor the screen reached): the rows
    those leave out cannot win. The bounds hold the logits, most rows take the first part alone, and the choice is
    the head's argmax. Fewer than 6 rows ignore the floors."""
    V, K = 3001, 576
    w, x = _head(V, K, dtype, seed=11), _rows(M, K, dtype, seed=12)
    screen = list(_cpu_ext.make_head_screen(w))
    hi, lo = cpu.screen_bounds(x, screen, floors=True)
    hi2, lo2 = cpu.screen_bounds(x, screen)
    both = (hi == hi2) & (lo == lo2)
    assert bool((both | (hi < lo.max(dim=1, keepdim=True).values)).all())
    assert bool((both.sum(dim=1) < V // 4).all())  # (the first part ruled most rows out)
    exact = x.double() @ w.double().T
    assert bool((lo <= exact).all()) and bool((exact <= hi).all())
    if dtype == torch.float32:
        computed = cpu.linear(x, w).double()
        assert bool((lo <= computed).all()) and bool((computed <= hi).all())
    want = reference.head_argmax(x, w)
    assert torch.equal(cpu.screened_argmax(x, w, screen, floors=True), want)
    assert torch.equal(cpu.screened_argmax(x, w, screen, floors=False), want)
    few = cpu.screen_bounds(x[:5], screen, floors=True)
    assert torch.equal(few[0], hi2[:5]) and torch.equal(few[1], lo2[:5])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_logit_that_overflows_is_seen(cpu, dtype):
    """Row 0's products overflow to +inf and -inf inside the head's sum (a NaN logit: the largest, for argmax)
    while its estimate is 0; inputs of 1e19 and more take the whole head at once."""
    w = torch.tensor([[1e22, -1e22], [1e10, 0.0], [3.0, 4.0]]).to(dtype)
    for scale in (1e17, 1e20):
        x = torch.tensor([[scale, scale]]).to(dtype)
        want = cpu.argmax(cpu.linear(x, w))
        assert dtype == torch.bfloat16 or int(want) == 0  # (fp32: +inf + -inf; bf16's pairs overflow otherwise)
        assert torch.equal(cpu.screened_argmax(x, w, list(_cpu_ext.make_head_screen(w))), want)
