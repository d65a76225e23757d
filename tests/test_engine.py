"""Engine: continuous batching equals decoding each request alone; abort, admission control, metrics."""
import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.engine import AdmissionError, Engine, RequestParams
from kangaroo_rt.testing import agreeing_pair, random_target, tiny_config

GAMMA = 4


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 2)
    return cfg, target, adapter


def _model(pair, eos=None, kangaroo=K.KangarooConfig(gamma=GAMMA, eta=0.6)):
    cfg, target, adapter = pair
    target.config.eos_token_id = eos
    return K.KangarooModel(target, adapter, exit_layer=2, kangaroo=kangaroo)


def _prompts(n, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 15, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (t,), generator=gen).tolist() for t in lengths]


def _run(engine, schedule, max_steps=500):
    """schedule: {step: [(key, prompt, params), ...]}. Returns ({key: tokens}, {key: reason}, trace)."""
    ids, tokens, reasons, trace = {}, {}, {}, []
    step = 0
    while step <= max(schedule) or engine.has_unfinished():
        for key, prompt, params in schedule.get(step, []):
            ids[engine.add_request(prompt, params)] = key
        trace.append((engine.num_running, engine.num_waiting))
        for out in engine.step():
            key = ids[out.request_id]
            tokens.setdefault(key, []).extend(out.new_token_ids)
            assert out.num_generated_tokens == len(tokens[key])
            if out.finished:
                assert key not in reasons
                reasons[key] = out.finish_reason
        step += 1
        assert step < max_steps
    return tokens, reasons, trace


def _alone(model, prompt, params, **kw):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=params.max_new_tokens,
                         do_sample=params.temperature > 0, temperature=params.temperature or 1.0,
                         top_k=params.top_k, top_p=params.top_p, seed=params.seed, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("mode", ["kangaroo", "plain"])
def test_staggered_requests_equal_generate_alone(pair, mode):
    kcfg = K.KangarooConfig(gamma=GAMMA, eta=0.6) if mode == "kangaroo" else None
    model = _model(pair, kangaroo=kcfg)
    prompts = _prompts(8, pair[0].vocab_size)
    lengths = [5, 17, 9, 30, 3, 12, 1, 21]
    steps = [0, 0, 1, 3, 3, 4, 7, 9]
    schedule = {}
    for i, (p, m, s) in enumerate(zip(prompts, lengths, steps)):
        schedule.setdefault(s, []).append((i, p, RequestParams(max_new_tokens=m)))
    engine = Engine(model, max_batch=3, max_len=64, kangaroo=kcfg)
    tokens, reasons, trace = _run(engine, schedule)
    for i, p in enumerate(prompts):
        assert tokens[i] == _alone(model, p, RequestParams(max_new_tokens=lengths[i])), i
        assert reasons[i] == "length"
    assert max(r for r, _ in trace) == 3 and max(w for _, w in trace) > 0  # slots filled, others queued
    m = engine.metrics()
    assert m["generated_tokens_total"] == sum(lengths) and m["requests_finished_total"] == 8
    assert m["requests_running"] == 0 and m["requests_waiting"] == 0
    if mode == "kangaroo":
        assert m["mat"] > 1.5 and len(m["acceptance_by_position"]) == GAMMA
        assert m["acceptance_by_position"][0] is not None and 0 < m["acceptance_by_position"][0] <= 1
    else:
        assert m["rounds_total"] == 0 and m["mode"] == "plain"


def test_eos_stops_a_request_like_generate(pair):
    model = _model(pair)
    prompts = _prompts(4, pair[0].vocab_size, seed=1)
    free = _alone(model, prompts[0], RequestParams(max_new_tokens=20))
    eos = free[6]  # a token the first request produces mid-way
    model = _model(pair, eos=eos)
    try:
        schedule = {0: [(i, p, RequestParams(max_new_tokens=20)) for i, p in enumerate(prompts[:2])],
                    2: [(i, p, RequestParams(max_new_tokens=20)) for i, p in enumerate(prompts[2:], start=2)]}
        tokens, reasons, _ = _run(Engine(model, max_batch=4, max_len=64), schedule)
        for i, p in enumerate(prompts):
            ref = _alone(model, p, RequestParams(max_new_tokens=20))
            assert tokens[i] == ref
            assert reasons[i] == ("stop" if ref[-1] == eos else "length")
        assert reasons[0] == "stop" and len(tokens[0]) <= 7
        ignored, reasons, _ = _run(Engine(model, max_batch=2, max_len=64, ignore_eos=True),
                                   {0: [(0, prompts[0], RequestParams(max_new_tokens=20))]})
        assert ignored[0] == free and reasons[0] == "length"
    finally:
        pair[1].config.eos_token_id = None


