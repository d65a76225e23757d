"""The CPU linear kernel (csrc/cpu/linear.cpp through kangaroo_rt._cpu) and ops.linear: accuracy against fp64 by
the tolerance rule, bit-for-bit independence of a row's result from the batch, the thread count and the ISA
variant, clear errors for inputs the kernel refuses, and ops.linear's routing of those to torch."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import assert_tolerance_rule
from kangaroo_rt import _cpu_ext, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("avx512_bf16", "avx512", "avx2", "portable")
DTYPES = (torch.float32, torch.bfloat16)
KS = (1, 15, 17, 33, 576, 1539)
NS = (1, 3, 5, 17, 576)
MS = (0, 1, 2, 5, 8, 64, 65, 130)
BUILD_HINT = "KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation -e ."


def test_extension_is_built_where_required():
    """make test sets KANGAROO_RT_REQUIRE_CPU_EXT=1 (make venv builds the extension), so that the kernel tests
    below cannot all skip unnoticed."""
    if os.environ.get("KANGAROO_RT_REQUIRE_CPU_EXT") == "1":
        assert _cpu_ext.is_built(), f"kangaroo_rt._cpu is not built; build it with `{BUILD_HINT}`"
        _cpu_ext.load()
    elif not _cpu_ext.is_built():
        pytest.skip("kangaroo_rt._cpu is not built and KANGAROO_RT_REQUIRE_CPU_EXT is not 1")


@pytest.fixture(scope="module")
def cpu():
    if not _cpu_ext.is_built():
        pytest.skip(f"kangaroo_rt._cpu is not built ({BUILD_HINT})")
    return _cpu_ext.load()


@pytest.fixture(params=ISAS)
def isa(request, cpu):
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} variant")
    return request.param


def _inputs(m, k, n, w_dtype, x_dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + m * 7 + k * 3 + n)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(w_dtype)
    b = torch.randn(n, generator=gen).to(w_dtype) if bias else None
    return x, w, b


def _fp64(x, w, b):
    out = x.double() @ w.double().T
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("w_dtype", DTYPES, ids=["w_fp32", "w_bf16"])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=["x_fp32", "x_bf16"])
def test_matches_fp64_by_the_tolerance_rule(cpu, isa, w_dtype, x_dtype):
    """Every (K, N) of the odd shapes, M cycling through 0..130 (65 and 130 cross a pass of 64 rows), bias on
    and off; torch's F.linear in x's dtype is the comparison."""
    for i, (k, n) in enumerate(itertools.product(KS, NS)):
        m, bias = MS[i % len(MS)], i % 2 == 0
        x, w, b = _inputs(m, k, n, w_dtype, x_dtype, bias)
        got = cpu.linear_with_isa(x, w, b, isa)
        assert got.shape == (m, n) and got.dtype == x_dtype, (got.shape, got.dtype)
        if m == 0:
            continue
        want = F.linear(x, w.to(x_dtype), None if b is None else b.to(x_dtype))
        assert_tolerance_rule(got, want, _fp64(x, w, b))


@pytest.mark.parametrize("w_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)], ids=["fp32", "w_bf16", "bf16"])
def test_a_row_has_the_same_bits_whatever_the_batch(cpu, isa, w_dtype, x_dtype):
    """linear(x)[i] == linear(x[i:i+1])[0] for every i; a row moved to another position among other rows, and
    batches of every group size, give the same bits (bf16 x bf16 is the dot-product order)."""
    m, k, n = 70, 1539, 37  # a pass boundary at 64; K and N not multiples of any vector width
    x, w, b = _inputs(m, k, n, w_dtype, x_dtype, True, seed=1)
    full = cpu.linear_with_isa(x, w, b, isa)
    for i in range(m):
        assert torch.equal(cpu.linear_with_isa(x[i:i + 1], w, b, isa)[0], full[i]), i
    for rows in (2, 3, 4, 5, 6, 7, 8, 13, 64, 65):
        assert torch.equal(cpu.linear_with_isa(x[:rows], w, b, isa), full[:rows]), rows
    others, _, _ = _inputs(m, k, n, w_dtype, x_dtype, False, seed=2)
    for i, place in ((0, 0), (5, 3), (69, 40), (17, 66)):
        mixed = torch.cat([others[:place], x[i:i + 1], others[place:]])
        assert torch.equal(cpu.linear_with_isa(mixed, w, b, isa)[place], full[i]), (i, place)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cpu.linear_with_isa(x[perm], w, b, isa), full[perm])


@pytest.mark.parametrize("k,n", [(1100, 75), (1024, 16), (2048, 3)])
def test_wide_k_panels_keep_the_bits_and_the_accuracy(cpu, isa, k, n):
    """fp32's 7-8 row path at K >= 1024 (panels of 4 blocks of W, K in pieces of 192, prefetch into the next
    panel): a last piece shorter than 192 with a tail chunk (K = 1100), a partial panel and 3 rows of W past the
    blocks (N = 75: panels of 4 + 4 + 4 + 4 + 2 blocks on one thread, 4 + 4 + 4 and 4 + 2 on two), one whole panel
    (N = 16), no whole block (N = 3). Each row equals its own call, and the rows meet the tolerance rule."""
    x, w, b = _inputs(8, k, n, torch.float32, torch.float32, True, seed=6)
    for rows in (7, 8):
        got = cpu.linear_with_isa(x[:rows], w, b, isa)
        for i in range(rows):
            assert torch.equal(cpu.linear_with_isa(x[i:i + 1], w, b, isa)[0], got[i]), (rows, i)
        assert_tolerance_rule(got, F.linear(x[:rows], w, b), _fp64(x[:rows], w, b))


def test_every_variant_gives_the_same_bits(cpu):
    """The variants run one reduction order, so they agree exactly (which also pins the order down)."""
    for k, n, m, w_dtype, x_dtype in ((1539, 37, 9, torch.float32, torch.float32),
                                      (1539, 37, 6, torch.float32, torch.float32),  # fp32's 5-6 row blocks
                                      (33, 17, 5, torch.float32, torch.float32),
                                      (33, 17, 5, torch.bfloat16, torch.float32),
                                      (576, 576, 3, torch.float32, torch.float32),
                                      (1, 5, 2, torch.bfloat16, torch.float32),
                                      (1539, 37, 9, torch.bfloat16, torch.bfloat16),
                                      (33, 17, 5, torch.bfloat16, torch.bfloat16),
                                      (1, 5, 2, torch.bfloat16, torch.bfloat16)):
        x, w, b = _inputs(m, k, n, w_dtype, x_dtype, True, seed=4)
        results = {isa: cpu.linear_with_isa(x, w, b, isa) for isa in cpu.supported_isas()}
        first = next(iter(results.values()))
        assert all(torch.equal(r, first) for r in results.values()), (k, n, m, list(results))


def test_bf16_pairs_flush_as_x86_does_at_the_smallest_normal(cpu):
    """An FMA whose exact result lies just below 2^-126 but rounds up to 2^-126 with denormals on is tiny for x86's
    FTZ (tininess after rounding to 24 bits, unbounded exponent): vdpbf16ps gives 0, and so must every variant.
    Odd pair first: 2^-63 * 2^-63 = 2^-126; then the even pair adds -2^-150."""
    w = torch.tensor([[2.0 ** -75, 2.0 ** -63], [2.0 ** -75, 2.0 ** -63]]).bfloat16()
    x = torch.tensor([[-2.0 ** -75, 2.0 ** -63], [2.0 ** -75, 2.0 ** -63]]).bfloat16()
    for isa in cpu.supported_isas():
        y = cpu.linear_with_isa(x, w, None, isa).float()
        assert y[0, 0].item() == 0.0, isa  # 2^-126 - 2^-150: tiny, flushed
        assert y[1, 1].item() == 2.0 ** -126, isa  # 2^-126 + 2^-150 rounds to 2^-126: kept


@pytest.mark.parametrize("exponents", [(54, 75), (0, 255)], ids=["near_underflow", "any_finite"])
def test_bf16_pairs_agree_across_variants_on_random_bits(cpu, exponents):
    """Random bf16 bit patterns, finite: products whose sums straddle 2^-126 (exponent fields 54..74, some
    denormal inputs), or anything finite (overflow to inf, inf - inf). Every variant gives the same bits, which on
    a CPU with AVX512-BF16 also checks the emulation against the instruction."""
    gen = torch.Generator().manual_seed(11 + exponents[0])

    def bits(shape):
        sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int32) << 15
        exp = torch.randint(exponents[0], exponents[1], shape, generator=gen, dtype=torch.int32)
        exp = torch.where(torch.rand(shape, generator=gen) < 0.05, torch.zeros_like(exp), exp)  # denormals
        mant = torch.randint(0, 128, shape, generator=gen, dtype=torch.int32)
        return (sign | (exp << 7) | mant).to(torch.int16).view(torch.bfloat16)

    x, w, b = bits((64, 97)), bits((33, 97)), bits((33,))
    results = {isa: cpu.linear_with_isa(x, w, b, isa).view(torch.int16) for isa in cpu.supported_isas()}
    first = next(iter(results.values()))
    assert all(torch.equal(r, first) for r in results.values()), list(results)


def _flush(t: torch.Tensor) -> torch.Tensor:
    """Denormals to the zero of their sign (DAZ / FTZ)."""
    return torch.where(t.abs() < torch.finfo(torch.float32).tiny, t * 0, t)


def _pair_order(x: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    """kr_cpu_linear_rows_bf16's order in torch fp32 ops: each output one chain over the pairs of k's, the odd k of the
    pair and then the even one, every result flushed, then the bias; rounded to bf16. A product of two bf16 is exact
    in fp32 (above the denormal range), so product-then-add is the fused multiply-add."""
    m, k = x.shape
    xs = _flush(F.pad(x.float(), (0, k % 2))).view(m, 1, -1, 2)
    ws = _flush(F.pad(w.float(), (0, k % 2))).view(1, w.shape[0], -1, 2)
    acc = torch.zeros(m, w.shape[0])
    for p in range(xs.shape[2]):
        acc = _flush(acc + xs[:, :, p, 1] * ws[:, :, p, 1])
        acc = _flush(acc + xs[:, :, p, 0] * ws[:, :, p, 0])
    if b is not None:
        acc = _flush(acc + _flush(b.float()))
    return acc.to(torch.bfloat16)


def _lanes_and_tree(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The order before 2026-12-06 (16 lanes along K, per chunk of 32 k's a pair each, then a 16 -> 1 tree): what
    the order test must tell apart from the chain."""
    m, k = x.shape
    pad = (-k) % 32
    xs = _flush(F.pad(x.float(), (0, pad))).view(m, 1, -1, 16, 2)
    ws = _flush(F.pad(w.float(), (0, pad))).view(1, w.shape[0], -1, 16, 2)
    acc = torch.zeros(m, w.shape[0], 16)
    for c in range(xs.shape[2]):
        acc = _flush(acc + xs[:, :, c, :, 1] * ws[:, :, c, :, 1])
        acc = _flush(acc + xs[:, :, c, :, 0] * ws[:, :, c, :, 0])
    s8 = _flush(acc[..., :8] + acc[..., 8:])
    s4 = _flush(s8[..., :4] + s8[..., 4:])
    return _flush(_flush(s4[..., 0] + s4[..., 2]) + _flush(s4[..., 1] + s4[..., 3])).to(torch.bfloat16)


