"""Kangaroo decoding is lossless: greedy token equality and sampling in distribution."""
import itertools
import math

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.testing import agreeing_pair, random_target, tiny_config

N_PROMPTS = 50
MAX_NEW = 16


def _prompts(n, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (t,), generator=gen) for t in lengths]


def _batch(prompts):
    """Left-padded (B, T) ids and attention mask, as a transformers user would pass them."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _new_tokens(seqs, prompt_width, n_new):
    return seqs[:, prompt_width:prompt_width + n_new]


@pytest.fixture(scope="module")
def setups():
    cfg = tiny_config(num_layers=4)
    out = {}
    for exit_layer in (1, 2):
        target, agreeing = agreeing_pair(cfg, exit_layer)
        random_adapter = K.Adapter.random(cfg, seed=7, std=cfg.hidden_size ** -0.5)
        out[exit_layer] = (target, {"agreeing": agreeing, "random": random_adapter})
    return cfg, out


@pytest.fixture(scope="module")
def plain_greedy(setups):
    """Each prompt decoded alone with plain AR: the reference every Kangaroo run must equal."""
    cfg, models = setups
    prompts = _prompts(N_PROMPTS, cfg.vocab_size)
    refs = {}
    for exit_layer, (target, _) in models.items():
        m = K.KangarooModel(target, None, exit_layer=exit_layer)
        refs[exit_layer] = [K.generate(m, p[None], max_new_tokens=MAX_NEW, kangaroo=None)[0, len(p):]
                            for p in prompts]
    return prompts, refs


@pytest.mark.parametrize("exit_layer", [1, 2])
@pytest.mark.parametrize("adapter_kind", ["agreeing", "random"])
def test_greedy_lossless_matrix(setups, plain_greedy, exit_layer, adapter_kind):
    _, models = setups
    prompts, refs = plain_greedy
    target, adapters = models[exit_layer]
    model = K.KangarooModel(target, adapters[adapter_kind], exit_layer=exit_layer)
    total_rounds = total_tokens = 0
    for batch_size, gamma, eta in itertools.product((1, 3, 8), (1, 4, 6), (0.0, 0.6, 1.0)):
        kcfg = K.KangarooConfig(gamma=gamma, eta=eta)
        for start in range(0, N_PROMPTS, batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = _batch(chunk)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, kangaroo=kcfg,
                                 return_dict_in_generate=True)
            got = out.sequences[:, ids.shape[1]:]
            for i, ref in enumerate(refs[exit_layer][start:start + batch_size]):
                assert torch.equal(got[i], ref), (batch_size, gamma, eta, start + i)
            total_rounds += sum(out.rounds)
            total_tokens += sum(sum(a) for a in out.stats.accepted_lengths)
            assert all(max(d, default=0) <= gamma for d in out.stats.draft_lengths)
            if eta == 1.0:  # a top-1 probability is never >= 1 here: exactly one draft per round
                assert all(set(d) <= {0, 1} for d in out.stats.draft_lengths)
    mat = total_tokens / total_rounds
    # Acceptance must reflect the adapter: the agreeing one accepts far more than the random one.
    assert mat > (1.5 if adapter_kind == "agreeing" else 1.0)


def test_agreeing_adapter_accepts_more_than_random(setups, plain_greedy):
    _, models = setups
    prompts, _ = plain_greedy
    target, adapters = models[2]
    ids, mask = _batch(prompts[:8])
    mats = {}
    for kind, adapter in adapters.items():
        m = K.KangarooModel(target, adapter, exit_layer=2)
        out = m.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                         kangaroo=K.KangarooConfig(gamma=6, eta=0.0), return_dict_in_generate=True)
        mats[kind] = out.stats.summary()["mat"]
    assert mats["agreeing"] > mats["random"] + 0.5, mats


def test_full_acceptance_and_catch_up():
    """An adapter that is the target itself (1-layer target, exit 1... emulated by a deep-identity target)."""
    cfg = tiny_config(num_layers=3)
    target, adapter = agreeing_pair(cfg, 2, deep_scale=0.0)  # layers >= 2 do nothing: drafts always agree
    model = K.KangarooModel(target, adapter, exit_layer=2)
    model.decoder.draft_int8 = False  # (the int8 draft head's estimates can part from the head's at near ties)
    ids = torch.randint(0, cfg.vocab_size, (3, 7))
    ref = model.generate(ids, max_new_tokens=30, kangaroo=None)
    out = model.generate(ids, max_new_tokens=30, kangaroo=K.KangarooConfig(gamma=4, eta=0.0),
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    # Every round accepts all 4 drafts plus the bonus, except the last one capped by max_new_tokens.
    for row in out.stats.accepted_lengths:
        assert row[:-1] == [5] * (len(row) - 1)
    assert out.acceptance_by_position == [1.0, 1.0, 1.0, 1.0]


def test_exact_max_new_tokens_and_eos():
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 2)
    ids = torch.randint(0, cfg.vocab_size, (4, 6), generator=torch.Generator().manual_seed(3))
    plain = K.KangarooModel(target, adapter, exit_layer=2)
    ref = plain.generate(ids, max_new_tokens=20, kangaroo=None)
    for n in (1, 2, 7, 20):
        out = plain.generate(ids, max_new_tokens=n, kangaroo=K.KangarooConfig(gamma=6, eta=0.0))
        assert out.shape == (4, 6 + n)
        assert torch.equal(out, ref[:, :6 + n])
    # EOS: pick a token the reference emits mid-way in row 0; every row stops right after its first EOS.
    eos = int(ref[0, 6 + 5])
    out = plain.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=-1,
                         kangaroo=K.KangarooConfig(gamma=6, eta=0.0))
    ref_eos = plain.generate(ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=-1, kangaroo=None)
    assert torch.equal(out, ref_eos)
    first = (ref[0, 6:] == eos).nonzero()[0].item()
    assert out[0, 6 + first] == eos and bool((out[0, 6 + first + 1:] == -1).all())


def _speculated_tokens_counts(model, prompt, n_tokens, kangaroo, samples, seed, extra=0, **sampling):
    """Counts of the joint values of new tokens 2..n_tokens+1 over ``samples`` rows. The first new token
    comes from the prefill, before any draft: it is left out, and the tokens counted are the ones a round
    drafts and verifies (with max_new_tokens 2 a round would have one token left and draft nothing). ``extra``
    more tokens are generated and not counted, so that the first round may draft past the counted ones."""
    counts = {}
    ids = prompt[None].expand(samples, -1)
    out = model.generate(ids, max_new_tokens=n_tokens + 1 + extra, do_sample=True, kangaroo=kangaroo, seed=seed,
                         ignore_eos=True, **sampling)
    for row in out[:, prompt.shape[0] + 1:prompt.shape[0] + 1 + n_tokens].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def _chi_square_p(counts_a, counts_b):
    """Two-sample chi-square test of homogeneity; returns the p-value (scipy)."""
    from scipy.stats import chi2_contingency
    keys = sorted(set(counts_a) | set(counts_b))
    table = [[counts_a.get(k, 0) for k in keys], [counts_b.get(k, 0) for k in keys]]
    return chi2_contingency(table)[1]


@pytest.mark.parametrize("draft_ids", [None, [0, 2, 3, 6]], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampling_matches_target_distribution(sampling, draft_ids):
    # Tiny vocabulary so that the joint distribution of the 2 speculated tokens has few cells.
    cfg = tiny_config(vocab_size=8, num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                      intermediate_size=64)
    target = random_target(cfg, seed=5)
    # An adapter that disagrees often, so that rejections and residual sampling are exercised. With a draft
    # vocabulary q lives on 4 of the 8 tokens: the other 4 reach the output only through the residual.
    adapter = K.Adapter.random(cfg, seed=11, std=cfg.hidden_size ** -0.5)
    adapter.set_draft_vocab(None if draft_ids is None else torch.tensor(draft_ids))
    model = K.KangarooModel(target, adapter, exit_layer=1)
    prompt = torch.tensor([1, 2, 3])
    samples = 3000
    plain = _speculated_tokens_counts(model, prompt, 2, None, samples, seed=1, **sampling)
    spec = _speculated_tokens_counts(model, prompt, 2, K.KangarooConfig(gamma=3, eta=0.0), samples, seed=2, **sampling)
    p_value = _chi_square_p(plain, spec)
    assert p_value > 1e-3, (p_value, plain, spec)


def test_sampling_matches_target_distribution_over_drafting_steps():
    """Three counted tokens after rounds that may draft 3 and more: the draft steps past the first, each with its own
    uniform, and the next round's, are in the joint distribution too."""
    cfg = tiny_config(vocab_size=8, num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                      intermediate_size=64)
    model = K.KangarooModel(random_target(cfg, seed=5), K.Adapter.random(cfg, seed=11, std=cfg.hidden_size ** -0.5),
                            exit_layer=1)
    prompt = torch.tensor([1, 2, 3])
    plain = _speculated_tokens_counts(model, prompt, 3, None, 6000, seed=1, extra=2, temperature=1.0)
    spec = _speculated_tokens_counts(model, prompt, 3, K.KangarooConfig(gamma=4, eta=0.0), 6000, seed=2, extra=2,
                                     temperature=1.0)
    p_value = _chi_square_p(plain, spec)
    assert p_value > 1e-3, p_value


