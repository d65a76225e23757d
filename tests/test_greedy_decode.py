"""Decoding to the end in one extension call (``kangaroo_rt._cpu.decode_loop``, ``Decoder._cpu_decode``): plain
steps and Kangaroo rounds equal the Python loop of one-call passes (``ar_step`` / ``kangaroo_round``) bit for bit:
tokens, counters, caches and the round statistics; greedy, and sampled from the same generator (whose uniforms the
loop draws in the Python loop's order), where they also equal the step-by-step path's ops."""
import pytest
import torch

from kangaroo_rt import _cpu_ext
from kangaroo_rt.config import KangarooConfig, SamplingConfig
from kangaroo_rt.speculative import Decoder

from test_draft_chain import _decoder, _started_state, torch_threads
from test_target_pass import CASES, SAMPLED, _valid_slots


@pytest.fixture(scope="module", autouse=True)
def built():
    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")


def _stats(stats):
    if stats is None:
        return None
    return (stats.rounds, stats.committed, stats.drafted, stats.accepted_lengths, stats.draft_lengths,
            stats.position_attempts, stats.position_accepts, dict(stats.histogram),
            {k: v[0] for k, v in stats.verify_by_tokens.items()})


def _decode(one_call, dtype, exit_layer, batch, gamma, eta, qwen, eos, kangaroo, max_new=24, monkeypatch=None,
            sampling=None, per_op=False, seed=11, draft_ids=None):
    """``sampling``: SamplingConfig keywords (a generator seeded with ``seed``); ``per_op`` (one_call False): the
    step-by-step path's ops too, without the one-call chain and pass."""
    torch.manual_seed(0)
    decoder = _decoder(dtype, exit_layer, draft_ids, qwen)
    calls = []
    if one_call:
        original = _cpu_ext.decode_loop
        monkeypatch.setattr(_cpu_ext, "decode_loop", lambda *a: calls.append(a[2]) or original(*a))
    else:
        monkeypatch.setattr(Decoder, "_cpu_decode", lambda self, *a: None)
        if per_op:
            monkeypatch.setattr(Decoder, "_cpu_pass", lambda self, *a: None)
            monkeypatch.setattr(Decoder, "_cpu_chain", lambda self, *a: None)
    gen = torch.Generator().manual_seed(7)
    vocab = decoder.target.config.vocab_size
    ids = torch.randint(0, vocab, (batch, 9), generator=gen)
    lengths = torch.randint(3, 10, (batch,), generator=gen)
    kcfg = KangarooConfig(gamma=gamma, eta=eta) if kangaroo else None
    with torch.no_grad():
        out, n_gen, stats = decoder.decode(ids, lengths, max_new, SamplingConfig(**(sampling or {})), kcfg,
                                           None if eos is None else torch.tensor(eos),
                                           torch.Generator().manual_seed(seed) if sampling else None)
    assert bool(calls) == one_call  # the one-call loop ran, or did not
    valid = lengths + n_gen - 1  # each row's position: the slots before it hold its committed tokens
    caches = [_valid_slots(decoder.cache.k, valid), _valid_slots(decoder.cache.v, valid)]
    return [out.clone(), n_gen.clone()] + caches, _stats(
        stats if kangaroo else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kangaroo,exit_layer,batch,gamma,eta,qwen,eos", CASES)
def test_one_call_decode_equals_the_python_loop(monkeypatch, dtype, kangaroo, exit_layer, batch, gamma, eta, qwen,
                                               eos):
    fused, fused_stats = _decode(True, dtype, exit_layer, batch, gamma, eta, qwen, eos, kangaroo,
                                 monkeypatch=monkeypatch)
    monkeypatch.undo()
    loop, loop_stats = _decode(False, dtype, exit_layer, batch, gamma, eta, qwen, eos, kangaroo,
                               monkeypatch=monkeypatch)
    for x, y in zip(fused, loop):
        assert torch.equal(x, y)
    assert fused_stats == loop_stats



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kangaroo,exit_layer,batch,gamma,eta,qwen,eos", CASES)
def test_sampled_one_call_decode_equals_the_python_loop_and_the_ops(monkeypatch, dtype, kangaroo, exit_layer, batch,
                                                                    gamma, eta, qwen, eos):
    runs = []
    for one_call, per_op in ((True, False), (False, False), (False, True)):
        runs.append(_decode(one_call, dtype, exit_layer, batch, gamma, eta, qwen, eos, kangaroo,
                            monkeypatch=monkeypatch, sampling=SAMPLED, per_op=per_op))
        monkeypatch.undo()
    (fused, fused_stats), (loop, loop_stats), (ops, ops_stats) = runs
    for x, y, z in zip(fused, loop, ops):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert fused_stats == loop_stats == ops_stats
    if kangaroo:  # drafts were accepted and rejected
        assert fused_stats[3] and any(0 < a < 1 + d for row_a, row_d in zip(fused_stats[3], fused_stats[4])
                                      for a, d in zip(row_a, row_d))


def test_a_seed_gives_other_tokens(monkeypatch):
    """The loop's draws come from the generator: another seed, other tokens."""
    a, _ = _decode(True, torch.float32, 1, 2, 4, 0.05, False, None, True, monkeypatch=monkeypatch, sampling=SAMPLED)
    monkeypatch.undo()
    b, _ = _decode(True, torch.float32, 1, 2, 4, 0.05, False, None, True, monkeypatch=monkeypatch, sampling=SAMPLED,
                   seed=12)
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("sampling", [None, SAMPLED])
def test_a_draft_vocabulary_in_one_call_equals_the_python_loop_and_the_ops(monkeypatch, sampling):
    """A draft vocabulary (the chain's q over its ids) decoded by the loop, by the Python loop of one-call rounds
    and step by step: the same bits."""
    runs = []
    for one_call, per_op in ((True, False), (False, False), (False, True)):
        runs.append(_decode(one_call, torch.bfloat16, 2, 3, 5, 0.1, True, [5, 17, 60], True, monkeypatch=monkeypatch,
                            sampling=sampling, per_op=per_op, draft_ids=list(range(0, 97, 3))))
        monkeypatch.undo()
    (fused, fused_stats), (loop, loop_stats), (ops, ops_stats) = runs
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(fused, loop, ops))
    assert fused_stats == loop_stats == ops_stats