@pytest.mark.parametrize("k", (1, 31, 32, 33, 100, 576))
def test_bf16_pairs_follow_the_dot_product_order(cpu, isa, k):
    """bf16 x bf16 is computed in vdpbf16ps's per-lane order, one chain per output over the pairs of k's, denormal
    inputs read as zero (some x are bf16 denormals). Two large terms that cancel (2^16 apart from the rest) make the
    order show through the bf16 rounding: the low bits of what is added between them are lost in a chain, not in
    a tree, so the same inputs in the old order give other outputs (checked, where K is long enough to tell)."""
    x, w, b = _inputs(6, k, 40, torch.bfloat16, torch.bfloat16, True, seed=7)
    if k >= 100:
        x[:, 3] = x[:, k - 4] = 2.0 ** 16
        w[:, 3] = torch.randn(40).bfloat16()
        w[:, k - 4] = -w[:, 3]
    x[0, ::3] = torch.tensor(3e-39).bfloat16()  # bf16 denormals: read as 0
    x[1, ::2] = -x[1, ::2] * 1e-30  # tiny, but products stay normal
    got = cpu.linear_with_isa(x, w, b, isa)
    assert torch.equal(got.view(torch.int16), _pair_order(x, w, b).view(torch.int16))
    packed = cpu.linear_with_isa(x, cpu.pack_bf16(w), b, isa, packed=True)
    assert torch.equal(packed.view(torch.int16), got.view(torch.int16))
    if k >= 100:
        plain = cpu.linear_with_isa(x, w, None, isa)
        assert not torch.equal(plain[2:].view(torch.int16), _lanes_and_tree(x, w)[2:].view(torch.int16))


