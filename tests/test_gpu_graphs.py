"""CUDA graphs and the CUDA extension on a GPU: graph == eager == plain greedy, every host-loop mode, the
extension's ops vs the reference, no memory growth over 1000 generate calls. Host time per graph launch is a
measurement, not a test: benchmarks/bench_graphs.py reports it against its 30 us target.

Run on a GPU machine (benchmarks/gpu_suite.sh builds the extension first): ``pytest -m gpu tests/test_gpu_graphs.py``.
"""
import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt import _ext, graphs, ops, reference
from checks import assert_same_tokens, check_graphs_match_eager_and_plain, ragged_prompts
from kangaroo_rt.testing import agreeing_pair, tiny_config

pytestmark = pytest.mark.gpu
EOS = 3


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = tiny_config(vocab_size=512, hidden_size=128, num_layers=6, num_heads=2, num_kv_heads=1,
                      intermediate_size=256, eos_token_id=EOS)
    target, adapter = agreeing_pair(cfg, 2)
    return K.KangarooModel(target.to("cuda"), adapter.to("cuda"), exit_layer=2)


def _ragged(batch, seed):
    return ragged_prompts(batch, 512, seed, length=11, low=EOS + 1, device="cuda")


@pytest.mark.parametrize("batch", range(1, 9))
def test_graph_equals_eager_equals_plain_greedy(model, batch):
    ids, mask = _ragged(batch, seed=batch)
    check_graphs_match_eager_and_plain(model, ids, mask, max_new_tokens=40)
    runner = model.graph_runner
    assert runner.captures > 0 and runner.last_mode is not None


def test_every_host_loop_mode_gives_the_same_tokens(model):
    ids, mask = _ragged(5, seed=21)
    kc = K.KangarooConfig(gamma=5, eta=0.3)
    kw = dict(attention_mask=mask, max_new_tokens=48, eos_token_id=[EOS, 9])
    plain = model.generate(ids, kangaroo=None, **kw)
    runner = model.graph_runner
    model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw)  # capture
    entry = runner.entry(8, kc, 2)
    modes = runner.available_modes(entry)
    print("host-loop modes available:", modes)
    assert {"sync", "blocks"} <= set(modes)
    if _ext.is_built():
        assert "ext_loop" in modes or not hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec")
    try:
        for mode in modes:
            runner.mode = mode
            out = model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw)
            assert runner.last_mode == mode
            assert_same_tokens(model.target, ids, mask, plain, out, mode)
    finally:
        runner.mode = "auto"
    for _ in range(2 * len(modes) + 1):  # auto: each mode timed, then the fastest kept
        out = model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw)
        assert_same_tokens(model.target, ids, mask, plain, out, f"auto ({runner.last_mode})")
    assert entry.chosen in modes


def test_no_memory_growth_over_1000_generate_calls(model):
    kc = K.KangarooConfig(gamma=3, eta=0.0)
    batches = [1, 2, 3, 5, 8]
    prompts = {b: _ragged(b, seed=100 + b) for b in batches}
    for b in batches:  # capture every bucket first
        model.generate(prompts[b][0], attention_mask=prompts[b][1], max_new_tokens=8, kangaroo=kc)
    torch.cuda.synchronize()
    runner = model.graph_runner
    captures, allocated, reserved = runner.captures, torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for i in range(1000):
        b = batches[i % len(batches)]
        model.generate(prompts[b][0], attention_mask=prompts[b][1], max_new_tokens=8, kangaroo=kc)
    torch.cuda.synchronize()
    assert runner.captures == captures, "graphs were captured again"
    assert torch.cuda.memory_allocated() - allocated <= 0, "allocated memory grew"
    assert torch.cuda.memory_reserved() - reserved <= 2 * 2**20, "reserved memory grew"  # one allocator segment


@pytest.fixture()
def ext():
    if not _ext.is_built():
        pytest.skip("kangaroo_rt._C is not built (KANGAROO_RT_BUILD_CUDA=1 python setup.py build_ext --inplace)")
    return _ext.load()


