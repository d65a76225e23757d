"""The CUDA host-loop code of kangaroo_rt.graphs on CPU, over an emulation of CUDA graphs.

Capture records every aten op the steps run (in round order), with their tensor arguments, and then puts
the state back as it was (a real capture runs nothing). Replay re-runs the recorded ops on the same
tensors and writes each result into the tensor the capture produced, so memory addresses stay fixed and
no Python code of the step runs again. A value that capture baked in from Python therefore stays
frozen, exactly as on a GPU. The extension's loops are emulated by their C semantics: ``replay_rounds``
launches the executables in order, and ``WhileGraph`` repeats its bodies while some row is unfinished
and the bound allows.

This runs the code lines that otherwise execute only on a GPU: capture, graph replay, the ``blocks``,
``ext_loop`` and ``while_graph`` loops, ``auto``, and the fallback when a mode fails.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kangaroo_rt as K
from kangaroo_rt import _ext, graphs, reference, speculative
from kangaroo_rt.graphs import GraphRunner
from kangaroo_rt.speculative import Decoder
from checks import check_graphs_match_eager_and_plain, ragged_prompts
from kangaroo_rt.testing import agreeing_pair, tiny_config

EOS = 3


class _Recorder(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: the ops recorded at capture, re-run by replay()."""

    handles = {}  # raw handle (an int, as torch gives) -> graph

    def __init__(self, *args, **kwargs):
        self.ops = []
        self.replays = 0
        FakeGraph.handles[id(self)] = self

    def instantiate(self):
        pass

    @torch.no_grad()  # a graph replays kernels: no autograd
    def replay(self):
        self.replays += 1
        for func, args, kwargs, captured in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_flatten(captured)[0], tree_flatten(fresh)[0]):
                if isinstance(old, torch.Tensor) and old is not new:
                    old.copy_(new)

    def raw_cuda_graph(self):
        return id(self)

    def raw_cuda_graph_exec(self):
        return id(self)


class FakeExtension:
    """kangaroo_rt._C's loops, by their C semantics (csrc/graph_loop.cu)."""

    def __init__(self):
        self.calls = []

    def replay_rounds(self, execs, rounds):
        self.calls.append(("replay_rounds", len(execs), rounds))
        for _ in range(rounds):
            for handle in execs:
                FakeGraph.handles[handle].replay()

    def WhileGraph(self, bodies, finished, iters, max_iters):  # noqa: N802 (the extension's class name)
        ext = self

        class _While:
            def launch(self):
                ext.calls.append(("while_graph", len(bodies), max_iters))
                it = int(iters)
                while not bool(finished.all()) and it < max_iters:
                    for handle in bodies:
                        FakeGraph.handles[handle].replay()
                    it += 1
                    iters.fill_(it)

        return _While()


@pytest.fixture()
def emulated(monkeypatch):
    """CPU tensors count as captured; torch.cuda's graph, stream and sync calls are the emulation's."""
    state = {"tensors": lambda: []}
    ext = FakeExtension()

    @contextlib.contextmanager
    def graph(g, pool=None):
        with _Recorder(g.ops):
            yield

    capture = GraphRunner._capture

    def capture_undone(self, entry, kcfg):
        """Record the steps in round order (each on the state the previous one left, so indices are in
        range as in a real round), then undo it all: a real capture runs nothing."""
        saved = [(t, t.clone()) for t in state["tensors"]()]
        capture(self, entry, kcfg)
        for t, copy in saved:
            t.copy_(copy)

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(graphs, "_captures", lambda device: True)
    # The CPU-only paths a CUDA graph never takes stay out of its emulation: the CPU extension's linear (not a
    # dispatcher op, so the recorder could not replay it; torch serves, as every op did on CPU before it) and
    # attention one query at a time, which reads host values (kangaroo_rt.reference).
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "torch")
    monkeypatch.setattr(reference, "INVARIANT_MAX_QUERIES", 1)
    monkeypatch.setattr(graphs, "_new_cuda_graph", FakeGraph)
    monkeypatch.setattr(GraphRunner, "_capture", capture_undone)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(_ext, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "supports_while_graph", lambda: True)
    monkeypatch.setattr(_ext, "load", lambda: ext)
    state["ext"] = ext
    return state


def _state_tensors(model):
    """Everything a capture could change: every key's static buffers and both caches."""
    d = model.decoder
    runner = model.graph_runner
    tensors = [d.cache.k, d.cache.v, d.adapter_cache.k, d.adapter_cache.v]
    for entry in runner._entries.values():
        tensors += entry.buffers.tensors()
    return tensors


@pytest.fixture()
def model():
    cfg = tiny_config(num_layers=4, eos_token_id=EOS)
    target, adapter = agreeing_pair(cfg, 2)
    return K.KangarooModel(target, adapter, exit_layer=2)


