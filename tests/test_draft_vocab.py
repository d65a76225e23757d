"""Drafting over a frequent-token vocabulary: the id list, its file, the gathered head, and losslessness
(greedy equality for several K, batches, the Engine; the emulated CUDA-graph rounds are in
tests/test_graphs_emulated.py)."""
import copy
import json

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt import draft_vocab, ops
from kangaroo_rt.engine import RequestParams
from kangaroo_rt.testing import agreeing_pair, random_target, tiny_config

VOCAB = 97


@pytest.mark.parametrize("ids, match", [
    ([3, 2, 5], "sorted and unique; index 1 holds 2 after 3"),
    ([1, 4, 4], "sorted and unique"),
    ([0, 5, VOCAB], f"id {VOCAB} at index 2 is outside the vocabulary"),
    ([-1, 5], "id -1 at index 0 is outside"),
    ([], "non-empty 1-D integer"),
    ([[1, 2]], "non-empty 1-D integer"),
    ([0.0, 1.0], "non-empty 1-D integer"),
])
def test_bad_id_lists_are_refused(ids, match):
    with pytest.raises(ValueError, match=match):
        draft_vocab.check_ids(torch.tensor(ids), VOCAB)


def test_from_counts_keeps_the_frequent_and_the_always_included():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[7, 3, 5, 1]] = torch.tensor([50, 40, 40, 1])
    assert draft_vocab.from_counts(counts, 3).tolist() == [3, 5, 7]
    assert draft_vocab.from_counts(counts, 3, always=[9]).tolist() == [3, 7, 9]  # 5 loses the 40-40 tie to 3
    assert draft_vocab.from_counts(counts, 6).tolist() == [0, 1, 2, 3, 5, 7]  # zero counts: lowest ids first
    with pytest.raises(ValueError, match="smaller than the 2 ids"):
        draft_vocab.from_counts(counts, 1, always=[0, 9])
    with pytest.raises(ValueError, match=r"size must be in \[1, 10\]"):
        draft_vocab.from_counts(counts, 11)
    assert draft_vocab.count_tokens([[1, 1, 3], [], [3]], 5).tolist() == [0, 2, 0, 2, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        draft_vocab.count_tokens([[5]], 5)


@pytest.mark.parametrize("tied", [False, True])
def test_draft_head_gathers_rows_once_and_maps_back(tied):
    cfg = tiny_config(vocab_size=VOCAB, tie_word_embeddings=tied)
    target = random_target(cfg, seed=1)
    ids = torch.tensor([0, 2, 9, 40, 96])
    head = draft_vocab.DraftHead(target.lm_head.weight, ids)
    assert head.weight.is_contiguous() and head.weight.shape == (5, cfg.hidden_size)
    assert head.weight.data_ptr() != target.lm_head.weight.data_ptr()
    h = torch.randn(3, cfg.hidden_size)
    with torch.no_grad():  # the same op as the head (on CPU the extension's kernel: a row's bits whatever N)
        assert torch.equal(head(h), ops.linear(h, target.lm_head.weight)[:, ids])
    assert head.full_ids(torch.tensor([4, 0, 2])).tolist() == [96, 0, 9]
    q = torch.softmax(torch.randn(3, 5), dim=-1)
    full = head.full_probs(q)
    assert full.shape == (3, VOCAB) and torch.equal(full[:, ids], q) and full.sum().item() == pytest.approx(3.0)


def test_adapter_folder_round_trip_and_strict_loading(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB)
    adapter = K.Adapter.random(cfg, seed=3)
    adapter.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / draft_vocab.FILE).exists()  # the official format, unchanged
    assert K.Adapter.from_pretrained(tmp_path / "plain", cfg).draft_ids is None

    ids = torch.tensor([1, 5, 6, 50])
    adapter.set_draft_vocab(ids, source="unit test")
    adapter.save_pretrained(tmp_path / "vocab")
    config = json.loads((tmp_path / "vocab" / "config.json").read_text())
    assert config["draft_vocab_size"] == 4 and config["draft_vocab_source"] == "unit test"
    loaded = K.Adapter.from_pretrained(tmp_path / "vocab", cfg)
    assert loaded.draft_ids.tolist() == ids.tolist() and loaded.draft_vocab_source == "unit test"
    assert "draft_ids" not in loaded.state_dict()  # the weights file keeps exactly the official keys

    config["draft_vocab_size"] = 5
    (tmp_path / "vocab" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds 4 ids but config.json says draft_vocab_size=5"):
        K.Adapter.from_pretrained(tmp_path / "vocab", cfg)
    config["draft_vocab_size"] = 4
    (tmp_path / "vocab" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    save_file({"ids": torch.tensor([1, 6, 5, 50])}, str(tmp_path / "vocab" / draft_vocab.FILE))
    with pytest.raises(ValueError, match="sorted and unique"):
        K.Adapter.from_pretrained(tmp_path / "vocab", cfg)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        adapter.set_draft_vocab(torch.tensor([3, VOCAB + 1]))


def _prompts(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(t),), generator=gen) for t in torch.randint(3, 12, (n,), generator=gen)]


