"""The CPU extension's decode-layer ops (csrc/cpu/{rms_norm,rope_cache_append,attention,silu_mul,decoder}.cpp through
kangaroo_rt._cpu_ext): accuracy against fp64 by the tolerance rule (rope: the reference's bits), bit-for-bit
independence of a query's or row's result from the rest of the call, from the thread count and from the ISA
variant, clear errors for refused inputs, and dispatch (what the kernels do not cover goes to torch)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kernel_checks import assert_tolerance_rule
from kangaroo_rt import _cpu_ext, ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(scope="module")
def cpu():
    if not _cpu_ext.is_built():
        pytest.skip("kangaroo_rt._cpu is not built (KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation -e .)")
    return _cpu_ext.load()


def _attention_case(b, hq, hkv, q_len, d, t_max, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(b + 1, hkv, t_max, d, generator=gen).to(dtype)
    vc = torch.randn(b + 1, hkv, t_max, d, generator=gen).to(dtype)
    q = torch.randn(b, q_len, hq, d, generator=gen).transpose(1, 2).to(dtype)  # strided, as the model passes it
    start = torch.randint(0, t_max - q_len + 1, (b,), generator=gen)
    start[0] = t_max - q_len
    positions = start[:, None] + torch.arange(q_len)[None]
    return q, kc, vc, positions


def _fp64_attention(q, kc, vc, positions, kv_len=None):
    return reference.attention_math(q.double(), kc.double(), vc.double(), positions, kv_len)


# (batch, q heads, kv heads, q_len, head_dim, slots): SmolLM2's 9/3 x 64, GQA 1/4/8, head dims not a multiple of
# 16, a single key, and the largest verify the kernel serves (64 queries).
ATTENTION_SHAPES = [(1, 9, 3, 1, 64, 600), (1, 9, 3, 7, 64, 600), (3, 8, 2, 5, 64, 40), (2, 8, 1, 3, 128, 40),
                    (2, 4, 4, 2, 24, 33), (1, 2, 1, 1, 8, 1), (2, 4, 1, 64, 32, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max", ATTENTION_SHAPES)
def test_attention_matches_fp64_by_the_tolerance_rule(cpu, dtype, b, hq, hkv, q_len, d, t_max):
    q, kc, vc, positions = _attention_case(b, hq, hkv, q_len, d, t_max, dtype)
    out = cpu.attention(q, kc, vc, positions, None)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_tolerance_rule(out, reference.attention(q, kc, vc, positions), _fp64_attention(q, kc, vc, positions))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_query_has_the_bits_it_has_alone(cpu, dtype):
    """A verify pass over k + 1 queries gives each query the bits of a single step at its position, whatever
    kv_len (beyond the slots it reads) and whatever the other rows of the batch."""
    q, kc, vc, positions = _attention_case(3, 9, 3, 6, 64, 80, dtype, seed=1)
    together = cpu.attention(q, kc, vc, positions, 80)
    for row in range(3):
        for i in range(6):
            p = int(positions[row, i])
            alone = cpu.attention(q[row:row + 1, :, i:i + 1], kc[row:row + 1], vc[row:row + 1],
                                  positions[row:row + 1, i:i + 1], p + 1)
            assert torch.equal(alone, together[row:row + 1, :, i:i + 1]), (row, i)


def test_attention_reads_only_visible_slots_and_masks_negative_positions(cpu):
    """Slots past a query's position or past kv_len are never read (NaN there changes nothing); a query at a
    negative position sees no key and gives 0, as torch's fused kernel does."""
    q, kc, vc, positions = _attention_case(2, 4, 2, 3, 32, 50, torch.float32, seed=2)
    positions[1] = torch.tensor([-1, 4, 5])
    kv_len = int(positions.max()) + 1
    ref = cpu.attention(q, kc, vc, positions, kv_len)
    torch.testing.assert_close(ref[:, :, 1:], reference.attention(q, kc, vc, positions, kv_len)[:, :, 1:])
    for row in range(2):
        kc[row, :, int(positions[row, -1]) + 1:] = float("nan")
        vc[row, :, int(positions[row, -1]) + 1:] = float("nan")
    out = cpu.attention(q, kc, vc, positions, kv_len)
    assert torch.equal(out, ref)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))