@pytest.mark.parametrize("path", ["step_by_step", "one_call_chain"])
def test_sampling_check_catches_a_wrong_draft_distribution(monkeypatch, path):
    """The check above has power over the speculative path: acceptance fed a q other than the one the drafts
    were sampled from (shifted by one token) changes the output distribution, and the test sees it; on the
    step-by-step drafting path and on the CPU extension's one-call chain (which the sampled rounds take when built).
    (The one-call loop, which the rounds take by default, gives these paths' tokens bit for bit:
    test_greedy_decode.)"""
    from kangaroo_rt import _cpu_ext
    from kangaroo_rt.speculative import Decoder

    cfg = tiny_config(vocab_size=8, num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                      intermediate_size=64)
    model = K.KangarooModel(random_target(cfg, seed=5), K.Adapter.random(cfg, seed=11, std=cfg.hidden_size ** -0.5),
                            exit_layer=1)
    prompt = torch.tensor([1, 2, 3])
    plain = _speculated_tokens_counts(model, prompt, 2, None, 3000, seed=1, temperature=1.0)
    monkeypatch.setattr(Decoder, "_cpu_decode", lambda *args: None)  # rounds one at a time, through the paths below
    if path == "step_by_step":
        propose = Decoder.propose

        def wrong_q(self, hidden, sampler, active, step=0):
            token, conf, q = propose(self, hidden, sampler, active, step)
            return token, conf, None if q is None else q.roll(1, dims=-1)

        monkeypatch.setattr(Decoder, "_cpu_chain", lambda *args: None)
        monkeypatch.setattr(Decoder, "propose", wrong_q)
    else:
        if not _cpu_ext.is_available():
            pytest.skip("kangaroo_rt._cpu is not built")
        chain_round = Decoder._cpu_chain
        calls = []

        def wrong_chain_q(self, state, chain, *args):
            k = chain_round(self, state, chain, *args)
            if k is not None:
                calls.append(k)
                chain.probs[:] = [q.roll(1, dims=-1) for q in chain.probs]
            return k

        monkeypatch.setattr(Decoder, "_cpu_chain", wrong_chain_q)
    spec = _speculated_tokens_counts(model, prompt, 2, K.KangarooConfig(gamma=3, eta=0.0), 3000, seed=2,
                                     temperature=1.0)
    assert path == "step_by_step" or any(k >= 1 for k in calls)
    assert _chi_square_p(plain, spec) < 1e-3