def test_more_threads_than_cores_give_the_same_decode(monkeypatch):
    with torch_threads(5):
        fused, fused_stats = _decode(True, torch.bfloat16, 2, 3, 5, 0.2, True, [5, 17, 60], True,
                                     monkeypatch=monkeypatch)
    monkeypatch.undo()
    loop, loop_stats = _decode(False, torch.bfloat16, 2, 3, 5, 0.2, True, [5, 17, 60], True, monkeypatch=monkeypatch)
    assert all(torch.equal(x, y) for x, y in zip(fused, loop)) and fused_stats == loop_stats


def test_it_stops_before_a_round_past_the_cache():
    """Rows with no token limit in sight decode until a round would read past the cache: the call stops before it,
    rows unfinished, and the rounds it ran are those of the Python loop."""
    gamma = 4
    states = []
    for one_call in (True, False):
        decoder = _decoder(torch.float32, 1)
        kcfg = KangarooConfig(gamma=gamma, eta=0.0)
        with torch.no_grad():
            state = _started_state(decoder, 2, gamma, seed=5)
            state.max_new.fill_(state.out.shape[1])
            state.finished.zero_()
            T = decoder.cache.max_len
            if one_call:
                decoder._cpu_decode(state, kcfg, _empty_stats(2, gamma))
            else:
                while int(state.pos.max()) + 1 + gamma <= T and not bool(state.finished.all()):
                    decoder.kangaroo_round(state, kcfg, _empty_stats(2, gamma), timed=False)
        assert not bool(state.finished.all()) and int(state.pos.max()) + 1 + gamma > T
        states.append([state.out.clone(), state.n_gen.clone(), state.pos.clone(),
                       _valid_slots(decoder.cache.k, state.pos)])
    assert all(torch.equal(x, y) for x, y in zip(*states))


def _empty_stats(batch, gamma):
    from kangaroo_rt.speculative import DecodeStats

    return DecodeStats.empty(batch, gamma)


def test_plans_that_do_not_belong_together_are_refused():
    decoder = _decoder(torch.float32, 1)
    with torch.no_grad():
        state = _started_state(decoder, 2, 3, seed=2)
        chain = decoder._chain_for(state, 3)
        plain = _cpu_ext.plan_target_pass(*decoder._pass_inputs(state, None, 0)[0],
                                          **decoder._pass_inputs(state, None, 0)[1])
        draft = _cpu_ext.plan_draft_chain(*decoder._chain_inputs(state, chain, 3, 0.1))
        with pytest.raises(ValueError, match="must verify the draft plan's chain"):
            _cpu_ext.decode_loop(plain, draft, 5)
        with pytest.raises(ValueError, match="max_rounds"):
            _cpu_ext.decode_loop(plain, None, -1)
        short = _cpu_ext.plan_target_pass(*decoder._pass_inputs(state, chain, 1)[0],
                                          **decoder._pass_inputs(state, chain, 1)[1])
        with pytest.raises(ValueError, match="must verify the draft plan's chain"):
            _cpu_ext.decode_loop(short, draft, 5)  # a plan for 2 tokens a row cannot verify 3 drafts
        with pytest.raises(ValueError, match="expected a plan from plan_target_pass"):
            _cpu_ext.decode_loop(draft, None, 1)
        with pytest.raises(ValueError, match="expected a plan from plan_draft_chain"):
            _cpu_ext.decode_loop(plain, plain, 1)
        assert _cpu_ext.decode_loop(plain, None, 0)[0] == 0


def test_a_streamer_keeps_the_rounds_in_python(monkeypatch):
    import kangaroo_rt as K

    decoder = _decoder(torch.bfloat16, 2)
    model = K.KangarooModel(decoder.target, decoder.adapter, exit_layer=2)
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    calls, seen = [], []
    original = _cpu_ext.decode_loop
    monkeypatch.setattr(_cpu_ext, "decode_loop", lambda *a: calls.append(1) or original(*a))

    class Streamer:
        def put(self, value):
            seen.append(value)

        def end(self):
            pass

    streamed = model.generate(prompt, max_new_tokens=12, do_sample=False, streamer=Streamer())
    assert not calls and len(seen) > 2
    assert torch.equal(streamed, model.generate(prompt, max_new_tokens=12, do_sample=False)) and calls
