"""What a GPU will run, at the shapes it will run: head_dim 128, GQA groups 4 and 8, bf16/fp16, contexts of
512+ positions inside CUDA graphs, a 32k vocabulary; the Triton backend end to end; graph capture checked per
key; order independence; while_graph with rows that finish on EOS; adapter training steps on CUDA.

Kept to about a minute on one GPU, inside benchmarks/gpu_suite.sh's pytest step: ``pytest -m gpu
tests/test_gpu_realistic.py``.
"""
import contextlib
import math
import os
import sys

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt import _ext, graphs, ops, reference
from kangaroo_rt.testing import agreeing_pair, tiny_config

try:  # tests/checks.py from issue 18's refactor on; kangaroo_rt.testing before it
    from checks import assert_same_tokens, next_token_margin
except ImportError:
    from kangaroo_rt.testing import assert_same_tokens, next_token_margin

pytestmark = pytest.mark.gpu
EOS = 3
VOCAB = 32000
# (query heads, kv heads): GQA groups 4 and 8, head_dim 128 (hidden = heads * 128).
GQA = [(8, 2), (16, 2)]


def _runner(model):
    """The model's graph runner (``model.graph_runner``; ``graphs.runner_for`` before issue 18's refactor)."""
    if hasattr(type(model), "graph_runner"):
        return model.graph_runner
    return graphs.runner_for(model)


def _model(heads, kv_heads, dtype=torch.float32, layers=4, seed=0):
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=heads * 128, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv_heads, intermediate_size=2 * heads * 128, eos_token_id=EOS,
                      max_position_embeddings=4096)
    target, adapter = agreeing_pair(cfg, 2, seed=seed)
    return K.KangarooModel(target.to("cuda", dtype), adapter.to("cuda", dtype), exit_layer=2)