def test_seeded_sampled_requests_do_not_depend_on_the_batch(pair):
    model = _model(pair)
    prompts = _prompts(4, pair[0].vocab_size, seed=2)
    params = [RequestParams(max_new_tokens=14, temperature=0.9, seed=11),
              RequestParams(max_new_tokens=9, temperature=0.7, top_k=20, seed=12),
              RequestParams(max_new_tokens=12),  # greedy in a batch of sampled rows
              RequestParams(max_new_tokens=16, temperature=1.2, top_p=0.9, seed=13)]
    schedule = {0: [(0, prompts[0], params[0]), (1, prompts[1], params[1])], 2: [(2, prompts[2], params[2])],
                3: [(3, prompts[3], params[3])]}
    tokens, _, _ = _run(Engine(model, max_batch=4, max_len=64), schedule)
    for i, p in enumerate(prompts):
        assert tokens[i] == _alone(model, p, params[i]), i
    again, _, _ = _run(Engine(model, max_batch=1, max_len=64), {0: [(0, prompts[0], params[0])]})
    assert again[0] == tokens[0]
    other, _, _ = _run(Engine(model, max_batch=1, max_len=64),
                       {0: [(0, prompts[0], RequestParams(max_new_tokens=14, temperature=0.9, seed=99))]})
    assert other[0] != tokens[0]


def test_abort_frees_the_slot(pair):
    model = _model(pair)
    prompts = _prompts(3, pair[0].vocab_size, seed=3)
    engine = Engine(model, max_batch=1, max_len=64)
    a = engine.add_request(prompts[0], RequestParams(max_new_tokens=40))
    b = engine.add_request(prompts[1], RequestParams(max_new_tokens=10))
    c = engine.add_request(prompts[2], RequestParams(max_new_tokens=10))
    engine.step()
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 2
    assert engine.abort(c)  # a waiting request leaves the queue
    assert engine.num_waiting == 1
    assert engine.abort(a)  # the running one frees its slot at once
    assert engine.num_running == 0 and not engine.abort(a) and not engine.abort("no-such-id")
    got = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == b
            got.extend(out.new_token_ids)
    assert got == _alone(model, prompts[1], RequestParams(max_new_tokens=10))
    m = engine.metrics()
    assert m["requests_aborted_total"] == 2 and m["requests_finished_total"] == 1


def test_admission_control(pair):
    model = _model(pair)
    engine = Engine(model, max_batch=1, max_len=32, max_queue=1)
    with pytest.raises(AdmissionError, match=r"needs 36 cache positions but the engine's max_len is 32") as e:
        engine.add_request(list(range(20)), RequestParams(max_new_tokens=11))
    assert e.value.reason == "too_long" and "at most 7 new tokens fit" in str(e.value)
    with pytest.raises(AdmissionError, match="prompts of at most 26 tokens fit") as e:
        engine.add_request(list(range(27)), RequestParams(max_new_tokens=1))
    for bad, msg in [([], "empty"), ([1, 2, 500], "outside the vocabulary"), (torch.tensor([1.0]), "integer"),
                     ("hello", "list of ints"), ([1, True], "list of int")]:
        with pytest.raises(AdmissionError, match=msg) as e:
            engine.add_request(bad)
        assert e.value.reason == "invalid"
    for bad in [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=1.5), dict(top_k=0), dict(seed=-1)]:
        with pytest.raises(ValueError):
            RequestParams(**bad)
    full = engine.add_request(list(range(20)), RequestParams(max_new_tokens=None, temperature=0.0))
    first = engine.step()
    engine.add_request([1, 2, 3])  # waits: the only slot is taken
    with pytest.raises(AdmissionError, match="max_queue=1") as e:
        engine.add_request([4, 5])
    assert e.value.reason == "queue_full"
    with pytest.raises(AdmissionError, match="already in use"):
        engine.add_request([1], request_id=full)
    total = {full: len(first[0].new_token_ids)}
    while engine.has_unfinished():
        for out in engine.step():
            total[out.request_id] = total.get(out.request_id, 0) + len(out.new_token_ids)
    assert total[full] == engine.capacity(20) == 7  # max_new_tokens=None fills the row
    assert engine.metrics()["requests_refused_total"] == 9