def test_every_host_loop_mode_over_emulated_graphs(model, emulated):
    emulated["tensors"] = lambda: _state_tensors(model)
    ids, mask = ragged_prompts(3, model.config.vocab_size, seed=7, low=EOS + 1)
    kc = K.KangarooConfig(gamma=4, eta=0.3)
    kw = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[EOS, 11])
    plain = model.generate(ids, kangaroo=None, **kw)
    eager = model.generate(ids, kangaroo=kc, cuda_graphs=False, return_dict_in_generate=True, **kw)
    runner = model.graph_runner
    for mode in graphs.MODES:
        runner.mode = mode
        try:
            out = model.generate(ids, kangaroo=kc, cuda_graphs=True, return_dict_in_generate=True, **kw)
        finally:
            runner.mode = "auto"
        assert runner.last_mode == mode
        assert torch.equal(out.sequences, plain), mode
        assert out.stats.accepted_lengths == eager.stats.accepted_lengths, mode
    assert runner.captures == 4  # first, mid, last, verify: once, then replayed by every mode
    entry = runner.entry(4, kc, graphs.eos_slots_for(2))
    assert entry.graphs["mid"].replays > entry.graphs["verify"].replays > 0
    kinds = {call[0] for call in emulated["ext"].calls}
    assert kinds == {"replay_rounds", "while_graph"}
    for _ in range(2 * len(graphs.MODES) + 1):  # auto: every mode on trial, then the fastest kept
        assert torch.equal(model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw), plain)
    assert entry.chosen in graphs.MODES and runner.captures == 4


def test_a_failing_mode_falls_back_to_sync_and_is_not_tried_again(model, emulated):
    emulated["tensors"] = lambda: _state_tensors(model)
    ids, mask = ragged_prompts(2, model.config.vocab_size, seed=3, low=EOS + 1)
    kc = K.KangarooConfig(gamma=3, eta=0.0)
    kw = dict(attention_mask=mask, max_new_tokens=12)
    plain = model.generate(ids, kangaroo=None, **kw)

    def broken(execs, rounds):
        raise RuntimeError("cudaGraphLaunch failed (emulated)")

    emulated["ext"].replay_rounds = broken
    runner = model.graph_runner
    runner.mode = "ext_loop"
    try:
        with pytest.warns(RuntimeWarning, match="'ext_loop' failed"):
            out = model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw)
        assert torch.equal(out, plain) and runner.last_mode == "sync"
        entry = runner.entry(2, kc, 1)
        assert "ext_loop" in entry.disabled and "ext_loop" not in runner.available_modes(entry)
    finally:
        runner.mode = "auto"


def test_the_emulation_catches_a_value_baked_in_at_capture(model, emulated, monkeypatch):
    """A middle step that takes its index from a Python counter works eagerly and breaks once captured:
    the capture freezes the counter's value, as a real CUDA graph would."""
    emulated["tensors"] = lambda: _state_tensors(model)
    ids, mask = ragged_prompts(2, model.config.vocab_size, seed=5, low=EOS + 1)
    kc = K.KangarooConfig(gamma=4, eta=0.0)
    kw = dict(attention_mask=mask, max_new_tokens=16)
    plain = model.generate(ids, kangaroo=None, **kw)
    honest = GraphRunner._draft_mid
    calls = [0]

    def python_counter_mid(self, st, kcfg):
        calls[0] = calls[0] % (kcfg.gamma - 1) + 1
        st.step.fill_(calls[0])  # a Python value: a graph keeps the one it saw at capture
        honest(self, st, kcfg)

    monkeypatch.setattr(GraphRunner, "_draft_mid", python_counter_mid)
    runner = model.graph_runner
    runner.mode = "sync"
    try:
        with monkeypatch.context() as m:  # eager fixed-shape rounds: the counter stays in step
            m.setattr(graphs, "_captures", lambda device: False)
            assert torch.equal(model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw), plain)
        calls[0] = 0
        captured = model.generate(ids, kangaroo=kc, cuda_graphs=True, **kw)
    finally:
        runner.mode = "auto"
    assert runner.captures == 4
    assert not torch.equal(captured, plain)
    # the shared graph == eager == plain check fails on it and says where, with the target's margin there
    with pytest.raises(AssertionError, match=r"graph Kangaroo != plain greedy \(gamma=4, eta=0.0\): row \d+, "
                                             r"column \d+: .* top-2 logit margin there is"):
        check_graphs_match_eager_and_plain(model, ids, mask, max_new_tokens=16, settings=((4, 0.0),))