def _prompts(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(EOS + 1, VOCAB, (batch, length), generator=gen).cuda()


@contextlib.contextmanager
def _backend(name):
    ops.set_backend(name)
    ops._RESOLVED.clear()
    try:
        yield
    finally:
        ops.set_backend(None)
        ops._RESOLVED.clear()


@pytest.fixture(autouse=True)
def _exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_long_context_in_graphs_equals_eager_equals_plain_fp32(heads, kv_heads):
    """fp32 at LLM head geometry: prompts of 520 tokens, so graphs read a cache of 768+ slots with split-K."""
    model = _model(heads, kv_heads)
    ids = _prompts(3, 520, seed=heads)
    kc = K.KangarooConfig(gamma=4, eta=0.0)
    plain = model.generate(ids, max_new_tokens=24, kangaroo=None, ignore_eos=True)
    eager = model.generate(ids, max_new_tokens=24, kangaroo=kc, cuda_graphs=False, ignore_eos=True)
    graph = model.generate(ids, max_new_tokens=24, kangaroo=kc, cuda_graphs=True, ignore_eos=True)
    assert _runner(model).captures > 0
    mask = torch.ones_like(ids)
    assert_same_tokens(model.target, ids, mask, plain, eager, "eager vs plain")
    assert_same_tokens(model.target, ids, mask, eager, graph, "graph vs eager")


def _differ_only_at_a_near_tie(model, ids, want, got, ulps=8):
    """True when got equals want, or departs first where the target's top-2 margin is within ``ulps``
    round-offs of its largest logit (paths of different shapes may round a near-tie either way)."""
    diff = (want != got).nonzero()
    if diff.numel() == 0:
        return True
    row, col = diff[0].tolist()
    _, margin, scale = next_token_margin(model.target, want[row, :col])
    print(f"first difference at row {row}, column {col}: margin {margin:.3g}, largest logit {scale:.3g}")
    return margin <= ulps * torch.finfo(model.dtype).eps * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_half_precision_long_context_graph_equals_eager(dtype, heads, kv_heads):
    """Half precision: the graph path (attention over the whole cache) and the eager path (over the live
    length) split keys at the same positions, so the same rounds give the same tokens."""
    model = _model(heads, kv_heads, dtype)
    ids = _prompts(2, 600, seed=7)
    kc = K.KangarooConfig(gamma=4, eta=0.0)
    eager = model.generate(ids, max_new_tokens=16, kangaroo=kc, cuda_graphs=False, ignore_eos=True)
    graph = model.generate(ids, max_new_tokens=16, kangaroo=kc, cuda_graphs=True, ignore_eos=True)
    assert graph.shape == (2, 616) and bool((graph >= 0).all()) and bool((graph < VOCAB).all())
    assert _runner(model).captures > 0
    assert _differ_only_at_a_near_tie(model, ids, eager, graph)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_k_attention_gives_the_same_bits_over_capacity_and_live_length(dtype):
    attn = ops.load_kernel_module("attention")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for hq, hkv, q_len in ((32, 8, 1), (32, 4, 5), (32, 8, 7)):
        q = torch.randn(4, hq, q_len, 128, device="cuda", dtype=dtype, generator=gen)
        kc = torch.randn(4, hkv, 2048, 128, device="cuda", dtype=dtype, generator=gen)
        vc = torch.randn(4, hkv, 2048, 128, device="cuda", dtype=dtype, generator=gen)
        positions = torch.tensor([[700], [513], [1500], [9]], device="cuda") + torch.arange(q_len, device="cuda")
        live = int(positions.max()) + 1
        whole = attn.attention(q, kc, vc, positions)
        assert torch.equal(attn.attention(q, kc, vc, positions, live), whole)
        exact = reference.attention(q.double(), kc.double(), vc.double(), positions)
        assert (whole.double() - exact).abs().max() < 1e-2


def test_triton_backend_end_to_end():
    """KANGAROO_RT_BACKEND=triton: every kernel op on Triton (accept/commit included), eager and graphs."""
    model = _model(8, 2)
    ids = _prompts(3, 40, seed=3)
    kc = K.KangarooConfig(gamma=4, eta=0.2)
    with _backend("triton"):
        table = ops.backend_table("cuda")
        assert {op for op, b in table.items() if b == "triton"} == set(ops.TRITON_KERNELS), table
        plain = model.generate(ids, max_new_tokens=32, kangaroo=None, eos_token_id=[EOS, 9])
        for cuda_graphs in (False, True):
            out = model.generate(ids, max_new_tokens=32, kangaroo=kc, cuda_graphs=cuda_graphs,
                                 eos_token_id=[EOS, 9])
            assert_same_tokens(model.target, ids, torch.ones_like(ids), plain, out, f"cuda_graphs={cuda_graphs}")
        assert ops.backend_table("cuda") == table  # no kernel fell back at run time


def test_every_key_is_captured_and_replayed(monkeypatch):
    """Per key (bucket, gamma): the first call captures one graph per step, the next captures nothing,
    replays them, and runs no step eagerly."""
    model = _model(8, 2, layers=3)
    runner = _runner(model)
    runner.mode = "sync"
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(g), real_replay(g))[1])
    for batch, gamma in ((1, 3), (3, 3), (1, 5), (6, 2)):
        kc = K.KangarooConfig(gamma=gamma, eta=0.0)
        ids = _prompts(batch, 30, seed=batch * 10 + gamma)
        before = runner.captures
        model.generate(ids, max_new_tokens=20, kangaroo=kc, ignore_eos=True)
        steps = len(dict(runner._steps(gamma)))
        assert runner.captures - before == steps, (batch, gamma)
        eager = []
        real_verify = runner._verify
        monkeypatch.setattr(runner, "_verify", lambda *a: (eager.append(1), real_verify(*a))[1])
        replays.clear()
        model.generate(ids, max_new_tokens=20, kangaroo=kc, ignore_eos=True)
        monkeypatch.setattr(runner, "_verify", real_verify)
        assert runner.captures - before == steps, f"key ({batch}, {gamma}) was captured again"
        assert replays and not eager, (batch, gamma, len(replays), len(eager))