def test_sampling_detects_a_wrong_distribution():
    """The chi-square check has power: plain sampling at two temperatures is told apart."""
    cfg = tiny_config(vocab_size=8, num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                      intermediate_size=64)
    model = K.KangarooModel(random_target(cfg, seed=5), None, exit_layer=1)
    prompt = torch.tensor([1, 2, 3])
    a = _speculated_tokens_counts(model, prompt, 2, None, 3000, seed=1, temperature=1.0)
    b = _speculated_tokens_counts(model, prompt, 2, None, 3000, seed=2, temperature=0.6)
    assert _chi_square_p(a, b) < 1e-3


def test_sampling_seeded_reproducible():
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 2)
    model = K.KangarooModel(target, adapter, exit_layer=2)
    ids = torch.randint(0, cfg.vocab_size, (3, 5))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.95, seed=123)
    a, b = model.generate(ids, **kw), model.generate(ids, **kw)
    assert torch.equal(a, b)
    c = model.generate(ids, **{**kw, "seed": 124})
    assert not torch.equal(a, c)


def test_rows_do_not_depend_on_each_other_under_sampling_greedy_mix():
    """temperature=0 with do_sample=True is greedy, and equals plain greedy."""
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 1)
    model = K.KangarooModel(target, adapter, exit_layer=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    ref = model.generate(ids, max_new_tokens=10, kangaroo=None)
    out = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.0)
    assert torch.equal(ref, out)