def test_bench_graphs_graph_rows_over_emulated_graphs(model, emulated):
    """bench_graphs' per-step rows on the graph path (the columns a GPU run fills), on CPU clocks."""
    from bench_loader import load_benchmark

    emulated["tensors"] = lambda: _state_tensors(model)
    bench = load_benchmark("bench_graphs")
    row = bench._steps(model, 2, K.KangarooConfig(gamma=3, eta=0.0), prompt=6, cuda=False, reps=2)
    for key in ("draft_step_graph_ms", "verify_step_graph_ms", "draft_step_speedup", "verify_step_speedup",
                "host_us_per_step_graph", "host_us_per_step_eager"):
        assert row[key] > 0, key
    entry = model.graph_runner.entry(2, K.KangarooConfig(gamma=3, eta=0.0), 1)
    assert entry.graphs["mid"].replays > 0 and entry.graphs["verify"].replays > 0


@pytest.mark.parametrize("batch", range(1, 9))
def test_emulated_graphs_equal_eager_and_plain_for_batch_1_to_8(model, emulated, batch):
    """tests/test_gpu_graphs.py's first check, over the emulation: buckets 1, 2, 4, 8 with padding rows."""
    emulated["tensors"] = lambda: _state_tensors(model)
    ids, mask = ragged_prompts(batch, model.config.vocab_size, seed=batch, low=EOS + 1)
    check_graphs_match_eager_and_plain(model, ids, mask, max_new_tokens=16)
    assert model.graph_runner.captures == 3 + 4 + 4  # per gamma: first, mid (gamma > 1), last, verify


def test_a_larger_request_reallocates_the_caches_once_and_they_never_shrink(model, emulated, monkeypatch):
    """Issue 19.4: a request that needs a larger bucket or a longer cache reallocates once, to the bucket's rows and
    the rounded length, never fewer rows or positions than before; after the largest request nothing moves, and
    each bucket is captured once more at most."""
    emulated["tensors"] = lambda: _state_tensors(model)
    allocations = []
    new_cache = model.target.new_cache
    monkeypatch.setattr(model.target, "new_cache", lambda rows, length: allocations.append((rows, length))
                        or new_cache(rows, length))
    vocab = model.config.vocab_size
    kc = K.KangarooConfig(gamma=3, eta=0.0)
    one, three = (ragged_prompts(b, vocab, seed=b, low=EOS + 1) for b in (1, 3))
    long = ragged_prompts(1, vocab, seed=9, length=260, low=EOS + 1)  # needs more than 256 positions

    def run(prompts):
        model.generate(prompts[0], attention_mask=prompts[1], max_new_tokens=8, kangaroo=kc, cuda_graphs=True)

    run(one)
    assert allocations == [(1, 256)]  # not (1, 21) first
    run(three)
    assert allocations[1:] == [(4, 256)]  # the bucket's rows, at once
    run(long)
    assert allocations[2:] == [(4, 512)]  # longer, and still 4 rows
    runner = model.graph_runner
    captures = runner.captures
    for _ in range(2):
        for prompts in (one, three, long):
            run(prompts)
    assert len(allocations) == 3
    assert runner.captures == captures + 4  # bucket 4 once more (the caches moved under it), then nothing


def test_auto_does_not_charge_the_prefill_to_the_first_mode_timed(model, emulated, monkeypatch):
    """Issue 19.10: auto's per-mode timings start on an idle device. On a clock that only the emulated device
    moves, the device still works on the prefill for a second when the host returns and a synchronize waits
    for it: no mode's timing may include that second."""
    emulated["tensors"] = lambda: _state_tensors(model)
    clock, busy = [0.0], [0.0]
    prefill = Decoder.prefill

    def prefill_left_running(self, *args, **kwargs):
        busy[0] = 1.0
        return prefill(self, *args, **kwargs)

    def synchronize(*args):
        clock[0] += busy[0]
        busy[0] = 0.0

    monkeypatch.setattr(Decoder, "prefill", prefill_left_running)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(speculative, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    ids, mask = ragged_prompts(2, model.config.vocab_size, seed=11, low=EOS + 1)
    kc = K.KangarooConfig(gamma=3, eta=0.0)
    for _ in range(3):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, kangaroo=kc, cuda_graphs=True)
    timings = model.graph_runner.entry(2, kc, 1).timings
    assert sum(len(t) for t in timings.values()) == 3
    assert all(t == 0.0 for ts in timings.values() for t in ts), timings


def test_emulated_graphs_with_a_draft_vocabulary_equal_eager_and_plain(emulated):
    """The graph rounds call the same propose: the subset head, gathered once, is captured like the full one."""
    cfg = tiny_config(num_layers=4, eos_token_id=EOS)
    target, adapter = agreeing_pair(cfg, 2)
    adapter.set_draft_vocab(torch.arange(0, cfg.vocab_size, 3))
    model = K.KangarooModel(target, adapter, exit_layer=2)
    emulated["tensors"] = lambda: _state_tensors(model)
    ids, mask = ragged_prompts(3, cfg.vocab_size, seed=3, low=EOS + 1)
    check_graphs_match_eager_and_plain(model, ids, mask, max_new_tokens=16)
    assert model.graph_runner.captures > 0
