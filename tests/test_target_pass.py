"""A target pass in one extension call (csrc/cpu/target_pass.cpp, ``Decoder._cpu_pass``): the plain step and the
verification equal the step-by-step path (``ar_step`` / ``verify`` with ``_cpu_pass`` off) bit for bit: tokens,
counters, positions, exit states and caches, greedy and sampled (the same generator, drawn in the same order)."""
import pytest
import torch

from kangaroo_rt import _cpu_ext
from kangaroo_rt.speculative import Decoder, DraftChain

from test_draft_chain import _decoder, _started_state, torch_threads


@pytest.fixture(scope="module", autouse=True)
def built():
    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")


def _valid_slots(cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A copy of a cache (layers, B_max, H, T, Dh) with each row's slots from its position on zeroed: those past a
    row's accepted length hold nothing (the one-call pass computes only the positions its acceptance reads, where
    the step-by-step path pads every row to the round's longest chain)."""
    slots = torch.arange(cache.shape[3])
    keep = torch.zeros(cache.shape[1], cache.shape[3], dtype=torch.bool)
    keep[:pos.shape[0]] = slots[None, :] < pos[:, None]
    return torch.where(keep[None, :, None, :, None], cache, torch.zeros((), dtype=cache.dtype))


def _state_tensors(decoder, state):
    return [t.clone() for t in (state.out, state.n_gen, state.finished, state.pos, state.token)] + (
        [state.e_prev.clone()] if state.e_prev is not None else []) + [
        _valid_slots(decoder.cache.k, state.pos), _valid_slots(decoder.cache.v, state.pos)]


SAMPLED = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
# (kangaroo, exit layer, batch, gamma, eta, qwen, EOS ids) of the passes compared with the step-by-step path
CASES = [
    (False, 1, 1, 4, 0.0, False, None),
    (False, 2, 3, 4, 0.0, True, [5, 17, 60]),  # EOS ids, a finished row, a row at its limit; q/k/v biases
    (True, 1, 1, 4, 0.0, False, None),  # verification over gamma + 1 positions
    (True, 2, 3, 5, 0.2, True, [5, 17, 60]),
    (True, 1, 4, 6, 0.05, False, list(range(0, 97, 4))),  # rows finishing at EOS mid-round
]


def _row_sampler(rows):
    """An engine's RowSampling of (SamplingConfig keywords or None for a free slot, seed) per row."""
    from kangaroo_rt.config import SamplingConfig
    from kangaroo_rt.speculative import RowSampling

    return RowSampling([None if cfg is None else (SamplingConfig(**cfg), torch.Generator().manual_seed(seed))
                        for cfg, seed in rows])


def _run(one_call, dtype, exit_layer, batch, gamma, eta, qwen, eos, rounds, kangaroo, sampling=None, rows=None,
         chain_call=True, draft_ids=None):
    """``rows``: the state's sampler becomes :func:`_row_sampler` of them after the prefill (an engine's batch);
    ``chain_call`` False: one_call's rounds draft step by step (their draft probabilities then stacked for the
    pass); ``draft_ids``: a draft vocabulary."""
    torch.manual_seed(0)
    decoder = _decoder(dtype, exit_layer, draft_ids, qwen)
    if not one_call:
        decoder._cpu_pass = lambda *args: None
        decoder._cpu_chain = lambda *args: None
    snaps = []
    with torch.no_grad():
        state = _started_state(decoder, batch, gamma, seed=13, sampling=sampling)
        if rows is not None:
            state.sampler = _row_sampler(rows)
        if eos is not None:
            state.eos = torch.tensor(eos)
        for _ in range(rounds):
            if kangaroo:
                chain = DraftChain.allocate(batch, gamma, decoder.target.config.hidden_size, dtype, state.pos.device)
                base_len = int(state.pos.max()) + 1
                state.sampler.begin_round(batch, gamma, state.pos.device)
                k = decoder._cpu_chain(state, chain, gamma, eta, base_len) if one_call and chain_call else None
                if k is None:
                    k = decoder.draft_round(state, chain, gamma, eta, base_len)
                result = decoder.verify(state, chain, k, base_len + k)
            else:
                result = (decoder.ar_step(state),)
            snaps.append([r.clone() for r in result] + _state_tensors(decoder, state))
    return snaps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kangaroo,exit_layer,batch,gamma,eta,qwen,eos", CASES)
def test_one_call_pass_equals_the_step_by_step_path(dtype, kangaroo, exit_layer, batch, gamma, eta, qwen, eos):
    fused = _run(True, dtype, exit_layer, batch, gamma, eta, qwen, eos, 5, kangaroo)
    steps = _run(False, dtype, exit_layer, batch, gamma, eta, qwen, eos, 5, kangaroo)
    for a, b in zip(fused, steps):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kangaroo,exit_layer,batch,gamma,eta,qwen,eos", CASES)
def test_sampled_one_call_pass_equals_the_step_by_step_path(monkeypatch, dtype, kangaroo, exit_layer, batch, gamma,
                                                            eta, qwen, eos):
    """Sampled: the pass draws its tokens from the uniforms the step-by-step path draws from the same generator (the
    acceptance's, then the next token's), so the same tokens, acceptances and bits."""
    calls, original = [], _cpu_ext.target_pass
    monkeypatch.setattr(_cpu_ext, "target_pass", lambda *a, **k: calls.append(k["sampled"]) or original(*a, **k))
    fused = _run(True, dtype, exit_layer, batch, gamma, eta, qwen, eos, 6, kangaroo, SAMPLED)
    steps = _run(False, dtype, exit_layer, batch, gamma, eta, qwen, eos, 6, kangaroo, SAMPLED)
    assert len(calls) == 6 and all(c is not None for c in calls)  # every fused step was a sampled one-call pass
    for a, b in zip(fused, steps):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    if kangaroo:  # the rounds accepted some drafts and rejected others: both branches of the acceptance ran
        accepted = torch.stack([snap[1] for snap in fused])
        assert bool((accepted > 0).any()) and bool((accepted == 0).any())


ROWS = [(SAMPLED, 1), (None, 0), ({}, 0), (dict(do_sample=True, temperature=1.3, top_k=20), 2)]


DRAFT_IDS = list(range(0, 97, 3))


@pytest.mark.parametrize("rows", [None, ROWS])
@pytest.mark.parametrize("chain_call,draft_ids", [(False, None), (True, DRAFT_IDS), (False, DRAFT_IDS)])
def test_sampled_pass_of_other_drafts_equals_the_step_by_step_path(monkeypatch, rows, chain_call, draft_ids):
    """Drafts made step by step (their q a list of (B, V) rows, stacked for the pass), or over a draft vocabulary
    (the chain's q over its ids, which the pass spreads over the vocabulary), verified in one call."""
    calls, original = [], _cpu_ext.target_pass
    monkeypatch.setattr(_cpu_ext, "target_pass", lambda *a, **k: calls.append(k["sampled"]) or original(*a, **k))
    batch = 4 if rows else 3
    sampling = None if rows else SAMPLED
    fused = _run(True, torch.bfloat16, 2, batch, 5, 0.1, True, [5, 17, 60], 6, True, sampling, rows,
                 chain_call=chain_call, draft_ids=draft_ids)
    steps = _run(False, torch.bfloat16, 2, batch, 5, 0.1, True, [5, 17, 60], 6, True, sampling, rows,
                 draft_ids=draft_ids)
    assert len(calls) == 6 and any(c[2] is not None for c in calls)
    assert all((c[3] is not None) == (chain_call and draft_ids is not None) for c in calls if c[2] is not None)
    accepted = torch.stack([snap[1] for snap in fused])  # acceptances and rejections (the residual's q) both ran
    assert bool((accepted > 0).any()) and bool((accepted == 0).any())
    for a, b in zip(fused, steps):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kangaroo", [False, True])
def test_engine_rows_in_one_call_equal_the_step_by_step_path(monkeypatch, dtype, kangaroo):
    """An engine's batch (RowSampling): sampled rows with their own settings and generators, a free slot and a greedy
    row, drafted by the one-call chain and verified by the one-call pass, against both from Python: the same bits."""
    calls, chains, original, chain = [], [], _cpu_ext.target_pass, _cpu_ext.draft_chain
    monkeypatch.setattr(_cpu_ext, "target_pass", lambda *a, **k: calls.append(k["sampled"]) or original(*a, **k))
    monkeypatch.setattr(_cpu_ext, "draft_chain", lambda *a, **k: chains.append(k["sampled"]) or chain(*a, **k))
    fused = _run(True, dtype, 2, 4, 5, 0.1, True, [5, 17, 60], 6, kangaroo, rows=ROWS)
    steps = _run(False, dtype, 2, 4, 5, 0.1, True, [5, 17, 60], 6, kangaroo, rows=ROWS)
    assert len(calls) == 6 and all(c is not None for c in calls)
    assert len(chains) == (6 if kangaroo else 0) and all(c is not None for c in chains)
    for a, b in zip(fused, steps):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sampled_pass_checks_its_inputs_and_refuses_what_it_cannot_draw_from():
    """A sampled pass without its uniforms or draft probabilities is refused; logits with a NaN fail the pass with
    torch's multinomial message, before anything is committed."""
    decoder = _decoder(torch.float32, 1)
    with torch.no_grad():
        state = _started_state(decoder, 2, 3, seed=2, sampling=SAMPLED)
        chain = DraftChain.allocate(2, 3, decoder.target.config.hidden_size, torch.float32, state.pos.device)
        args, kwargs = decoder._pass_inputs(state, chain, 2)
        u_next, u_accept = torch.rand(2, dtype=torch.float64), torch.rand(2, 2)
        q = torch.full((2, 2, decoder.target.config.vocab_size), 1e-2)
        kv_len = int(state.pos.max()) + 3
        settings = state.sampler.row_settings(2, decoder.target.config.vocab_size)
        negative = (settings[0], torch.tensor([0, -1]), settings[2])
        for bad, match in [((u_next.float(), u_accept, q, None, *settings), "sample_u_next"),
                           ((u_next, None, q, None, *settings), "sample_u_accept"),
                           ((u_next, u_accept[:, :1], q, None, *settings), "sample_u_accept"),
                           ((u_next, u_accept, q[:, :, 1:], None, *settings), "sample_q"),
                           ((u_next, u_accept, q, torch.arange(3), *settings), "sample_q"),
                           ((u_next, u_accept, q[:, :, :2], torch.tensor([0, 97]), *settings), "outside the head"),
                           ((u_next, u_accept, q, None, settings[0][:1], *settings[1:]), "one setting a row"),
                           ((u_next, u_accept, q, None, *negative), "top_k >= 0")]:
            with pytest.raises(ValueError, match=match):
                _cpu_ext.target_pass(*args, kv_len=kv_len, **kwargs, sampled=bad)
        before = [t.clone() for t in (state.out, state.n_gen, state.pos, state.token)]
        weight = decoder.target.lm_head.weight
        saved = weight[3].clone()
        weight[3] = float("nan")
        try:
            with pytest.raises(_cpu_ext.InvalidDistribution, match="probability tensor contains"):
                _cpu_ext.target_pass(*args, kv_len=kv_len, **kwargs, sampled=(u_next, u_accept, q, None, *settings))
        finally:
            weight[3] = saved
        assert all(torch.equal(x, y) for x, y in zip(before, (state.out, state.n_gen, state.pos, state.token)))


def test_a_sampled_row_fails_only_where_its_acceptance_reaches_no_distribution():
    """Exit states with a NaN from position 1 on give logits with no distribution there (attention is causal, so
    position 0 keeps its own). A row whose draft at position 0 is rejected draws its token there, as the step-by-step
    path does; one that accepts it reaches position 1 and fails, before anything is committed."""
    decoder = _decoder(torch.float32, 1)
    vocab = decoder.target.config.vocab_size
    with torch.no_grad():
        state = _started_state(decoder, 1, 3, seed=8, sampling=dict(do_sample=True, temperature=1.0))
        chain = DraftChain.allocate(1, 3, decoder.target.config.hidden_size, torch.float32, state.pos.device)
        base_len = int(state.pos.max()) + 1
        state.sampler.begin_round(1, 3, state.pos.device)
        k = decoder.draft_round(state, chain, 3, 0.0, base_len)
        assert k == 3
        chain.exits[:, 1:] = float("nan")
        args, kwargs = decoder._pass_inputs(state, chain, k)
        settings = state.sampler.row_settings(1, vocab)
        u_next = torch.tensor([0.5], dtype=torch.float64)
        before = [t.clone() for t in (state.out, state.n_gen, state.pos, state.token)]
        reach = (u_next, torch.zeros(1, k), torch.zeros(1, k, vocab), None, *settings)  # 0 * q < p: accepted
        with pytest.raises(_cpu_ext.InvalidDistribution):
            _cpu_ext.target_pass(*args, kv_len=base_len + k, **kwargs, sampled=reach)
        assert all(torch.equal(x, y) for x, y in zip(before, (state.out, state.n_gen, state.pos, state.token)))
        q = torch.zeros(1, k, vocab)
        q[0, 0, chain.drafts[0, 0]] = 10.0  # 1 * 10 < p fails: rejected at position 0
        accepted, committed = _cpu_ext.target_pass(*args, kv_len=base_len + k, **kwargs,
                                                   sampled=(u_next, torch.ones(1, k), q, None, *settings))
        assert accepted.tolist() == [0] and committed.tolist() == [1]
        assert int(state.token[0]) != int(chain.drafts[0, 0])  # drawn from max(p - q, 0), which excludes it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_verification_computes_only_the_positions_its_acceptance_reads(dtype, sampled):
    """Rows of 3, 0 and 1 drafts in a pass over k + 1 = 4 positions: the pass runs 4 + 1 + 2 tokens, not 3 x 4 (the
    deep layers' cache slots past each row's tokens keep the NaN they held, which nothing reads), and gives the
    step-by-step path's tokens, positions and valid cache slots."""
    gamma, n_drafts = 3, torch.tensor([3, 0, 1])
    results = []
    for one_call in (True, False):
        torch.manual_seed(0)
        decoder = _decoder(dtype, 1)
        if not one_call:
            decoder._cpu_pass = lambda *args: None
        with torch.no_grad():
            state = _started_state(decoder, 3, gamma, seed=4, sampling=SAMPLED if sampled else None)
            state.finished.zero_()
            state.max_new.fill_(40)
            chain = DraftChain.allocate(3, gamma, decoder.target.config.hidden_size, dtype, state.pos.device)
            base_len = int(state.pos.max()) + 1
            state.sampler.begin_round(3, gamma, state.pos.device)
            k = decoder.draft_round(state, chain, gamma, 0.0, base_len)
            assert k == gamma and chain.n_drafts.tolist() == [gamma] * 3
            chain.n_drafts.copy_(n_drafts)
            chain.drafts[1:, 1:] = -1
            chain.drafts[1, 0] = -1
            if sampled:
                chain.set_probs([q.clone() for q in chain.full_probs()])
            pos0 = state.pos.clone()
            deep = [cache[decoder.exit_layer:] for cache in (decoder.cache.k, decoder.cache.v)]
            for cache in deep:
                for b in range(3):  # a mark in every slot the round may write: the pass overwrites what it computes
                    cache[:, b, :, pos0[b]:].fill_(float("nan"))
            result = decoder.verify(state, chain, k, base_len + k)
            for b in range(3):
                slots = torch.cat([c[:, b, :, pos0[b]:pos0[b] + k + 1] for c in deep]).transpose(0, 2)
                written = slots.isnan().logical_not().flatten(1).all(1)  # per position (k + 1,)
                expected = [i <= int(n_drafts[b]) for i in range(k + 1)] if one_call else [True] * (k + 1)
                assert written.tolist() == expected, (b, written)
        results.append([r.clone() for r in result] + _state_tensors(decoder, state))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_more_threads_than_cores_give_the_same_passes():
    """Threads that start late (5 on this machine's cores) claim what is left of each phase, some after the others
    have advanced the state: the same bits and tokens."""
    with torch_threads(5):
        for kangaroo in (False, True):
            fused = _run(True, torch.bfloat16, 2, 3, 5, 0.2, True, [5, 17, 60], 4, kangaroo)
            steps = _run(False, torch.bfloat16, 2, 3, 5, 0.2, True, [5, 17, 60], 4, kangaroo)
            for a, b in zip(fused, steps):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
            sampled = _run(True, torch.bfloat16, 2, 3, 5, 0.2, True, [5, 17, 60], 4, kangaroo, SAMPLED)
            for a, b in zip(sampled, _run(False, torch.bfloat16, 2, 3, 5, 0.2, True, [5, 17, 60], 4, kangaroo,
                                          SAMPLED)):
                assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_step_by_step_path_serves_past_the_cache():
    decoder = _decoder(torch.float32, 1)
    with torch.no_grad():
        state = _started_state(decoder, 2, 3, seed=2)
        assert decoder._cpu_pass(state, None, 0, decoder.cache.max_len + 1) is None


def test_a_token_outside_the_vocabulary_is_an_error():
    decoder = _decoder(torch.float32, 1)
    with torch.no_grad():
        state = _started_state(decoder, 1, 2, seed=4)
        state.token[0] = -3
        with pytest.raises(RuntimeError, match="status 1"):
            decoder._cpu_pass(state, None, 0, int(state.pos.max()) + 1)


def test_generate_uses_it_and_keeps_the_tokens(monkeypatch):
    """A whole greedy decode, plain and Kangaroo, with both one-call paths on and off: the same sequences."""
    import kangaroo_rt as K

    decoder = _decoder(torch.bfloat16, 2)
    model = K.KangarooModel(decoder.target, decoder.adapter, exit_layer=2)
    prompts = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(3))

    def decode():
        return [model.generate(prompts, max_new_tokens=20, do_sample=False, **kw) for kw in ({}, {"kangaroo": None})]

    monkeypatch.setattr(Decoder, "_cpu_decode", lambda self, *args: None)  # a step a call (test_greedy_decode: more)
    calls, original = [], Decoder._cpu_pass
    monkeypatch.setattr(Decoder, "_cpu_pass", lambda self, *args: calls.append(1) or original(self, *args))
    fused = decode()
    assert calls  # the one-call path ran
    monkeypatch.setattr(Decoder, "_cpu_pass", lambda self, *args: None)
    monkeypatch.setattr(Decoder, "_cpu_chain", lambda self, *args: None)
    for a, b in zip(fused, decode()):
        assert torch.equal(a, b)


def _pass_case(dtype):
    """Three plain steps and two Kangaroo rounds through the one-call passes on a batch of 3 (for test_cpu_ext's
    check across variants and thread counts): the tokens, positions, exit states and caches."""
    plain = _run(True, dtype, 2, 3, 4, 0.0, True, [5, 17], 3, False)[-1]
    kangaroo = _run(True, dtype, 2, 3, 4, 0.05, True, [5, 17], 2, True)[-1]
    return plain + kangaroo