def test_engine_from_a_bare_target_and_bad_construction():
    cfg = tiny_config(num_layers=3)
    target = random_target(cfg)
    engine = Engine(K.KangarooModel(target, None, exit_layer=1), max_batch=2, max_len=40)  # no adapter: plain
    assert engine.metrics()["mode"] == "plain"
    rid = engine.add_request([1, 2, 3], RequestParams(max_new_tokens=4))
    outs = [o for _ in range(6) for o in engine.step()]
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == rid) == 4
    with pytest.raises(ValueError, match="max_len=4 leaves no room"):
        Engine(K.KangarooModel(target, K.Adapter.random(cfg), exit_layer=1), max_len=4,
               kangaroo=K.KangarooConfig(gamma=6))
    with pytest.raises(ValueError, match="must be a KangarooModel"):
        Engine(target)  # a bare target: wrap it in a KangarooModel
    with pytest.raises(ValueError, match="Kangaroo decoding needs an adapter"):  # as generate says
        Engine(K.KangarooModel(target, None, exit_layer=1), kangaroo=K.KangarooConfig(gamma=2))
    with pytest.raises(ValueError, match="exit_layer must be in"):
        Engine(K.KangarooModel(target, K.Adapter.random(cfg), exit_layer=1), kangaroo=K.KangarooConfig(exit_layer=3))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(K.KangarooModel(target, None, exit_layer=1), max_batch=0)


