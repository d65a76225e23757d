"""The greedy draft chain in one extension call (csrc/cpu/draft.cpp, ``Decoder._cpu_chain``) against the step-by-step
path (``Decoder.draft_round``): the same chain, exit states and caches, bit for bit."""
import contextlib

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt import _cpu_ext
from kangaroo_rt.speculative import BatchSampling, DecodeState, Decoder, DraftChain, RowSampling
from kangaroo_rt.config import SamplingConfig
from kangaroo_rt.testing import random_target, tiny_config


@pytest.fixture(scope="module", autouse=True)
def built():
    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")


def _decoder(dtype, exit_layer, draft_ids=None, qwen=False, int8=True):
    cfg = tiny_config(num_layers=3, model_type="qwen2" if qwen else "llama")
    target = random_target(cfg, seed=3).to(dtype)
    adapter = K.Adapter.random(cfg, seed=5, std=cfg.hidden_size ** -0.5).to(dtype)
    if draft_ids is not None:
        adapter.set_draft_vocab(torch.tensor(draft_ids))
    decoder = Decoder(target, adapter, exit_layer=exit_layer)
    decoder.draft_int8 = int8
    return decoder


def _started_state(decoder, batch, gamma, seed, sampling=None):
    """A batch after prefills of different lengths, one row finished and one near its token limit; ``sampling``
    (SamplingConfig keywords): sampled decoding from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    vocab, width = decoder.target.config.vocab_size, 9
    decoder.ensure_caches(batch, width + 40 + gamma + 1)
    lengths = torch.randint(3, width + 1, (batch,), generator=gen)
    ids = torch.randint(0, vocab, (batch, width), generator=gen)
    state = DecodeState.allocate(batch, 40 + gamma + 2, ids.device, eos=None, dtype=decoder.target.dtype,
                                 hidden=decoder.target.config.hidden_size)
    state.sampler = BatchSampling(SamplingConfig(**(sampling or {})),
                                  torch.Generator().manual_seed(seed) if sampling else None)
    decoder.prefill(ids, lengths, state, 40)
    if batch > 1:
        state.finished[1] = True
        state.max_new[-1] = 3  # a cap below gamma
    return state


def _snapshot(decoder, state, chain):
    tensors = [chain.cap, chain.active, chain.conf, chain.x, chain.drafts, chain.n_drafts, state.pos, state.token]
    return [t.clone() for t in tensors] + [decoder.cache.k.clone(), decoder.cache.v.clone(),
                                           decoder.adapter_cache.k.clone(), decoder.adapter_cache.v.clone()]


@contextlib.contextmanager
def _spied(module, name, calls):
    """module.name counting its calls into ``calls`` while inside."""
    real = getattr(module, name)
    setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        yield
    finally:
        setattr(module, name, real)


def _round_shapes(outs):
    """(k, n_drafts) of each round of a _compare run."""
    return [(k, snap[5].tolist()) for k, _, snap in outs]


def _compare(dtype, exit_layer, batch, gamma, eta, draft_ids, qwen, rounds=3, sampling=None, int8=True):
    """Rounds of the one-call chain and of the step-by-step path from the same state: each round's k, exit states,
    chain, positions and caches must be equal (sampled: the draft distributions too, and the rounds' acceptance).
    ``int8``: both draft from the head's int8 estimates (the default), else from its weights. Returns the one-call
    run's rounds."""
    results = []
    for one_call in (True, False):
        torch.manual_seed(0)
        decoder = _decoder(dtype, exit_layer, draft_ids, qwen, int8)
        estimates = []  # the step path's calls of the int8 head
        with torch.no_grad():
            state = _started_state(decoder, batch, gamma, seed=11, sampling=sampling)
            outs = []
            for _ in range(rounds):  # rounds, each verified so that the next starts from a new state
                chain = DraftChain.allocate(batch, gamma, decoder.target.config.hidden_size, dtype, state.pos.device)
                base_len = int(state.pos.max()) + 1
                state.sampler.begin_round(batch, gamma, state.pos.device)
                if one_call:
                    inputs = decoder._chain_inputs(state, chain, gamma, eta)
                    assert (inputs[-1] is not None) == int8  # the chain's head_q8
                    k = decoder._cpu_chain(state, chain, gamma, eta, base_len)
                else:
                    with _spied(_cpu_ext, "screen_estimate", estimates):
                        k = decoder.draft_round(state, chain, gamma, eta, base_len)
                    assert bool(estimates) == (int8 and k > 0)  # a draft step ran: its head read the int8 form
                    estimates.clear()
                assert k is not None
                outs.append((k, chain.exits[:, :k + 1].clone(), _snapshot(decoder, state, chain)
                             + [q.clone() for q in chain.full_probs()]))
                decoder.verify(state, chain, k, base_len + k)
        results.append(outs)
    for (k1, e1, s1), (k2, e2, s2) in zip(*results):
        assert k1 == k2
        assert torch.equal(e1, e2)
        assert len(s1) == len(s2)
        for a, b in zip(s1, s2):
            assert torch.equal(a, b)
    return results[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exit_layer,batch,gamma,eta,draft_ids,qwen,shape", [
    (1, 1, 4, 0.0, None, False, "full"),  # every step drafts: the chain runs to gamma
    (2, 3, 5, 0.3, None, True, None),  # rows stop at eta, at their cap, one finished; q/k/v biases
    (1, 2, 3, 1.1, [0, 2, 3, 6, 40, 96], False, None),  # the first draft only (confidence <= 1 < eta); a draft
    # vocabulary
    (2, 4, 6, 0.09, list(range(0, 97, 3)), False, "mixed"),
    (2, 3, 0, 0.3, None, True, "none"),  # a round without drafts (the engine's budget): the adapter's catch-up only
])
@pytest.mark.parametrize("int8", [True, False], ids=["int8-head", "exact-head"])
def test_chain_equals_the_step_by_step_path(dtype, exit_layer, batch, gamma, eta, draft_ids, qwen, shape, int8):
    rounds = _round_shapes(_compare(dtype, exit_layer, batch, gamma, eta, draft_ids, qwen, int8=int8))
    if shape == "full":
        assert all(k == gamma for k, _ in rounds), rounds
    if shape == "none":
        assert all(k == 0 for k, _ in rounds), rounds
    if shape == "mixed":  # a row stopped at eta or its cap while another drafted on
        assert any(0 < n < k for k, ns in rounds for n in ns), rounds