def test_bf16_outputs_are_rounded_as_torch_rounds(cpu, isa):
    """With bf16 activations each task rounds its fp32 rows itself (kr_cpu_round_bf16): the bits of torch's
    float -> bf16 over random bit patterns (infinities, denormals) and exact ties, at a vector tail too."""
    gen = torch.Generator().manual_seed(11)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1037,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x7F7F8000, 0x00008000, 0x7F800000, 0x7FC00001, 0xFF800001 - 2 ** 32],
                        dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits, ties]).view(torch.float32)
    values = torch.where(values == 0, torch.ones_like(values), values)  # -0 * 1 + 0 is +0: keep signed zeros out
    w = values[:, None].contiguous()  # (N, 1): y[0, n] = w[n] exactly
    one = torch.ones(1, 1)
    expected = cpu.linear_with_isa(one, w, None, isa).to(torch.bfloat16)
    got = cpu.linear_with_isa(one.bfloat16(), w, None, isa)
    assert got.dtype == torch.bfloat16
    nan = values.isnan()
    assert torch.equal(got[0, ~nan].view(torch.int16), expected[0, ~nan].view(torch.int16))
    # a NaN becomes c10::BFloat16's canonical 0x7fc0 (torch's vectorized cast keeps the sign and upper payload)
    assert int(nan.sum()) > 0 and bool((got[0, nan].view(torch.int16) == 0x7FC0).all())