def test_extension_serves_the_cuda_ops(ext):
    table = ops.backend_table("cuda")
    assert {op for op, backend in table.items() if backend == "cuda"} == set(_ext.OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_norms_match_reference(ext, dtype):
    from kernel_checks import assert_tolerance_rule

    x = torch.randn(3, 5, 4096, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    exact = reference.rms_norm(x.double(), w.double(), 1e-6)
    assert_tolerance_rule(ext.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), exact)
    new_r, out = ext.add_rms_norm(x, r, w, 1e-6)
    ref_r, ref_out = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(new_r, ref_r)
    assert_tolerance_rule(out, ref_out, reference.rms_norm(ref_r.double(), w.double(), 1e-6))
    odd = torch.randn(7, 100, device="cuda", dtype=dtype)[:, ::2]  # non-unit column stride
    torch.testing.assert_close(ext.rms_norm(odd, w[:50], 1e-5), reference.rms_norm(odd, w[:50], 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extension_rope_cache_append_matches_reference(ext, dtype):
    b, hq, hkv, q_len, d, t = 3, 8, 2, 5, 128, 64
    q = torch.randn(b, q_len, hq, d, device="cuda", dtype=dtype).transpose(1, 2)  # strided as in the model
    k = torch.randn(b, q_len, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(b, q_len, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
    positions = torch.stack([torch.randperm(t, device="cuda")[:q_len] for _ in range(b)])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    cos, sin = reference.rope_cos_sin(positions, inv_freq, dtype)
    caches = [torch.zeros(b + 1, hkv, t, d, device="cuda", dtype=dtype) for _ in range(4)]
    q_out = ext.rope_cache_append(q, k, v, cos, sin, caches[0], caches[1], positions)
    q_ref = reference.rope_cache_append(q, k, v, cos, sin, caches[2], caches[3], positions)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}  # half: torch's default tolerances
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(caches[0], caches[2], **tol)
    assert torch.equal(caches[1], caches[3])  # values are copied, never rounded


def test_extension_accept_and_commit_match_reference(ext):
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        b, k = 1 + trial % 9, trial % 7
        target = torch.randint(0, 6, (b, k + 1), generator=gen)
        n_drafts = torch.randint(0, k + 1, (b,), generator=gen)
        noise = torch.randint(0, 6, (b, k), generator=gen)
        drafts = torch.where(torch.rand(b, k, generator=gen) < 0.7, target[:, :k], noise)
        drafts = torch.where(torch.arange(k)[None] < n_drafts[:, None], drafts, torch.full_like(drafts, -1))
        eos = torch.tensor([5]) if trial % 2 else None
        width = 20
        state = dict(out=torch.zeros(b, width, dtype=torch.long), n_gen=torch.randint(0, 10, (b,), generator=gen),
                     finished=torch.rand(b, generator=gen) < 0.2, pos=torch.randint(1, 30, (b,), generator=gen))
        ref = {n: t.clone() for n, t in state.items()}
        dev = {n: t.cuda() for n, t in state.items()}
        args = (drafts, n_drafts, target)
        got = ext.accept_greedy_commit(*(a.cuda() for a in args), dev["out"], dev["n_gen"], dev["finished"],
                                       dev["pos"], None if eos is None else eos.cuda())
        want = reference.accept_greedy_commit(*args, ref["out"], ref["n_gen"], ref["finished"], ref["pos"], eos)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), trial
        for n in state:
            a, r = dev[n].cpu(), ref[n]
            if n == "out":  # the reference parks invalid tokens in the trash column; the kernel never writes it
                a, r = a[:, :-1], r[:, :-1]
            assert torch.equal(a, r), (trial, n)
        acc, nxt = ext.accept_greedy(*(a.cuda() for a in args))
        ref_acc, ref_nxt = reference.accept_greedy(*args)
        assert torch.equal(acc.cpu(), ref_acc) and torch.equal(nxt.cpu(), ref_nxt)
        tokens, count = target, torch.randint(0, k + 3, (b,), generator=gen)
        st2 = {n: t.clone() for n, t in state.items()}
        dv2 = {n: t.cuda() for n, t in state.items()}
        c_got = ext.commit_tokens(dv2["out"], dv2["n_gen"], dv2["finished"], tokens.cuda(), count.cuda(),
                                  None if eos is None else eos.cuda())
        c_want = reference.commit_tokens(st2["out"], st2["n_gen"], st2["finished"], tokens, count, eos)
        assert torch.equal(c_got.cpu(), c_want)
        assert torch.equal(dv2["out"].cpu()[:, :-1], st2["out"][:, :-1])
        assert torch.equal(dv2["n_gen"].cpu(), st2["n_gen"])
        assert torch.equal(dv2["finished"].cpu(), st2["finished"])


def test_while_graph_runs_the_loop_on_the_device(ext, model):
    if not _ext.supports_while_graph():
        pytest.skip(f"conditional while nodes need CUDA >= 12.4 (runtime {ext.cuda_runtime_version()})")
    ids, mask = _ragged(3, seed=8)
    kc = K.KangarooConfig(gamma=4, eta=0.0)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=64, kangaroo=None, ignore_eos=True)
    runner = model.graph_runner
    runner.mode = "while_graph"
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=64, kangaroo=kc, ignore_eos=True)
    finally:
        runner.mode = "auto"
    assert runner.last_mode == "while_graph"
    assert_same_tokens(model.target, ids, mask, plain, out, "while_graph")