SAMPLED = [dict(do_sample=True, temperature=0.8, top_p=0.9), dict(do_sample=True, temperature=1.3, top_k=7),
           dict(do_sample=True, temperature=0.6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exit_layer,batch,gamma,eta,draft_ids,sampling", [
    (1, 1, 4, 0.0, None, SAMPLED[0]),  # every step drafts
    (2, 3, 5, 0.05, None, SAMPLED[1]),  # rows stop at eta, at their cap, one finished
    (2, 3, 0, 0.05, None, SAMPLED[1]),  # a round without drafts
    (1, 4, 6, 0.02, list(range(0, 97, 3)), SAMPLED[2]),  # a draft vocabulary: q mapped back to the vocabulary
])
@pytest.mark.parametrize("int8", [True, False], ids=["int8-head", "exact-head"])
def test_sampled_chain_equals_the_step_by_step_path(dtype, exit_layer, batch, gamma, eta, draft_ids, sampling,
                                                    int8):
    """Sampled drafts: the round's uniforms drawn before drafting, so both paths draw the same drafts from the same
    distributions (the chain's q, mapped as the step path maps it), and accept the same."""
    rounds = _compare(dtype, exit_layer, batch, gamma, eta, draft_ids, False, rounds=4, sampling=sampling,
                      int8=int8)
    assert any(k > 0 for k, _, _ in rounds) if gamma > 0 else all(k == 0 for k, _, _ in rounds)


def test_chain_equals_the_step_by_step_path_above_64_rows():
    """bf16 batches of more than 64 rows: the draft head sees one token a row on both paths (ops.linear sends bf16
    inputs of more than 64 tokens to torch)."""
    _compare(torch.bfloat16, 1, 65, 3, 0.05, None, False, rounds=2)