def test_thread_count_changes_no_bits(cpu):
    x, w, b = _inputs(8, 576, 1536, torch.bfloat16, torch.float32, True, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.linear(x, w, b)
        torch.set_num_threads(2)
        two = cpu.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_shapes_strides_and_empty_inputs(cpu):
    w, b = torch.randn(17, 33), torch.randn(17)
    x = torch.randn(2, 3, 33)
    out = cpu.linear(x, w, b)
    assert out.shape == (2, 3, 17) and torch.equal(out, cpu.linear(x.reshape(6, 33), w, b).reshape(2, 3, 17))
    wide = torch.randn(4, 50)
    assert torch.equal(cpu.linear(wide[:, :33], w), cpu.linear(wide[:, :33].contiguous(), w))  # row stride 50
    cols = torch.randn(33, 4).T  # column stride 4
    assert torch.equal(cpu.linear(cols, w), cpu.linear(cols.contiguous(), w))
    assert torch.equal(cpu.linear(x[0, 0], w), cpu.linear(x[0, :1], w)[0])  # a 1-D x
    assert cpu.linear(torch.randn(0, 33), w).shape == (0, 17)
    assert cpu.linear(torch.randn(2, 0, 33), w, b).shape == (2, 0, 17)
    assert cpu.linear(torch.randn(3, 33), torch.randn(0, 33)).shape == (3, 0)
    assert torch.equal(cpu.linear(torch.randn(3, 0), torch.randn(5, 0), b[:5]), b[:5].expand(3, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", (1, 3, 8))
def test_a_sweep_gives_each_matrix_the_bits_of_its_own_call(cpu, dtype, m):
    """linear_sweep (bench_linear's one-call pass, the stack's claiming of chunks) against linear() per matrix,
    bit for bit, over shapes that leave tail row blocks and read a prefix of x, with 1, 2, 3 and 9 threads (more
    than this machine's cores: late threads claim what is left)."""
    gen = torch.Generator().manual_seed(m)
    shapes = ((17, 33), (576, 576), (5, 1539), (1536, 576), (3, 1))
    ws = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype) for n, k in shapes]
    x = torch.randn(m, 1539, generator=gen).to(dtype)
    want = torch.cat([cpu.linear(x[:, :w.shape[1]], w) for w in ws], dim=1)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3, 9):
            torch.set_num_threads(t)
            assert torch.equal(cpu.linear_sweep(x, ws), want)
            out = torch.full_like(want, float("nan"))
            assert cpu.linear_sweep(x, ws, out=out) is not None and torch.equal(out, want)
    finally:
        torch.set_num_threads(threads)
    assert cpu.linear_sweep(x, []).shape == (m, 0)
    assert cpu.linear_sweep(x[:0], ws).shape == (0, want.shape[1])