RMS_SHAPES = [(1, 576), (5, 7, 576), (3, 17), (2, 1000), (0, 64), (4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", RMS_SHAPES)
def test_rms_norm_and_add_rms_norm_match_fp64_by_the_tolerance_rule(cpu, dtype, shape):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    res = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    if x.numel() == 0:
        assert cpu.rms_norm(x, w, 1e-5).shape == shape and cpu.add_rms_norm(x, res, w, 1e-5)[1].shape == shape
        return
    exact = reference.rms_norm(x.double(), w.double(), 1e-5)
    assert_tolerance_rule(cpu.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), exact)
    new_res, normed = cpu.add_rms_norm(x, res, w, 1e-5)
    ref_res, ref_normed = reference.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(new_res, ref_res)  # one rounded add, as torch does it
    assert_tolerance_rule(normed, ref_normed, reference.rms_norm(new_res.double(), w.double(), 1e-5))


def test_rms_norm_rows_are_independent_and_strided_rows_work(cpu):
    x = torch.randn(9, 2, 300)[:, 0]  # (9, 300) rows with a stride of 600
    w = torch.randn(300)
    together = cpu.rms_norm(x, w, 1e-6)
    for i in range(9):
        assert torch.equal(cpu.rms_norm(x[i:i + 1].contiguous(), w, 1e-6), together[i:i + 1])


SILU_SHAPES = [(1, 1536), (5, 7, 96), (3, 17), (2, 1), (0, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_silu_mul_matches_fp64_by_the_tolerance_rule(cpu, dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    fused = (4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)).to(dtype)
    gate, up = fused.split(shape[-1], dim=-1)  # strided halves of one tensor, as the fused gate/up gives them
    out = cpu.silu_mul(gate, up)
    assert out.shape == shape and out.dtype == dtype
    if out.numel():
        exact = reference.silu_mul(gate.double(), up.double())
        assert_tolerance_rule(out, reference.silu_mul(gate, up), exact)


def test_silu_mul_over_the_whole_float_range(cpu):
    """exp's clamps: silu(x) -> x far right, -> -0 far left (exp(-x) overflows to inf), NaN stays NaN."""
    x = torch.tensor([-1e30, -200.0, -104.0, -88.8, -88.72283935546875, -88.71, -88.7, -87.5, -20.0, -1e-30, 0.0,
                      1e-30, 20.0, 87.5, 89.0, 1e30,
                      float("inf"), float("-inf"), float("nan")])
    out = cpu.silu_mul(x, torch.ones_like(x))
    ref = reference.silu_mul(x, torch.ones_like(x))
    exact = reference.silu_mul(x.double(), torch.ones_like(x).double())
    finite = x.isfinite()  # -88.8: exp(88.8) overflows fp32, so both give -0 where fp64 has -2.4e-37
    assert_tolerance_rule(out[finite], ref[finite], exact[finite])
    assert torch.equal(out[finite].signbit(), ref[finite].signbit())
    assert out[-3] == float("inf") and out[-1].isnan() and out[-2].isnan()  # -inf / (1 + inf): as torch, NaN
    assert torch.equal(out.isnan(), reference.silu_mul(x, torch.ones_like(x)).isnan())


def test_silu_mul_elements_do_not_depend_on_the_rest_of_the_call(cpu):
    g, u = torch.randn(6, 1000), torch.randn(6, 1000)
    together = cpu.silu_mul(g, u)
    for i in range(6):
        assert torch.equal(cpu.silu_mul(g[i, 3:517], u[i, 3:517]), together[i, 3:517])


ROPE_SHAPES = [(1, 9, 3, 1, 64, 16), (3, 8, 2, 7, 64, 32), (2, 4, 4, 3, 128, 8), (2, 2, 1, 5, 6, 12)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,hq,hkv,q_len,d,t_max", ROPE_SHAPES)
def test_rope_cache_append_gives_the_reference_bits(cpu, dtype, b, hq, hkv, q_len, d, t_max):
    gen = torch.Generator().manual_seed(b * 10 + q_len)
    q = torch.randn(b, q_len, hq, d, generator=gen).transpose(1, 2).to(dtype)
    k = torch.randn(b, q_len, hkv, d, generator=gen).transpose(1, 2).to(dtype)
    v = torch.randn(b, q_len, hkv, d, generator=gen).transpose(1, 2).to(dtype)
    positions = torch.randint(-2, t_max + 2, (b, q_len), generator=gen)  # some outside the cache: not written
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = reference.rope_cos_sin(positions.clamp(min=0), inv_freq, dtype)
    caches = [torch.randn(b + 1, hkv, t_max, d, generator=gen).to(dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    out = cpu.rope_cache_append(q, k, v, cos, sin, caches[0], caches[1], positions)
    ref = reference.rope_cache_append(q, k, v, cos, sin, ref_caches[0], ref_caches[1], positions)
    assert torch.equal(out, ref)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])


def _stack_model(dtype):
    """A random 3-layer stack (GQA, q/k/v biases, head size 24, I = 200), its fused weights and biases, and a cache of
    2 rows x 16 slots: (model, (weights, qkv biases, o biases, packed), k caches, v caches)."""
    from kangaroo_rt.model import Transformer
    from kangaroo_rt.testing import tiny_config

    model = Transformer.random(tiny_config(num_layers=3, model_type="qwen2", hidden_size=96, num_heads=4,
                                           num_kv_heads=2, intermediate_size=200), seed=1, dtype=dtype)
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        stack = model._build_stack(0, 3)[0]
    k_caches, v_caches = map(list, zip(*(cache.layer(i) for i in range(3))))
    return model, stack, k_caches, v_caches


def _stack_inputs(dtype=torch.float32):
    """_stack_model's stack and the arguments of a 5-token prefill: (weights, qkv biases, o biases, k caches,
    v caches, (hidden, positions, cos, sin))."""
    model, (weights, qkv_bias, o_bias, _), k_caches, v_caches = _stack_model(dtype)
    pos = torch.arange(5).expand(2, 5)
    h = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(7)).to(dtype)
    return list(weights), list(qkv_bias), list(o_bias), k_caches, v_caches, (h, pos, *model.rope(pos))


def _stack_case(dtype):
    """_stack_model's stack over a prefill of 5 tokens, then a step of 2 rows at different positions: its hidden
    states and caches (decoder.cpp)."""
    from kangaroo_rt import _cpu_ext

    model, stack, k_caches, v_caches = _stack_model(dtype)
    gen = torch.Generator().manual_seed(7)
    outs = []
    torch.set_grad_enabled(False)  # the stack serves no autograd
    for pos in (torch.arange(5).expand(2, 5), torch.tensor([[5], [3]])):
        h = torch.randn(2, pos.shape[1], 96, generator=gen).to(dtype)
        outs.append(_cpu_ext.decoder_layers(h, pos, *model.rope(pos), *stack[:3], k_caches, v_caches, 4, 2, 24, 1e-6,
                                            16, packed=stack[3]))
    return outs + k_caches + v_caches


_VARIANT_SCRIPT = r"""
import hashlib, json, sys, torch
sys.path.insert(0, "tests")
from test_cpu_ext import _attention_case, _stack_case
from test_draft_chain import _chain_case
from test_target_pass import _pass_case
from kangaroo_rt import _cpu_ext
cpu = _cpu_ext.load()
digest = {}
for dtype in (torch.float32, torch.bfloat16):
    q, kc, vc, pos = _attention_case(2, 9, 3, 5, 72, 300, dtype, seed=3)
    outs = [cpu.attention(q, kc, vc, pos, None), cpu.rms_norm(kc[0], vc[0, 0, 0], 1e-5)]
    outs += list(cpu.add_rms_norm(kc[1], vc[1], vc[0, 0, 0], 1e-5))
    for d, t_max in ((64, 77), (128, 45), (16, 3)):  # head sizes with an AVX-512 path of their own
        q, kc, vc, pos = _attention_case(2, 4, 2, 3, d, t_max, dtype, seed=d)
        outs.append(cpu.attention(q, kc, vc, pos, None))
    q, kc, vc, pos = _attention_case(1, 6, 2, 3, 64, 40, dtype, seed=9)
    q[0, 1, 0, 5] = float("nan")  # one query's scores all NaN; the other heads untouched
    kc[0, 1, 7, 3] = float("inf")  # one key's scores +-inf or NaN for the heads of kv head 1
    outs.append(cpu.attention(q, kc, vc, pos, None).isnan().float())
    gate_up = torch.randn(3, 2, 2 * 80, generator=torch.Generator().manual_seed(5)).to(dtype) * 4
    outs.append(cpu.silu_mul(gate_up[..., :80], gate_up[..., 80:]))
    edge = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 87.0, -87.0, 88.72, 88.73, 89.0, -89.0, 100.0, -100.0, 1e30, -1e30,
                         float("inf"), float("-inf"), float("nan"), 0.5, -0.5, 20.0, -20.0, 3e-39, 1.0, -1.0] * 2 + [7.0])
    outs.append(cpu.silu_mul(edge.to(dtype)[None], torch.linspace(-3, 3, 49).to(dtype)[None]))  # (every lane path)
    outs += _stack_case(dtype) + _chain_case(dtype) + _pass_case(dtype)
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(11)).to(dtype) * 6
    outs += list(cpu.greedy_with_confidence(logits)) + [cpu.argmax(logits)]
    for i, t in enumerate(outs):
        digest[f"{dtype}-{i}"] = hashlib.sha256(t.float().numpy().tobytes()).hexdigest()
print(json.dumps({"isa": cpu.isa(), "digest": digest}))
"""


def test_every_variant_and_thread_count_gives_the_same_bits(cpu):
    """The variant is fixed per process (KANGAROO_RT_CPU_ISA); each one, at 1 and 2 threads, computes the same
    bits, since the kernels' loops only fix the order of their adds, not the vector width."""
    results = {}
    for isa in cpu.supported_isas():
        for threads in ("1", "2"):
            env = dict(os.environ, KANGAROO_RT_CPU_ISA=isa, OMP_NUM_THREADS=threads)
            out = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            got = json.loads(out.stdout.strip().splitlines()[-1])
            assert got["isa"] == isa
            results[(isa, threads)] = got["digest"]
    first = next(iter(results.values()))
    assert all(d == first for d in results.values()), list(results)


def test_bad_inputs_get_a_clear_error_from_the_extension(cpu):
    q, kc, vc, positions = _attention_case(1, 4, 2, 2, 16, 20, torch.float32)
    with pytest.raises(TypeError, match="k_cache must be Float like the other inputs"):
        cpu.attention(q, kc.bfloat16(), vc, positions, None)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        cpu.attention(q[:, :3], kc, vc, positions, None)
    with pytest.raises(ValueError, match="kv_len must be in"):
        cpu.attention(q, kc, vc, positions, 21)
    with pytest.raises(TypeError, match="positions must be a CPU int64"):
        cpu.attention(q, kc, vc, positions.int(), None)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="x must be"):
        cpu.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        cpu.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        cpu.silu_mul(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(TypeError, match="up must be Float like the other inputs"):
        cpu.silu_mul(torch.randn(2, 8), torch.randn(2, 8).bfloat16())
    weights, qkv_bias, o_bias, k_caches, v_caches, args = _stack_inputs()
    with pytest.raises(ValueError, match=r"layer 1: the o weight must be a contiguous \(96, 96\)"):
        cpu.decoder_layers(*args[:4], weights[:8] + [weights[8].t()] + weights[9:], qkv_bias, o_bias, k_caches,
                           v_caches, 4, 2, 24, 1e-6, 16)
    with pytest.raises(ValueError, match="one shape and layout"):
        cpu.decoder_layers(*args[:4], weights, qkv_bias, o_bias, k_caches[:2] + [k_caches[2][:, :, :8]], v_caches,
                           4, 2, 24, 1e-6, 16)
    with pytest.raises(ValueError, match="kv_len must be in"):
        cpu.decoder_layers(*args[:4], weights, qkv_bias, o_bias, k_caches, v_caches, 4, 2, 24, 1e-6, 17)
    with pytest.raises(ValueError, match="both be given or both be None"):  # an attention-only layer has neither
        cpu.decoder_layers(*args[:4], weights[:10] + [None] + weights[11:], qkv_bias, o_bias, k_caches, v_caches,
                           4, 2, 24, 1e-6, 16)
    with pytest.raises(ValueError, match="only the MLP's weights may be None"):
        cpu.decoder_layers(*args[:4], [None] + weights[1:], qkv_bias, o_bias, k_caches, v_caches, 4, 2, 24, 1e-6, 16)
    with pytest.raises(ValueError, match="head size must be even"):
        cpu.rope_cache_append(torch.randn(1, 2, 1, 5), torch.randn(1, 1, 1, 5), torch.randn(1, 1, 1, 5),
                              torch.randn(1, 1, 5), torch.randn(1, 1, 5), torch.zeros(1, 1, 4, 5),
                              torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 4096, 49152 + 5])
def test_argmax_and_greedy_confidence_match_torch(cpu, dtype, n):
    """The first index of the largest value, as torch's argmax (ties, -inf, NaN), and its softmax probability
    within a few ulps of torch's, over rows of odd lengths, strided rows included."""
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(6, n, generator=gen) * 8).to(dtype)
    x[1] = x[1].round()  # many ties (in bf16 all the more)
    x[2] = float("-inf")  # every value -inf: index 0
    x[3, n // 2] = float("nan")
    x[3, n - 1] = float("nan")  # the first NaN wins
    x[4, :] = 0.0  # all equal: index 0, probability 1 / n
    x[5, n // 3] = float("inf")  # +inf: argmax there; softmax NaN throughout, so index 0 and NaN
    for rows in (x, x[::2], x.t().contiguous().t()):  # contiguous, every other row, a column-major view
        want = rows.float().argmax(dim=-1)
        assert torch.equal(cpu.argmax(rows), want)
        assert torch.equal(_cpu_ext.argmax(rows), want)
        token, conf = cpu.greedy_with_confidence(rows)
        ref_token, ref_conf = reference.greedy_with_confidence(rows)
        assert torch.equal(token, ref_token)  # (index 0 on the NaN and -inf rows, as torch's softmax + max)
        finite = ~ref_conf.isnan()
        assert torch.equal(conf.isnan(), ~finite)
        assert torch.allclose(conf[finite], ref_conf[finite], rtol=1e-5, atol=0)
    batched = x.reshape(2, 3, n)
    assert torch.equal(cpu.argmax(batched), x.float().argmax(-1).reshape(2, 3))


def test_argmax_refuses_what_it_cannot_serve(cpu):
    with pytest.raises(ValueError, match="logits must be"):
        cpu.argmax(torch.empty(3, 0))
    with pytest.raises(TypeError):
        cpu.argmax(torch.randn(3, 4, dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64)  # the wrapper sends it to torch
    assert torch.equal(_cpu_ext.argmax(x), x.argmax(-1))


def test_dispatch_serves_decode_ops_and_leaves_the_rest_to_torch(cpu, monkeypatch):
    monkeypatch.delenv("KANGAROO_RT_BACKEND", raising=False)
    table = ops.backend_table("cpu")
    for op in ("linear", "rms_norm", "add_rms_norm", "rope_cache_append", "attention", "silu_mul", "argmax",
               "greedy_with_confidence", "commit_tokens", "accept_greedy_commit"):
        assert table[op] == "cpu", (op, table)
    # prefill-sized attention (more queries than INVARIANT_MAX_QUERIES) and fp64 inputs go to the reference
    q, kc, vc, positions = _attention_case(1, 4, 2, reference.INVARIANT_MAX_QUERIES + 1, 16, 100, torch.float32)
    assert torch.equal(ops.attention(q, kc, vc, positions), reference.attention(q, kc, vc, positions))
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    assert torch.equal(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    q, kc, vc, positions = _attention_case(1, 4, 2, 3, 16, 20, torch.float32)
    assert torch.equal(ops.attention(q, kc, vc, positions), cpu.attention(q, kc, vc, positions, None))


def test_the_stack_keeps_the_last_write_when_a_row_repeats_a_position(cpu, monkeypatch):
    """Two tokens of a row at one position write one cache slot: the stack, like the per-op path, keeps the last."""
    from kangaroo_rt.model import Transformer
    from kangaroo_rt.testing import tiny_config

    model = Transformer.random(tiny_config(num_layers=2, hidden_size=96, num_heads=4, num_kv_heads=2), seed=2)
    pos = torch.tensor([[3, 3, 4], [6, 7, 7]])
    h = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(1))

    def run(per_op):
        if per_op:
            monkeypatch.setattr(Transformer, "_cpu_stack", lambda *a: None)
        cache = model.new_cache(2, 12)
        with torch.no_grad():
            out = model.forward_layers(h, pos, 0, 2, cache, kv_len=12)
        monkeypatch.undo()
        return [out] + [t for i in range(2) for t in cache.layer(i)]

    fast = run(per_op=False)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(fast, run(per_op=False)))
    assert all(torch.equal(a, b) for a, b in zip(fast, run(per_op=True)))


@torch.no_grad()
def test_packed_stacks_check_their_weights():
    """A bf16 stack's matrices come as packed copies (packed=True); other dtypes, or a matrix that is not the packed
    shape of its place, get a clear error, and the packed stack gives the row-major stack's bits."""
    from kangaroo_rt import _cpu_ext

    model, (weights, qkv_bias, o_bias, packed), k_caches, v_caches = _stack_model(torch.bfloat16)
    assert packed
    pos = torch.arange(5).expand(2, 5)
    h = torch.randn(2, 5, 96).bfloat16()
    cos, sin = model.rope(pos)
    args = (qkv_bias, o_bias, k_caches, v_caches, 4, 2, 24, 1e-6, 16)
    row_major = [w if i % 6 in (0, 3) else getattr(*_layer_matrix(model, i)) for i, w in enumerate(weights)]
    assert torch.equal(_cpu_ext.decoder_layers(h, pos, cos, sin, weights, *args, packed=True),
                       _cpu_ext.decoder_layers(h, pos, cos, sin, row_major, *args))
    with pytest.raises(ValueError, match="packed weights are bf16 only"):
        _cpu_ext.decoder_layers(h.float(), pos, cos.float(), sin.float(), weights, *args, packed=True)
    narrow = list(weights)
    narrow[2] = weights[2][:, :-2].contiguous()  # (the o weight) not (D, 2 ceil(Hq Dh / 2))
    with pytest.raises(ValueError, match="the o weight must be a contiguous"):
        _cpu_ext.decoder_layers(h, pos, cos, sin, narrow, *args, packed=True)


def _layer_matrix(model, i):
    """(the owner, the attribute name) of the row-major matrix at position i of a stack's weight list."""
    layer = model.layers[i // 6]
    return {1: (layer.self_attn.qkv, "weight"), 2: (layer.self_attn.o_proj, "weight"), 4: (layer.mlp.gate_up, "weight"),
            5: (layer.mlp.down_proj, "weight")}[i % 6]