def test_a_head_the_extension_cannot_read_goes_step_by_step():
    decoder = _decoder(torch.float32, 1, list(range(0, 97, 2)))
    decoder.draft_head.weight = decoder.draft_head.weight.t().contiguous().t()  # same values, column-major
    with torch.no_grad():
        state = _started_state(decoder, 2, 3, seed=2)
        chain = DraftChain.allocate(2, 3, decoder.target.config.hidden_size, torch.float32, state.pos.device)
        assert decoder._cpu_chain(state, chain, 3, 0.5, int(state.pos.max()) + 1) is None


def test_rope_tables_hold_the_bits_of_rope_at_each_position():
    for dtype in (torch.float32, torch.bfloat16):
        decoder = _decoder(dtype, 1)
        decoder.ensure_caches(2, 3000)
        cos, sin = decoder._rope_tables()
        positions = torch.randint(0, 3000, (5, 3), generator=torch.Generator().manual_seed(1))
        c, s = decoder.target.rope(positions)
        assert torch.equal(cos[positions], c) and torch.equal(sin[positions], s)
        assert decoder._rope_tables()[0] is cos  # kept while T, dtype and inv_freq are the same
        decoder.ensure_caches(2, 3500)  # the cache grows: so does the table
        assert decoder._rope_tables()[0].shape[0] == decoder.cache.max_len >= 3500


@contextlib.contextmanager
def torch_threads(n):
    """torch's thread count n within, the previous one after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_more_threads_than_cores_give_the_same_chains():
    """Threads that start late (5 on this machine's cores) claim what is left of each phase: the same bits."""
    with torch_threads(5):
        _compare(torch.bfloat16, 2, 4, 6, 0.09, list(range(0, 97, 3)), False)


def test_the_step_by_step_path_serves_where_the_chain_cannot():
    decoder = _decoder(torch.float32, 1)
    with torch.no_grad():
        state = _started_state(decoder, 2, 3, seed=2)
        chain = DraftChain.allocate(2, 3, decoder.target.config.hidden_size, torch.float32, state.pos.device)
        base_len = int(state.pos.max()) + 1
        state.sampler = RowSampling([(SamplingConfig(do_sample=True), None), None])
        assert decoder._cpu_chain(state, chain, 3, 0.5, base_len) is None  # no round's uniforms (begin_round)
        state.sampler = BatchSampling(SamplingConfig(), None)
        assert decoder._cpu_chain(state, chain, 3, 0.5, decoder.cache.max_len) is None  # past the cache
    with torch.enable_grad():  # no autograd in the extension's stacks
        assert decoder._cpu_chain(state, chain, 3, 0.5, base_len) is None


def test_a_token_outside_the_vocabulary_is_an_error_not_a_read_out_of_bounds():
    decoder = _decoder(torch.float32, 1)
    with torch.no_grad():
        state = _started_state(decoder, 1, 2, seed=4)
        state.token[0] = decoder.target.config.vocab_size
        chain = DraftChain.allocate(1, 2, decoder.target.config.hidden_size, torch.float32, state.pos.device)
        with pytest.raises(RuntimeError, match="status 1"):
            decoder._cpu_chain(state, chain, 2, 0.5, int(state.pos.max()) + 1)


def _chain_case(dtype):
    """Two rounds of the one-call chain on a batch of 3 (for test_cpu_ext's check across variants and thread
    counts): the exit states, drafts and caches."""
    decoder = _decoder(dtype, 2, list(range(0, 97, 2)))
    outs = []
    with torch.no_grad():
        state = _started_state(decoder, 3, 4, seed=6)
        for _ in range(2):
            chain = DraftChain.allocate(3, 4, decoder.target.config.hidden_size, dtype, state.pos.device)
            base_len = int(state.pos.max()) + 1
            k = decoder._cpu_chain(state, chain, 4, 0.02, base_len)
            outs += [chain.exits[:, :k + 1].clone(), chain.drafts.clone(), chain.conf.clone()]
            decoder.verify(state, chain, k, base_len + k)
    return outs + [decoder.cache.k, decoder.adapter_cache.v]