def test_a_sweep_refuses_what_it_cannot_run(cpu):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight 1 must be a contiguous, non-empty \(N, K\) with K <= x.shape\[1\] = 8"):
        cpu.linear_sweep(x, [torch.randn(3, 8), torch.randn(3, 9)])
    with pytest.raises(TypeError, match="a weight must be Float like the other inputs, got BFloat16"):
        cpu.linear_sweep(x, [torch.randn(3, 8).bfloat16()])
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 3\)"):
        cpu.linear_sweep(x, [torch.randn(3, 8)], out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="x must be a contiguous"):
        cpu.linear_sweep(torch.randn(8, 2).T, [torch.randn(3, 2)])


def test_bad_inputs_get_a_clear_error_from_the_extension(cpu):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        cpu.linear(x, torch.randn(8, 4).T)
    with pytest.raises(TypeError, match="x must be float32 or bfloat16, got Half"):
        cpu.linear(x.half(), w)
    with pytest.raises(TypeError, match="weight must be float32 or bfloat16, got Double"):
        cpu.linear(x, w.double())
    with pytest.raises(ValueError, match=r"x must be \(..., K\) with K = weight.shape\[1\] = 8"):
        cpu.linear(torch.randn(2, 7), w)
    with pytest.raises(ValueError, match=r"weight must be \(N, K\)"):
        cpu.linear(x, torch.randn(8))
    with pytest.raises(ValueError, match=r"bias must be \(N,\) with N = 4"):
        cpu.linear(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="must be CPU tensors, got meta"):
        cpu.linear(x.to("meta"), w.to("meta"))
    with pytest.raises(ValueError, match="unknown variant sse9"):
        cpu.linear_with_isa(x, w, None, "sse9")


