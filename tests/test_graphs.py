"""The fixed-shape round path of kangaroo_rt.graphs on CPU: bucket/buffer logic, mode choice, and tokens
equal to plain greedy and to the eager Kangaroo loop (the code CUDA graphs capture, run eagerly), and an
op-by-op audit of each step for what capture forbids."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kangaroo_rt as K
from kangaroo_rt import graphs
from kangaroo_rt.graphs import GraphRunner, RoundBuffers, _Entry
from checks import assert_same_tokens, difference_report, next_token_margin, ragged_prompts
from kangaroo_rt.testing import agreeing_pair, tiny_config

EOS = 3


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(num_layers=4, eos_token_id=EOS)
    target, adapter = agreeing_pair(cfg, 2)
    return K.KangarooModel(target, adapter, exit_layer=2)


def _ragged(batch, vocab, seed):
    return ragged_prompts(batch, vocab, seed, low=EOS + 1)


def test_bucket_for():
    assert [graphs.bucket_for(b) for b in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert graphs.bucket_for(17) == 32 and graphs.bucket_for(33) == 48
    assert graphs.bucket_for(3, (2, 6)) == 6 and graphs.bucket_for(7, (2, 6)) == 12
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="batch"):
            graphs.bucket_for(bad)
    with pytest.raises(ValueError, match="buckets"):
        graphs.bucket_for(1, (4, 2))


def test_cache_capacity_and_eos_slots(model):
    """Caches are rounded up to the quantum (or the fixed max_len), and grow, never shrink, in either dimension."""
    d = K.KangarooModel(model.target, model.adapter, exit_layer=2).decoder
    d.ensure_caches(1, 1, graphs.LENGTH_QUANTUM)
    assert (d.cache.max_batch, d.cache.max_len) == (1, 256)
    d.ensure_caches(2, 257, graphs.LENGTH_QUANTUM)
    assert (d.cache.max_batch, d.cache.max_len) == (2, 512)
    d.ensure_caches(1, 3)
    assert (d.cache.max_batch, d.cache.max_len) == (d.adapter_cache.max_batch, d.adapter_cache.max_len) == (2, 512)
    fixed = K.KangarooModel(model.target, model.adapter, exit_layer=2, max_len=300).decoder
    fixed.ensure_caches(1, 100, graphs.LENGTH_QUANTUM)
    assert fixed.cache.max_len == 300
    with pytest.raises(ValueError, match="max_len=300"):
        fixed.ensure_caches(1, 301, graphs.LENGTH_QUANTUM)
    assert [graphs.eos_slots_for(n) for n in (0, 1, 2, 3, 5)] == [1, 1, 2, 4, 8]


def test_cuda_graphs_flag(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("KANGAROO_RT_CUDA_GRAPHS", raising=False)
    assert graphs.cuda_graphs_enabled(None, cuda) and not graphs.cuda_graphs_enabled(None, cpu)
    assert graphs.cuda_graphs_enabled(True, cpu) and not graphs.cuda_graphs_enabled(False, cuda)
    monkeypatch.setenv("KANGAROO_RT_CUDA_GRAPHS", "0")
    assert not graphs.cuda_graphs_enabled(None, cuda)
    monkeypatch.setenv("KANGAROO_RT_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="KANGAROO_RT_CUDA_GRAPHS"):
        graphs.cuda_graphs_enabled(None, cuda)
    with pytest.raises(ValueError, match="cuda_graphs"):
        graphs.cuda_graphs_enabled(1, cpu)


def test_round_buffers_rows_pad_the_rest_of_the_bucket():
    bufs = RoundBuffers.allocate(4, gamma=3, hidden=8, dtype=torch.float32, device=torch.device("cpu"),
                                 width=20, eos_slots=2)
    st = bufs.state
    assert st.out.shape == (4, 20) and bufs.chain.exits.shape == (4, 4, 8) and bufs.log.shape == (21, 4, 4)
    for t in (st.out, st.n_gen, st.token, st.max_new, bufs.rounds):
        t.fill_(5)  # what an earlier call left
    st.e_prev.fill_(1.0)
    st.finished.zero_()
    rows = bufs.rows(2, max_new=10, eta=0.5, eos=torch.tensor([3]))
    assert rows.batch == 2 and rows.out.data_ptr() == st.out.data_ptr()  # a view: prefill writes the buffers
    assert st.finished.tolist() == [True] * 4 and st.pos.tolist() == [1] * 4  # padding at 1: pos - 1 stays >= 0
    assert st.out.abs().sum() == st.n_gen.abs().sum() == st.max_new.abs().sum() == st.e_prev.abs().sum() == 0
    assert st.eos.tolist() == [3, -1] and int(bufs.rounds) == 0 and float(bufs.eta) == 0.5
    with pytest.raises(ValueError, match="bucket"):
        bufs.rows(5, max_new=4, eta=0.0, eos=None)
    with pytest.raises(ValueError, match="output buffer"):
        bufs.rows(2, max_new=19, eta=0.0, eos=None)
    with pytest.raises(ValueError, match="EOS ids"):
        bufs.rows(2, max_new=5, eta=0.0, eos=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="buffer sizes"):
        RoundBuffers.allocate(2, gamma=0, hidden=8, dtype=torch.float32, device=torch.device("cpu"),
                              width=20, eos_slots=1)


def test_auto_tries_each_mode_then_keeps_the_fastest():
    entry = _Entry(buffers=None)
    seconds = {"sync": 3.0, "blocks": 1.0, "ext_loop": 2.0}
    order = []
    for _ in range(6):
        mode = entry.next_mode(list(seconds))
        order.append(mode)
        entry.record(mode, seconds[mode] * 10, useful_rounds=10)
    assert sorted(order) == sorted(list(seconds) * 2)
    assert entry.next_mode(list(seconds)) == "blocks" and entry.chosen == "blocks"
    entry.disabled.add("blocks")
    assert entry.next_mode(list(seconds)) == "ext_loop"  # a mode that failed is never picked again
    entry.record("sync", 1.0, useful_rounds=0)  # a call with no round teaches nothing
    for _ in range(100):  # once chosen, calls add no samples: a server's timings do not grow
        entry.record(entry.next_mode(list(seconds)), 1.0, useful_rounds=5)
    assert {m: len(t) for m, t in entry.timings.items()} == {m: 2 for m in seconds}
    with pytest.raises(RuntimeError, match="no host-loop mode"):
        _Entry(buffers=None).next_mode([])
    entry = _Entry(buffers=None)  # a slow first call (a one-off set-up cost) does not rule a mode out
    for mode, first, then in (("sync", 2.0, 2.0), ("while_graph", 9.0, 1.0)):
        entry.record(mode, first, useful_rounds=1)
        entry.record(mode, then, useful_rounds=1)
    assert entry.next_mode(["sync", "while_graph"]) == "while_graph"


@pytest.mark.parametrize("batch,gamma,eta", [(1, 1, 0.0), (3, 4, 0.6), (5, 6, 0.0), (8, 3, 0.3)])
def test_fixed_shape_rounds_equal_plain_and_eager(model, batch, gamma, eta):
    ids, mask = _ragged(batch, model.config.vocab_size, seed=batch)
    kc = K.KangarooConfig(gamma=gamma, eta=eta)
    kw = dict(attention_mask=mask, max_new_tokens=18)
    plain = model.generate(ids, kangaroo=None, **kw)
    eager = model.generate(ids, kangaroo=kc, cuda_graphs=False, return_dict_in_generate=True, **kw)
    fixed = model.generate(ids, kangaroo=kc, cuda_graphs=True, return_dict_in_generate=True, **kw)
    assert torch.equal(eager.sequences, plain)
    assert torch.equal(fixed.sequences, plain)
    assert model.graph_runner.last_mode == "sync"  # the fixed-shape path ran
    assert fixed.stats.accepted_lengths == eager.stats.accepted_lengths
    assert fixed.stats.draft_lengths == eager.stats.draft_lengths
    assert fixed.stats.position_accepts == eager.stats.position_accepts
    assert fixed.stats.new_tokens == eager.stats.new_tokens
    assert max(fixed.mat) > 1.0  # drafts were accepted: the chain path was exercised


def test_difference_report_names_the_first_departure_and_its_margin(model):
    """The report the graph == plain checks print on a failure: the first differing token, and the target's
    top-2 margin there from a fresh forward pass (which must reproduce plain greedy, padding included)."""
    vocab, new = model.config.vocab_size, 6
    ids, mask = _ragged(3, vocab, seed=7)  # row 1 is left-padded
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, kangaroo=None)
    t = ids.shape[1]
    prefixes = {}
    for row in range(3):
        for i in range(new):
            prefixes[row, i] = torch.cat([ids[row][mask[row].bool()], plain[row, t:t + i]])
            token, margin, scale = next_token_margin(model.target, prefixes[row, i])
            assert token == plain[row, t + i].item() and 0 < margin <= 2 * scale, (row, i)
            if token == EOS:
                break
    bad = plain.clone()
    bad[2, t] = (bad[2, t] + 1) % vocab
    bad[1, t + 4:] = (bad[1, t + 4:] + 1) % vocab  # later differences are not reported
    report = difference_report(model.target, ids, mask, plain, bad)
    assert report.startswith(f"row 1, column {t + 4}: {plain[1, t + 4].item()} expected, {bad[1, t + 4].item()} got")
    _, margin, _ = next_token_margin(model.target, prefixes[1, 4])
    assert f"(new token 4); the target's top-2 logit margin there is {margin:.3g}" in report
    assert difference_report(model.target, ids, mask, plain, plain) == "no difference"
    assert_same_tokens(model.target, ids, mask, plain, plain.clone(), "equal")
    with pytest.raises(AssertionError) as failure:
        assert_same_tokens(model.target, ids, mask, plain, bad, "planted")
    assert str(failure.value) == "planted: " + report
    assert difference_report(model.target, ids, mask, plain, plain[:, :-1]).startswith("shapes differ")
    in_prompt = plain.clone()
    in_prompt[0, 2] += 1
    assert difference_report(model.target, ids, mask, plain, in_prompt).endswith("(inside the prompt)")


def _committed_cache(model, lengths, n_gen):
    """Every cache entry at a committed position (0 .. T + n_gen - 3 of each row), target and adapter."""
    d = model.decoder
    keep = []
    for r, (t, n) in enumerate(zip(lengths.tolist(), n_gen)):
        stop = t + n - 2
        for c in (d.cache, d.adapter_cache):
            keep += [c.k[:, r, :, :stop].clone(), c.v[:, r, :, :stop].clone()]
    return keep


def test_fixed_shape_rounds_write_the_eager_cache(model):
    """The masked extra draft steps never corrupt a committed cache slot, and the adapter's catch-up
    position is recomputed from the right exit state (drafts alone are too robust to show this)."""
    ids, mask = _ragged(4, model.config.vocab_size, seed=2)
    kc = K.KangarooConfig(gamma=4, eta=0.0)
    kw = dict(attention_mask=mask, max_new_tokens=20, kangaroo=kc, return_dict_in_generate=True)
    eager = model.generate(ids, cuda_graphs=False, **kw)
    ref = _committed_cache(model, mask.sum(1), eager.stats.new_tokens)
    fixed = model.generate(ids, cuda_graphs=True, **kw)
    assert fixed.stats.new_tokens == eager.stats.new_tokens
    got = _committed_cache(model, mask.sum(1), fixed.stats.new_tokens)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eos_budget_and_blocks_mode(model):
    """Rows that hit EOS early, per-call budgets down to one token, and the sync-free block schedule."""
    ids, mask = _ragged(4, model.config.vocab_size, seed=11)
    kc = K.KangarooConfig(gamma=3, eta=0.0)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, kangaroo=None, eos_token_id=[EOS, 17, 40])
    runner = model.graph_runner
    for mode in ("sync", "blocks"):
        runner.mode = mode
        try:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=24, kangaroo=kc, cuda_graphs=True,
                                 eos_token_id=[EOS, 17, 40])
        finally:
            runner.mode = "auto"
        assert torch.equal(out, plain), mode
        assert runner.last_mode == mode
    one = model.generate(ids, attention_mask=mask, max_new_tokens=1, kangaroo=kc, cuda_graphs=True)
    assert torch.equal(one, model.generate(ids, attention_mask=mask, max_new_tokens=1, kangaroo=None))


def test_buffers_are_reused_and_dropped_when_the_cache_moves(model):
    ids, mask = _ragged(3, model.config.vocab_size, seed=5)
    kc = K.KangarooConfig(gamma=2, eta=0.0)
    model.generate(ids, attention_mask=mask, max_new_tokens=6, kangaroo=kc, cuda_graphs=True)
    runner = model.graph_runner
    assert runner is model.graph_runner
    entry = runner.entry(4, kc, 1)
    model.generate(ids[:1], max_new_tokens=6, kangaroo=kc, cuda_graphs=True)
    model.generate(ids, attention_mask=mask, max_new_tokens=6, kangaroo=kc, cuda_graphs=True)
    assert runner.entry(4, kc, 1) is entry  # same bucket and settings: same static buffers
    for eta in (0.2, 0.9):  # eta lives in a device buffer: every value reuses the key's buffers (and graphs)
        other = K.KangarooConfig(gamma=2, eta=eta)
        kw = dict(attention_mask=mask, max_new_tokens=12, kangaroo=other, return_dict_in_generate=True)
        fixed = model.generate(ids, cuda_graphs=True, **kw)
        eager = model.generate(ids, cuda_graphs=False, **kw)
        assert runner.entry(4, other, 1) is entry
        assert torch.equal(fixed.sequences, eager.sequences) and fixed.stats.draft_lengths == eager.stats.draft_lengths
    assert model.decoder.cache.max_batch >= 4 and model.decoder.cache.max_len % graphs.LENGTH_QUANTUM == 0
    long_ids = torch.randint(EOS + 1, model.config.vocab_size, (2, 300))
    model.generate(long_ids, max_new_tokens=4, kangaroo=kc, cuda_graphs=True)  # the cache grows past 256
    assert runner.entry(4, kc, 1) is not entry
    assert runner.captures == 0  # nothing is captured off CUDA


# aten ops that read device memory on the host (a sync: illegal while a CUDA graph is being captured) or give
# data-dependent shapes, and the op behind torch.tensor(host data).
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_static",
                 "masked_select", "_unique2", "unique_dim", "unique_consecutive", "lift_fresh", "lift_fresh_copy"}


def _storage(t):
    return t.untyped_storage().data_ptr()


class CaptureAudit(TorchDispatchMode):
    """Records, per aten op, what would break a CUDA graph of the code it watches: host syncs, and tensor
    inputs that are neither in ``allowed`` (static buffers, weights, caches) nor made by an earlier op
    (a graph bakes such a tensor's address in; whoever owns it may free or replace it)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed = {_storage(t) for t in allowed}
        self.made = set()
        self.ops = 0
        self.problems = []

    def _note(self, kind, what):
        self.problems.append((kind, f"{kind}: {what}\n" + "".join(traceback.format_stack(limit=5)[:-2])))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func._schema.name.split("::")[-1] in HOST_SYNC_OPS:
            self._note("host sync", str(func))
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor) and _storage(a) not in self.allowed and _storage(a) not in self.made:
                self._note("foreign input", f"{tuple(a.shape)} {a.dtype} of {func}")
        out = func(*args, **kwargs)
        self.made.update(_storage(o) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
        return out


def _static_tensors(model, buffers):
    d = model.decoder
    tensors = buffers.tensors()
    for module in (model.target, model.adapter):
        tensors += list(module.parameters()) + list(module.buffers())
    for cache in (d.cache, d.adapter_cache):
        tensors += [cache.k, cache.v]
    return tensors


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_round_steps_are_capturable(model, model_type):
    """What CUDA graph capture needs of every step, checked op by op on CPU: no host sync, no data-dependent
    shape, and only static buffers, weights, caches and the step's own intermediates as inputs (also for
    qkv biases and a tied head)."""
    if model_type != "llama":
        cfg = tiny_config(num_layers=4, eos_token_id=EOS, model_type=model_type, tie_word_embeddings=True)
        model = K.KangarooModel(*agreeing_pair(cfg, 2), exit_layer=2)
    ids, mask = _ragged(3, model.config.vocab_size, seed=4)
    kc = K.KangarooConfig(gamma=4, eta=0.6)
    model.generate(ids, attention_mask=mask, max_new_tokens=10, kangaroo=kc, cuda_graphs=True,
                   eos_token_id=[EOS, 17])
    runner = model.graph_runner
    entry = runner.entry(4, kc, graphs.eos_slots_for(2))
    allowed = _static_tensors(model, entry.buffers)
    for name, step in dict(runner._steps(kc.gamma)).items():
        audit = CaptureAudit(allowed)
        with audit:
            step(entry.buffers, kc)
        assert audit.ops > 50, name  # the audit saw the step's ops
        assert not audit.problems, f"step {name!r}:\n" + "\n".join(text for _, text in audit.problems[:3])
    # The audit flags what it should: a sync, a tensor from host data, a tensor kept outside the buffers.
    outside = torch.ones(4)
    audit = CaptureAudit(allowed)
    with audit:
        bool(entry.buffers.state.finished.all())
        entry.buffers.chain.conf.add_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        entry.buffers.chain.conf.mul_(outside)
    kinds = [kind for kind, _ in audit.problems]  # torch.tensor: lift_fresh of a tensor made outside aten
    assert kinds == ["host sync", "host sync", "foreign input", "foreign input"], audit.problems


def test_runner_bad_input(model):
    with pytest.raises(ValueError, match="adapter"):
        GraphRunner(K.KangarooModel(model.target, None).decoder)
    with pytest.raises(ValueError, match="mode"):
        GraphRunner(model.decoder, mode="fast")
    runner = GraphRunner(model.decoder)
    ids = torch.randint(0, 50, (1, 4))
    with pytest.raises(ValueError, match="gamma"):
        runner.decode(ids, torch.tensor([4]), 4, K.KangarooConfig(gamma=0), None)
    with pytest.raises(ValueError, match="cuda_graphs"):
        model.generate(ids, max_new_tokens=2, cuda_graphs="yes")