@pytest.fixture(scope="module")
def pair():
    """(target, agreeing adapter, prompts, plain greedy sequences (1, T + 14) of each prompt)."""
    cfg = tiny_config(vocab_size=VOCAB, num_layers=4)
    target, adapter = agreeing_pair(cfg, exit_layer=1)
    prompts = _prompts(12)
    plain = K.KangarooModel(target, None)
    refs = [plain.generate(p[None], max_new_tokens=14, kangaroo=None) for p in prompts]
    return target, adapter, prompts, refs


def _with_vocab(pair, k):
    """A copy of the pair's adapter drafting over the K ids the target itself emits most on the prompts
    (what a real vocabulary file holds)."""
    _, base, prompts, refs = pair
    emitted = [ref[0, len(p):].tolist() for p, ref in zip(prompts, refs)]
    ids = draft_vocab.from_counts(draft_vocab.count_tokens(emitted, VOCAB), k)
    return copy.deepcopy(base).set_draft_vocab(ids)


@pytest.mark.parametrize("k", [1, 8, 32, VOCAB])
def test_greedy_equals_plain_for_any_draft_vocabulary(pair, k):
    target, _, prompts, refs = pair
    adapter = _with_vocab(pair, k)
    model = K.KangarooModel(target, adapter, exit_layer=1, kangaroo=K.KangarooConfig(gamma=4, eta=0.0))
    proposed = []
    for p, ref in zip(prompts, refs):
        out = model.generate(p[None], max_new_tokens=14, return_dict_in_generate=True)
        assert out.sequences.tolist() == ref.tolist()
        proposed.append(sum(out.stats.draft_lengths[0]))
    assert sum(proposed) > 0


def test_drafts_come_only_from_the_subset(pair):
    """Every drafted id is in the vocabulary: the draft step never proposes a token outside it. Seen on the
    step-by-step path (the one-call draft chain turned off); tests/test_draft_chain.py checks that the chain drafts
    what that path does, draft vocabularies included."""
    target, _, prompts, _ = pair
    adapter = _with_vocab(pair, 6)
    ids = adapter.draft_ids
    model = K.KangarooModel(target, adapter, exit_layer=1, kangaroo=K.KangarooConfig(gamma=4, eta=0.0))
    model.decoder._chain_inputs = lambda *args: None  # (an instance attribute shadows the method)
    seen = []
    original = model.decoder.propose

    def spy(*args, **kwargs):
        token, conf, q = original(*args, **kwargs)
        seen.extend(token.tolist())
        return token, conf, q

    model.decoder.propose = spy
    for p in prompts[:4]:
        model.generate(p[None], max_new_tokens=10)
    assert seen and set(seen) <= set(ids.tolist())


def test_batches_and_the_engine_with_a_draft_vocabulary(pair):
    """(The CUDA-graph rounds with a draft vocabulary: tests/test_graphs_emulated.py.)"""
    target, _, prompts, refs = pair
    adapter = _with_vocab(pair, 16)
    kcfg = K.KangarooConfig(gamma=3, eta=0.3)
    model = K.KangarooModel(target, adapter, exit_layer=1, kangaroo=kcfg)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=14, pad_token_id=0)
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        assert out[i, width:].tolist()[:ref.shape[1] - len(p)] == ref[0, len(p):].tolist()

    engine = K.Engine(model, max_batch=4, max_len=64)
    keys = {engine.add_request(p.tolist(), RequestParams(max_new_tokens=14)): i for i, p in enumerate(prompts[:6])}
    got = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(keys[out.request_id], []).extend(out.new_token_ids)
    for i, (p, ref) in enumerate(zip(prompts[:6], refs)):
        assert got[i] == ref[0, len(p):].tolist()


def test_cli_builds_a_vocabulary_from_the_answers_of_the_training_data(tmp_path):
    from kangaroo_rt.cli import main
    from tiny_tokenizer import make_tokenizer

    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    cfg = tiny_config(vocab_size=len(tok))
    K.Adapter.random(cfg).save_pretrained(tmp_path / "adapter")
    answer = "the quick brown fox jumps over the lazy dog"
    rows = [{"conversations": [{"from": "human", "value": f"tell me a joke number {i}"},
                               {"from": "gpt", "value": answer}]} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["draft-vocab", "--adapter", str(tmp_path / "adapter"), "--data", str(tmp_path / "data.jsonl"),
                 "--tokenizer", str(tmp_path / "tok"), "--size", "40", "--template", "vicuna"]) == 0
    loaded = K.Adapter.from_pretrained(tmp_path / "adapter", cfg)
    ids = set(loaded.draft_ids.tolist())
    assert len(ids) == 40 and {tok.eos_token_id, tok.bos_token_id} <= ids
    counts = draft_vocab.load_counts(tmp_path / "adapter")
    counted = set(counts.nonzero().flatten().tolist())
    assert counted <= ids and counts.sum() % 4 == 0  # 4 identical answers (+ EOS); every counted token kept
    assert draft_vocab.resize(tmp_path / "adapter", 40).tolist() == sorted(ids)  # derived as it was built
    smaller = set(draft_vocab.resize(tmp_path / "adapter", 6).tolist())
    assert len(smaller) == 6 and {tok.eos_token_id, tok.bos_token_id} <= smaller
    prompt_only = set(tok(" joke number", add_special_tokens=False)["input_ids"]) - set(
        tok(" " + answer, add_special_tokens=False)["input_ids"])
    assert prompt_only and not prompt_only & counted  # prompts are not counted, only answers