def test_stats_are_consistent():
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 2)
    model = K.KangarooModel(target, adapter, exit_layer=2, kangaroo=K.KangarooConfig(gamma=5, eta=0.6))
    ids = torch.randint(0, cfg.vocab_size, (3, 6))
    out = model.generate(ids, max_new_tokens=25, return_dict_in_generate=True)
    s = out.stats
    for r in range(3):
        # The first token comes from the prefill; every other token from a round.
        assert sum(s.accepted_lengths[r]) + 1 == s.new_tokens[r] == 25
        assert len(s.accepted_lengths[r]) == s.rounds[r] == len(s.draft_lengths[r])
        assert all(1 <= a <= d + 1 for a, d in zip(s.accepted_lengths[r], s.draft_lengths[r]))
    summary = s.summary()
    assert math.isclose(summary["mat"], sum(map(sum, s.accepted_lengths)) / sum(s.rounds))
    assert sum(summary["accepted_length_histogram"].values()) == sum(s.rounds)
    acc = summary["acceptance_by_position"]
    assert len(acc) == 5 and all(a is None or 0.0 <= a <= 1.0 for a in acc) and acc[0] is not None
    assert 0.0 < summary["draft_time_fraction"] < 1.0
    assert out.draft_steps == [sum(d) for d in s.draft_lengths]
    assert s.mat == [sum(a) / len(a) for a in s.accepted_lengths]
    # The same rounds counted without history (the engine's totals) give the same totals and keep no lists.
    totals = K.DecodeStats.empty(3, 5, history=False)
    for i in range(max(s.rounds)):
        per_row = [(r, s.accepted_lengths[r][i], s.draft_lengths[r][i]) for r in range(3) if i < s.rounds[r]]
        active, committed, drafts, accepted = [0] * 3, [0] * 3, [0] * 3, [0] * 3
        for r, a, d in per_row:
            active[r], committed[r], drafts[r], accepted[r] = 1, a, d, a - 1
        totals.add_round(active, committed, drafts, accepted)
    assert totals.accepted_lengths == totals.draft_lengths == [[], [], []]
    assert (totals.rounds, totals.committed, totals.drafted) == (s.rounds, s.committed, s.drafted)
    assert totals.position_attempts == s.position_attempts and totals.position_accepts == s.position_accepts
    assert {k: v for k, v in totals.summary().items() if "time" not in k and k != "new_tokens"} == \
        {k: v for k, v in summary.items() if "time" not in k and k != "new_tokens"}


class _Recorder:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_tokens():
    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 2)
    model = K.KangarooModel(target, adapter, exit_layer=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    rec = _Recorder()
    out = model.generate(ids, max_new_tokens=15, streamer=rec)
    assert rec.ended and torch.equal(rec.chunks[0], ids)
    assert torch.equal(torch.cat([c.flatten() for c in rec.chunks[1:]]), out[0, 6:])
    assert len(rec.chunks) > 2


def test_works_with_transformers_text_streamer(capsys):
    from transformers import TextStreamer

    class _Tok:
        def decode(self, ids, **kw):
            return "".join(chr(65 + (int(i) % 26)) for i in ids)

    cfg = tiny_config(num_layers=4)
    target, adapter = agreeing_pair(cfg, 2)
    model = K.KangarooModel(target, adapter, exit_layer=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    out = model.generate(ids, max_new_tokens=10, streamer=TextStreamer(_Tok(), skip_prompt=True))
    printed = capsys.readouterr().out.strip()
    assert printed == _Tok().decode(out[0, 4:])


def test_greedy_tokens_is_argmax_with_its_first_index_on_ties_in_every_dtype():
    from kangaroo_rt.speculative import greedy_tokens

    logits = torch.randn(3, 5, 1000).round(decimals=1)  # many exact ties at the maximum
    logits[0, 0, [7, 300, 999]] = 50.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = logits.to(dtype)
        assert torch.equal(greedy_tokens(x), x.argmax(dim=-1)), dtype
    assert greedy_tokens(logits.bfloat16())[0, 0] == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_made_under_inference_mode_decodes_as_one_made_outside(dtype):
    """Inference tensors keep no version counter (torch raises on ``_version``): the caches keyed by versions
    (fused projections, call plans, bf16 packed copies, RoPE tables) take them as unchanging, so a model made or
    loaded under ``torch.inference_mode`` decodes, in and out of that mode, the tokens of one made outside."""
    cfg = tiny_config(num_layers=4)
    kcfg = K.KangarooConfig(gamma=4, eta=0.2)
    ids = torch.tensor([[5, 9, 13, 2]])

    def make():
        target, adapter = agreeing_pair(cfg, exit_layer=2, seed=0)
        return K.KangarooModel(target.to(dtype), adapter.to(dtype), exit_layer=2, max_len=64)

    ref = make()
    want = [ref.generate(ids, max_new_tokens=12, kangaroo=k).tolist() for k in (None, kcfg)]
    with torch.inference_mode():
        model = make()
        assert model.target.layers[0].self_attn.q_proj.weight.is_inference()
        inside = [model.generate(ids, max_new_tokens=12, kangaroo=k).tolist() for k in (None, kcfg)]
    outside = [model.generate(ids, max_new_tokens=12, kangaroo=k).tolist() for k in (None, kcfg)]
    assert inside == outside == want