@pytest.mark.parametrize("dtype", DTYPES)
def test_peak_macs_is_a_ceiling_of_the_kernel_on_cached_weights(cpu, dtype):
    """peak_macs (bench_linear's compute roof) against the kernel itself on one thread with the weights in L2, where
    only the arithmetic limits it: the kernel must not beat the ceiling (fp32 stays well below it: loads, stores and
    the tree: 62-71% of it at 8 rows on the AMD EPYC of 2026-12-05; bf16, its weight packed, 83-94% on the Zen 4 of
    2026-12-06), and the ceiling is not far above it either."""
    import time

    name = "float32" if dtype == torch.float32 else "bfloat16"
    x, w = torch.randn(8, 512).to(dtype), torch.randn(256, 512).to(dtype)  # 256 / 512 KB of weights: L2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    packed = dtype == torch.bfloat16  # (bf16 streams its weights packed: a row-major one is packed at every call)
    if packed:
        w = cpu.pack_bf16(w)
    try:
        for _ in range(50):
            cpu.linear(x, w, packed=packed)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                cpu.linear(x, w, packed=packed)
            best = min(best, (time.perf_counter() - start) / 200)
        peak = max(cpu.peak_macs(name, 1) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    kernel_rate = x.shape[0] * w.numel() / best
    assert kernel_rate < 1.1 * peak and peak < 5 * kernel_rate, (kernel_rate, peak)


@pytest.mark.parametrize("n,k", [(16, 64), (37, 10), (5, 7), (1, 1), (48, 33)])
def test_pack_bf16_lays_out_panels_of_16_rows_pair_by_pair(cpu, n, k):
    """kr_cpu_pack_bf16's layout, index by index (kr_cpu.h): word (p, l) of panel b at 16 b K2 + p r + l, r the panel's
    rows (16, or what is left), its low half k = 2p and its high half k = 2p + 1 (zero past K); the C++ packing
    equals the torch one (pack_rows_bf16), and out= fills a given tensor."""
    w = torch.arange(1, n * k + 1, dtype=torch.float32).view(n, k).bfloat16()  # distinct, exact up to 256
    w = torch.where(torch.arange(n * k).view(n, k) < 256, w, torch.randn(n, k).bfloat16())
    k2 = (k + 1) // 2
    packed = cpu.pack_bf16(w)
    assert packed.shape == (n, 2 * k2) and packed.dtype == torch.bfloat16
    flat = packed.flatten()
    for row in range(n):
        b, lane, rows = row // 16, row % 16, min(16, n - row // 16 * 16)
        for col in range(2 * k2):
            at = 2 * (16 * b * k2 + (col // 2) * rows + lane) + col % 2
            want = w[row, col] if col < k else torch.zeros((), dtype=torch.bfloat16)
            assert flat[at].view(torch.int16) == want.view(torch.int16), (row, col)
    assert torch.equal(_cpu_ext.pack_rows_bf16(w).view(torch.int16), packed.view(torch.int16))
    out = torch.full_like(packed, 7.0)
    assert cpu.pack_bf16(w, out=out) is out and torch.equal(out.view(torch.int16), packed.view(torch.int16))


def test_pack_bf16_refuses_what_it_cannot_pack(cpu):
    with pytest.raises(TypeError, match="weight must be bfloat16, got Float"):
        cpu.pack_bf16(torch.randn(4, 4))
    with pytest.raises(ValueError, match="weight must be a dense 2-d CPU tensor"):
        cpu.pack_bf16(torch.randn(4).bfloat16())
    with pytest.raises(ValueError, match=r"out must be a contiguous bfloat16 \(4, 6\)"):
        cpu.pack_bf16(torch.randn(4, 5).bfloat16(), out=torch.empty(4, 5, dtype=torch.bfloat16))
    w = torch.randn(4, 6).bfloat16()
    with pytest.raises(ValueError, match="out must not be the weight"):
        cpu.pack_bf16(w, out=w)
    with pytest.raises(ValueError, match=r"packed weight takes bf16 x and a bf16 weight"):
        cpu.linear(torch.randn(2, 6), cpu.pack_bf16(w), packed=True)
    with pytest.raises(ValueError, match=r"K rounded up to even"):
        cpu.linear(torch.randn(2, 6).bfloat16(), cpu.pack_bf16(w)[:, :4].contiguous(), packed=True)


PACKED_CHECK = """
import torch
from kangaroo_rt import _cpu_ext
cpu = _cpu_ext.load()
gen = torch.Generator().manual_seed(0)
shapes = ((8, 32), (16, 64), (72, 96), (37, 10), (576, 576), (200, 1536))
ws = [torch.randn(n, k, generator=gen).bfloat16() for n, k in shapes]
packed = [cpu.pack_bf16(w) for w in ws]
for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17, 64, 65):
    x = torch.randn(m, 1536, generator=gen).bfloat16()
    want = cpu.linear_sweep(x, ws)
    assert torch.equal(cpu.linear_sweep(x, packed, packed=True), want), (cpu.isa(), m)
    for w, p in zip(ws, packed):
        k = w.shape[1]
        assert torch.equal(cpu.linear(x[:, :k], p, packed=True), cpu.linear(x[:, :k], w)), (cpu.isa(), m, k)
# an odd K: the packed width rounds up; the same bits
w = torch.randn(21, 9, generator=gen).bfloat16()
x = torch.randn(5, 9, generator=gen).bfloat16()
assert torch.equal(cpu.linear(x, cpu.pack_bf16(w), packed=True), cpu.linear(x, w)), cpu.isa()
print(cpu.isa(), "ok")
"""


def test_packed_weights_give_the_row_major_bits_on_every_variant(cpu):
    """The packed layout (kr_cpu_linear_rows_bf16_packed through linear_sweep(packed=True) and linear(packed=True))
    against the row-major kernel, bit for bit, at every row count path (1-6 rows over 4 panels, 7-8 over 2, groups
    of at most 8 past that, passes past 64), partial last panels, and on every variant this CPU runs (each in its
    own process: the variant is chosen once per process)."""
    for isa in cpu.supported_isas():
        env = {**os.environ, "KANGAROO_RT_CPU_ISA": isa}
        done = subprocess.run([sys.executable, "-c", PACKED_CHECK], env=env, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0 and done.stdout.strip() == f"{isa} ok", done.stderr[-2000:]


def test_packed_sweeps_refuse_what_they_cannot_run(cpu):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="packed weights are bf16 only"):
        cpu.linear_sweep(x, [torch.randn(8, 64)], packed=True)
    with pytest.raises(ValueError, match="packed weight 0 must be .N, K. of an even K"):
        cpu.linear_sweep(x.bfloat16(), [torch.randn(12, 63).bfloat16()], packed=True)


def test_peak_macs_refuses_bad_arguments(cpu):
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16', got 'float16'"):
        cpu.peak_macs("float16", 1)
    with pytest.raises(ValueError, match="threads must be in 1..1024 and iters positive"):
        cpu.peak_macs("float32", 0)
    with pytest.raises(ValueError, match="threads must be in 1..1024 and iters positive"):
        cpu.peak_macs("float32", 1, 0)


def test_ops_linear_routes_what_the_kernel_does_not_cover_to_torch(cpu, monkeypatch):
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    ops._RESOLVED.clear()
    x, w, b = torch.randn(3, 24), torch.randn(5, 24), torch.randn(5)
    assert torch.equal(ops.linear(x, w, b), cpu.linear(x, w, b))
    assert all(torch.equal(ops.linear(x[i:i + 1], w, b)[0], ops.linear(x, w, b)[i]) for i in range(3))
    assert torch.equal(ops.linear(x.bfloat16(), w.bfloat16()), cpu.linear(x.bfloat16(), w.bfloat16()))
    strided = torch.randn(24, 5).T
    torch.testing.assert_close(ops.linear(x, strided, b), F.linear(x, strided, b))
    torch.testing.assert_close(ops.linear(x.half(), w.half()), F.linear(x.half(), w.half()))
    assert ops.linear(x.to("meta"), w.to("meta")).device.type == "meta"
    with pytest.raises(RuntimeError):  # torch's own error for mixed dtypes, as on every backend
        ops.linear(x, w.bfloat16())
    with pytest.raises(RuntimeError):
        ops.linear(torch.randn(3, 23), w)
    wg = w.clone().requires_grad_()
    out = ops.linear(x, wg, b)  # autograd records: the torch reference serves
    out.sum().backward()
    torch.testing.assert_close(wg.grad, x.sum(0).expand(5, 24))
    with torch.no_grad():
        assert torch.equal(ops.linear(x, wg, b), cpu.linear(x, w, b))


def test_backend_table(cpu, monkeypatch):
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    ops._RESOLVED.clear()
    assert ops.backend_table("cpu")["linear"] == "cpu"
    assert ops.backend_table("cuda")["linear"] == "torch"
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    assert ops.backend_table("cpu")["linear"] == "torch"
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "cpu")
    table = ops.backend_table("cpu")
    assert {op for op, backend in table.items() if backend == "cpu"} == set(_cpu_ext.OPS)
    assert table["accept_greedy"] == "torch"  # an op the CPU extension lacks: forced cpu falls back


CHILD = r"""
import os, sys, torch
import kangaroo_rt._cpu as cpu
from kangaroo_rt import ops
x, w = torch.randn(3, 40), torch.randn(9, 40)
try:
    name = cpu.isa()
except ValueError as exc:
    try:
        ops.linear(x, w)
    except ValueError as exc2:
        print("error", exc2)
        sys.exit(0)
    sys.exit("ops.linear ignored the bad request")
assert torch.equal(cpu.linear(x, w), cpu.linear_with_isa(x, w, None, name))
assert torch.equal(ops.linear(x, w), cpu.linear(x, w))
print("isa", name)
"""


def _child(value):
    env = dict(os.environ, PYTHONPATH=ROOT, KANGAROO_RT_CPU_ISA=value)
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip()


def test_kangaroo_rt_cpu_isa_forces_a_lower_variant_or_is_an_error(cpu):
    best = cpu.supported_isas()[0]
    assert _child("") == f"isa {best}" and cpu.isa() in cpu.supported_isas()
    assert _child("portable") == "isa portable"
    out = _child("sse9")
    assert out.startswith("error") and "KANGAROO_RT_CPU_ISA=sse9 is not one of avx512_bf16, avx512, avx2, portable" in out
    missing = [isa for isa in ISAS if isa not in cpu.supported_isas()]
    if missing:
        out = _child(missing[0])
        assert out.startswith("error") and "this CPU cannot run" in out, out


def test_a_bf16_prefill_goes_to_torch_and_decode_rows_to_the_kernel(cpu):
    """ops.linear on bf16: more than 64 tokens on the second-to-last axis (a prefill) is torch's GEMM, fewer the
    kernel with its row-count invariant bits; fp32 is the kernel at every size."""
    from kangaroo_rt import reference

    w = torch.randn(40, 96, dtype=torch.bfloat16)
    limit = reference.INVARIANT_MAX_QUERIES
    for q, torch_serves in ((1, False), (limit, False), (limit + 1, True), (130, True)):
        x = torch.randn(2, q, 96, dtype=torch.bfloat16)
        got = ops.linear(x, w)
        want = F.linear(x, w) if torch_serves else cpu.linear(x, w)
        assert torch.equal(got, want), q
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)  # 21 rows in a call of 7 tokens each: the kernel
    assert torch.equal(ops.linear(x, w), cpu.linear(x, w))
    x32, w32 = torch.randn(130, 96), torch.randn(40, 96)
    assert torch.equal(ops.linear(x32, w32), cpu.linear(x32, w32))


_PREFETCH_CHILD = r"""
import hashlib, sys, torch
from kangaroo_rt import _cpu_ext
cpu = _cpu_ext.load()
try:
    target = cpu.prefetch_target()
except ValueError as exc:
    print("error", exc)
    sys.exit(0)
gen = torch.Generator().manual_seed(5)
digest = hashlib.sha256()
# the paths that prefetch: fp32 and bf16 rows in each block shape, the fp32 panels (7-8 rows at K = 1536), many
# rows, and the screened head (more than a few blocks of rows, so that the prefetch reaches ahead)
for dtype in (torch.float32, torch.bfloat16):
    for M, K, N in ((1, 576, 2304), (2, 576, 1152), (3, 1536, 576), (5, 576, 1536), (7, 1536, 576),
                    (8, 1536, 640), (8, 576, 1152), (17, 576, 640)):
        x, w = torch.randn(M, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype)
        digest.update(cpu.linear(x, w).float().numpy().tobytes())
    w = torch.randn(4096, 576, generator=gen).to(dtype)
    for M in (1, 3, 8):
        x = torch.randn(M, 576, generator=gen).to(dtype) * 3
        digest.update(cpu.screened_argmax(x, w, list(_cpu_ext.make_head_screen(w))).numpy().tobytes())
print(target, digest.hexdigest())
"""


def _prefetch_child(value):
    env = dict(os.environ, PYTHONPATH=ROOT, KANGAROO_RT_CPU_PREFETCH=value)
    res = subprocess.run([sys.executable, "-c", _PREFETCH_CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip().split()


def test_the_prefetch_target_changes_no_bits_and_a_bad_one_is_an_error(cpu):
    """KANGAROO_RT_CPU_PREFETCH=nta|l2 (kr_cpu_prefetch_target: where the weights' software prefetch goes) gives the
    same outputs both ways, and the CPU's default is one of them; any other value is a clear error."""
    default, nta, l2 = _prefetch_child(""), _prefetch_child("nta"), _prefetch_child("l2")
    assert nta[0] == "nta" and l2[0] == "l2" and default[0] in ("nta", "l2")
    assert nta[1] == l2[1] == default[1]
    out = " ".join(_prefetch_child("t0"))
    assert out.startswith("error") and "KANGAROO_RT_CPU_PREFETCH=t0 is not one of nta, l2" in out