@pytest.mark.parametrize("budget", [1, 3, 6, 100])
def test_a_verification_budget_caps_drafts_and_keeps_greedy_tokens(pair, monkeypatch, budget):
    """max_verify_tokens caps each round's drafts a row at budget // running - 1 (0: rounds without drafts): the
    caps the rounds ran, and every request's tokens those of generate alone (greedy). The requests end at different
    lengths, so the caps change as they leave (budget 3: rounds without drafts, then 2 drafts for the last one)."""
    from kangaroo_rt.speculative import Decoder

    model = _model(pair)
    prompts = _prompts(3, pair[0].vocab_size, seed=5)
    lengths = [6, 12, 24]
    caps, original = [], Decoder.kangaroo_round
    monkeypatch.setattr(Decoder, "kangaroo_round", lambda self, state, kcfg, stats, timed, max_drafts=None: (
        caps.append((int((~state.finished).sum()), max_drafts)) or original(self, state, kcfg, stats, timed,
                                                                             max_drafts)))
    engine = Engine(model, max_batch=3, max_len=64, max_verify_tokens=budget)
    tokens, _, _ = _run(engine, {0: [(i, p, RequestParams(max_new_tokens=n))
                                      for i, (p, n) in enumerate(zip(prompts, lengths))]})
    for i, p in enumerate(prompts):
        assert tokens[i] == _alone(model, p, RequestParams(max_new_tokens=lengths[i])), i
    assert caps and all(cap == min(GAMMA, max(0, budget // running - 1)) for running, cap in caps)
    if budget == 3:  # drafting resumed after rounds without drafts
        assert [c for _, c in caps][0] == 0 and [c for _, c in caps][-1] == 2
    m = engine.metrics()
    if budget == 1:  # every round without drafts
        assert m["mean_draft_length"] == 0 and m["mat"] == 1.0
    if budget == 100:  # no cap below gamma: the rounds of an engine without a budget
        plain = Engine(model, max_batch=3, max_len=64)
        _run(plain, {0: [(i, p, RequestParams(max_new_tokens=n)) for i, (p, n) in enumerate(zip(prompts, lengths))]})
        assert m["mean_draft_length"] == plain.metrics()["mean_draft_length"] > 0 and m["mat"] == plain.metrics()["mat"]


@pytest.mark.parametrize("one_call", [True, False])
def test_rounds_without_drafts_keep_the_adapter_cache_whole(pair, monkeypatch, one_call):
    """A request decoded by rounds without drafts (a budget of 1) leaves the adapter's cache as full rounds do: every
    slot before its last two positions written, with the keys and values that full rounds wrote there, bit for bit, so
    drafting resumes as well as before once the load drops. Both ways: the CPU extension's chain (gamma 0) where it
    is built, and the step-by-step path."""
    from kangaroo_rt import _cpu_ext
    from kangaroo_rt.speculative import Decoder

    if not _cpu_ext.is_available():  # (the bits of one and two positions are the same only with its kernels)
        pytest.skip("kangaroo_rt._cpu is not built")
    gammas, original = [], _cpu_ext.draft_chain
    monkeypatch.setattr(_cpu_ext, "draft_chain", lambda *a, **k: gammas.append(a[1].drafts.shape[1]) or original(
        *a, **k))
    model = _model(pair)
    prompt = _prompts(1, pair[0].vocab_size, seed=9)[0]
    runs = []
    for budget in (None, 1):
        engine = Engine(model, max_batch=1, max_len=64, max_verify_tokens=budget)
        if budget is not None and not one_call:
            monkeypatch.setattr(Decoder, "_cpu_chain", lambda self, *args: None)
        cache = engine.decoder.adapter_cache
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        tokens, _, _ = _run(engine, {0: [(0, prompt, RequestParams(max_new_tokens=16))]})
        runs.append((cache.k[:, 0].clone(), cache.v[:, 0].clone(), tokens[0]))
    (k_full, v_full, full), (k_cap, v_cap, capped) = runs
    assert capped == full
    assert (0 in gammas) == one_call  # the rounds without drafts ran in the extension's chain, or step by step
    last = len(prompt) + 16 - 1  # the final token's position: no round has run the adapter on it
    assert not k_cap[:, :, :last - 1].isnan().any() and not v_cap[:, :, :last - 1].isnan().any()
    written = ~k_full.isnan().any(-1).any(1).any(0)  # (T,): the slots full rounds wrote (k: (layers, H, T, Dh))
    assert written[:last - 1 - GAMMA].all()  # full rounds leave their last round's drafts' slots to the next round
    assert torch.equal(k_cap[:, :, written], k_full[:, :, written]) and torch.equal(v_cap[:, :, written],
                                                                                    v_full[:, :, written])


def test_sampled_requests_under_a_budget_that_never_binds_keep_their_tokens(pair):
    """A budget of (gamma + 1) x requests caps nothing: seeded sampled requests (and a greedy one) get the tokens of an
    engine without a budget; a tighter one gives rounds without drafts to sampled rows too, and still finishes."""
    model = _model(pair)
    prompts = _prompts(3, pair[0].vocab_size, seed=2)
    params = [RequestParams(max_new_tokens=14, temperature=0.9, top_p=0.9, seed=1),
              RequestParams(max_new_tokens=9, temperature=0.7, seed=2), RequestParams(max_new_tokens=11)]
    schedule = {0: [(i, p, q) for i, (p, q) in enumerate(zip(prompts, params))]}
    runs = [_run(Engine(model, max_batch=3, max_len=64, max_verify_tokens=b), schedule)[0]
            for b in (None, (GAMMA + 1) * 3, 2)]
    assert runs[0] == runs[1]
    assert [len(runs[2][i]) for i in range(3)] == [14, 9, 11]
    assert runs[2][2] == runs[0][2]  # the greedy request's tokens under any budget


def test_a_verification_budget_is_validated(pair):
    model = _model(pair)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="max_verify_tokens must be a positive int or None"):
            Engine(model, max_batch=2, max_len=64, max_verify_tokens=bad)
    engine = Engine(model, max_batch=4, max_len=64, max_verify_tokens=8)
    assert [engine.draft_cap(n) for n in (1, 2, 3, 4, 8, 9)] == [GAMMA, 3, 1, 1, 0, 0]
    assert Engine(model, max_batch=2, max_len=64).draft_cap(2) is None