def test_outputs_do_not_depend_on_the_order_of_calls():
    """Graphs captured for one key, caches grown by another: a fresh model given the calls in another order
    gives every call the same tokens."""
    calls = [(1, 20, 3), (4, 300, 4), (2, 60, 3), (4, 30, 2)]  # (batch, prompt length, gamma)
    prompts = {c: _prompts(c[0], c[1], seed=sum(c)) for c in calls}

    def run(order):
        model = _model(8, 2, layers=3)
        return {c: model.generate(prompts[c], max_new_tokens=24, kangaroo=K.KangarooConfig(gamma=c[2]),
                                  eos_token_id=[EOS, 11]) for c in order}

    first, second = run(calls), run(calls[::-1])
    for c in calls:
        assert torch.equal(first[c], second[c]), c  # same model, same shapes per call: bit-identical


def test_while_graph_with_rows_finishing_on_eos():
    if not _ext.is_built() or not _ext.supports_while_graph():
        pytest.skip("while_graph needs kangaroo_rt._C built against CUDA >= 12.4")
    model = _model(8, 2, layers=3)
    ids = _prompts(4, 12, seed=5)
    free = model.generate(ids, max_new_tokens=48, kangaroo=None, ignore_eos=True)
    stops = [int(free[0, 12 + 5]), int(free[2, 12 + 20])]  # row 0 stops early, row 2 later, the others run on
    plain = model.generate(ids, max_new_tokens=48, kangaroo=None, eos_token_id=stops)
    runner = _runner(model)
    runner.mode = "while_graph"
    try:
        out = model.generate(ids, max_new_tokens=48, kangaroo=K.KangarooConfig(gamma=4), eos_token_id=stops)
    finally:
        runner.mode = "auto"
    assert runner.last_mode == "while_graph"
    assert_same_tokens(model.target, ids, torch.ones_like(ids), plain, out, "while_graph")


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("backend", [None, "triton"])
def test_adapter_training_step_on_cuda(amp, backend):
    """fp32 adapter weights against a half target (the CLI's default), with and without --amp, on the
    automatic backend and with every op forced to Triton: the loss backpropagates and evaluate decodes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_fixtures import make_problem
    from kangaroo_rt.train.trainer import TrainConfig, Trainer

    target, adapter, source, held = make_problem(n_train=16, n_held=1)
    target.to("cuda", torch.float16)
    adapter.to("cuda")
    cfg = TrainConfig(steps=2, micro_batch=8, lr=1e-2, warmup_steps=1, amp=amp, progress=False)
    with _backend(backend) if backend else contextlib.nullcontext():
        trainer = Trainer(target, adapter, 2, source, cfg, eval_prompts=[held[0].input_ids[:4]])
        before = adapter.norm.weight.detach().clone()
        m = trainer.train_step()
        assert m["tokens"] > 0 and math.isfinite(m["loss"])
        assert not torch.equal(adapter.norm.weight, before)
        assert adapter.dtype == torch.float32
        assert trainer.evaluate()["eval_mat"] >= 1.0


def test_extension_checks_row_lengths():
    if not _ext.is_built():
        pytest.skip("kangaroo_rt._C is not built")
    ext = _ext.load()
    drafts = torch.zeros(3, 4, dtype=torch.long, device="cuda")
    target = torch.zeros(3, 5, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="n_drafts must be"):
        ext.accept_greedy(drafts, torch.zeros(2, dtype=torch.long, device="cuda"), target)
    out, n_gen = torch.zeros(3, 16, dtype=torch.long, device="cuda"), torch.zeros(3, dtype=torch.long, device="cuda")
    finished = torch.zeros(3, dtype=torch.bool, device="cuda")
    with pytest.raises(RuntimeError, match="count must be"):
        ext.commit_tokens(out, n_gen, finished, target, torch.ones(1, dtype=torch.long, device="cuda"), None)
