"""The multi-exit top-k dump (kangaroo_rt.train.topk), its loss, training from it, and the MLP adapter variant."""
import json
import os

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.adapter import ADAPTER_KEYS, MLP_KEYS
from kangaroo_rt.train.states import pad_batch, target_states
from kangaroo_rt.train.topk import TopKDump, dump_topk, read_index, topk_loss
from kangaroo_rt.train.trainer import TrainConfig, Trainer
from train_fixtures import Ex, make_problem


@pytest.fixture(scope="module")
def problem():
    return make_problem(n_train=48, n_held=8)


def _dump(problem, folder, exits=(1, 2), k=5, shard_tokens=100, **kw):
    target, _, source, _ = problem
    return dump_topk(target, source.examples, str(folder), exits, k=k, shard_tokens=shard_tokens, progress=False, **kw)


def test_dump_holds_every_exit_and_the_targets_topk(problem, tmp_path):
    target, _, source, _ = problem
    index = _dump(problem, tmp_path)
    assert len(index["shards"]) == index["num_shards"] > 1
    for exit_layer in (1, 2):
        dump = TopKDump(str(tmp_path), exit_layer)
        assert len(dump) == len(source.examples)
        for i in (0, 7, len(dump) - 1):
            e = source.examples[i]
            ids, mask = pad_batch([e], target.device)
            exit_hidden, final = target_states(target, exit_layer, ids)
            b = dump.batch([i])
            # stored in bf16; a batch of other lengths may round a state to the neighbouring bf16 value
            torch.testing.assert_close(b["exit"][0], exit_hidden[0].float(), atol=1e-2, rtol=1e-2)
            assert torch.equal(b["mask"][0], mask[0])
            logp = torch.log_softmax(target.head(final[0]).float(), -1)
            values, top = logp.topk(5, -1)
            assert torch.equal(b["topk_ids"][0], top)
            torch.testing.assert_close(b["topk_logp"][0], values.half().float(), atol=4e-3, rtol=1e-3)


def test_a_grown_set_extends_its_dump(problem, tmp_path):
    """More examples appended to a finished dump's set get shards of their own after the old ones (which stay,
    bytes and all); the extension resumes like any dump, and the result reads as a dump of the whole set."""
    target, _, source, _ = problem
    examples = source.examples
    first = dump_topk(target, examples[:30], str(tmp_path), (1, 2), k=5, shard_tokens=100, progress=False)
    old_shards = dict(first["shards"])
    stamps = {n: os.path.getmtime(tmp_path / n) for n in old_shards}
    part = dump_topk(target, examples, str(tmp_path), (1, 2), k=5, shard_tokens=100, progress=False,
                     stop_after_s=0.0)
    assert len(old_shards) < len(part["shards"]) < part["num_shards"] and part["segments"] == [0, 30]
    grown = dump_topk(target, examples, str(tmp_path), (1, 2), k=5, shard_tokens=100, progress=False)
    assert len(grown["shards"]) == grown["num_shards"] and grown["num_examples"] == len(examples)
    assert all(grown["shards"][n] == old_shards[n] and os.path.getmtime(tmp_path / n) == stamps[n]
               for n in old_shards)
    whole = _dump(problem, tmp_path / "whole")
    for exit_layer in (1, 2):
        a, b = TopKDump(str(tmp_path), exit_layer), TopKDump(str(tmp_path / "whole"), exit_layer)
        assert a.lengths == b.lengths and torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
        # other batches of the same examples: the sorted top-k values agree (ids may swap at exact ties)
        torch.testing.assert_close(a.topk_logp.float(), b.topk_logp.float(), atol=1e-2, rtol=0)
    assert whole["num_shards"] > 0
    with pytest.raises(ValueError, match="fingerprint"):  # not an extension: a changed example
        changed = list(examples[:10]) + [Ex(examples[10].input_ids[:-1], examples[10].loss_mask[:-1])] + list(examples[11:])
        dump_topk(target, changed, str(tmp_path), (1, 2), k=5, shard_tokens=100, progress=False)
    with pytest.raises(ValueError, match="num_examples"):  # fewer examples
        dump_topk(target, examples[:20], str(tmp_path), (1, 2), k=5, shard_tokens=100, progress=False)


def test_dump_resumes_and_refuses_other_settings(problem, tmp_path):
    first = _dump(problem, tmp_path, stop_after_s=0.0)  # stops before its second shard
    assert 1 == len(first["shards"]) < first["num_shards"]
    with pytest.raises(ValueError, match="incomplete"):
        TopKDump(str(tmp_path), 1)
    assert len(TopKDump(str(tmp_path), 1, complete=False)) < len(problem[2].examples)
    done = _dump(problem, tmp_path)
    assert len(done["shards"]) == done["num_shards"]
    with pytest.raises(ValueError, match="k differ"):
        _dump(problem, tmp_path, k=4)
    with pytest.raises(ValueError, match="exit layers"):
        TopKDump(str(tmp_path), 3)
    with pytest.raises(ValueError, match="exit layers must be"):
        _dump(problem, tmp_path / "other", exits=(4,))
    with open(tmp_path / "index.json") as f:
        assert json.load(f)["exits"] == [1, 2]
    with pytest.raises(FileNotFoundError):
        read_index(str(tmp_path / "missing"))


def test_topk_loss_top1_is_cross_entropy_on_the_argmax_through_the_subset_head():
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(10, 4, generator=gen)
    y = torch.randn(1, 3, 4, generator=gen)
    mask = torch.tensor([[True, True, False]])
    ids = torch.tensor([[[2, 5], [7, 1], [0, 3]]])
    logp = torch.log(torch.tensor([[[0.6, 0.3], [0.5, 0.4], [0.9, 0.1]]]))
    total, n, agree = topk_loss(head, y, mask, ids, logp, labels="top1")
    logits = y[0, :2] @ head.T
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 7]), reduction="sum")
    torch.testing.assert_close(total, expected)
    assert int(n) == 2 and int(agree) == int((logits.argmax(-1) == torch.tensor([2, 7])).sum())
    draft = torch.tensor([1, 2, 5])  # 7 is outside: that position carries no loss and counts as a miss
    total, n, agree = topk_loss(head, y, mask, ids, logp, draft_ids=draft, labels="top1")
    sub = y[0, :1] @ head[draft].T
    torch.testing.assert_close(total, torch.nn.functional.cross_entropy(sub, torch.tensor([1]), reduction="sum"))
    assert int(n) == 2 and int(agree) == int(sub.argmax(-1).item() == 1)
    soft, _, _ = topk_loss(head, y, mask, ids, logp, draft_ids=draft, labels="soft")
    # position 0: both of 2 and 5 inside (p renormalized 2/3, 1/3); position 1: only 1 inside (p = 1)
    q0 = torch.log_softmax(sub[0], -1)
    q1 = torch.log_softmax(y[0, 1] @ head[draft].T, -1)
    expected = -(2 / 3 * q0[1] + 1 / 3 * q0[2]) - q1[0]
    torch.testing.assert_close(soft, expected)


@pytest.mark.parametrize("mlp", [False, True])
def test_training_from_a_topk_dump_raises_dev_agreement(problem, tmp_path, mlp):
    target, adapter, source, held = problem
    adapter = K.Adapter.random(target.config, seed=3, std=target.config.hidden_size ** -0.5, mlp=mlp)
    with torch.no_grad():
        adapter.norm.weight.copy_(torch.randn(target.config.hidden_size, generator=torch.Generator().manual_seed(5)))
    dump_topk(target, source.examples, str(tmp_path / "train"), [2], k=4, progress=False)
    dump_topk(target, held, str(tmp_path / "dev"), [2], k=4, progress=False)
    train, dev = TopKDump(str(tmp_path / "train"), 2), TopKDump(str(tmp_path / "dev"), 2)
    cfg = TrainConfig(steps=120, micro_batch=8, lr=1e-2, warmup_steps=10, labels="top1", clip="norm", clip_value=1.0,
                      out_dir=str(tmp_path / "run"), dev_every=60, log_every=60, progress=False)
    trainer = Trainer(target, adapter, 2, train, cfg, dev_source=dev)
    before = trainer.dev_top1()
    log = trainer.train()
    curve = [r for r in log if "dev_top1" in r]
    assert [r["step"] for r in curve] == [60, 120]
    per_step = [sum(train.weight(i) for i in trainer._global_indices(s)) for s in range(120)]
    assert curve[-1]["token_updates"] == trainer.token_updates == sum(per_step)
    chance = 1 / target.config.vocab_size
    assert before < 3 * chance and curve[-1]["dev_top1"] > 6 * chance, (before, curve)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["token_updates"] == trainer.token_updates > 0


def test_mlp_adapter_roundtrips_strictly_and_decodes_losslessly(problem, tmp_path):
    target, _, _, held = problem
    adapter = K.Adapter.random(target.config, seed=1, mlp=True)
    assert set(adapter.state_dict()) == set(ADAPTER_KEYS + MLP_KEYS) == set(adapter.keys)
    adapter.save_pretrained(tmp_path / "a")
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["kangaroo_adapter_mlp"] is True
    loaded = K.Adapter.from_pretrained(tmp_path / "a", target.config)
    assert loaded.mlp and all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(),
                                                                 loaded.state_dict().values()))
    plain = K.Adapter.random(target.config, seed=1)
    plain.save_pretrained(tmp_path / "p")
    assert not K.Adapter.from_pretrained(tmp_path / "p", target.config).mlp
    # the MLP keys without the flag (or the flag without the keys) is a strict-load error naming them
    tensors = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True)
    torch.save(tensors, tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected tensors: layers.0.mlp.down_proj.weight"):
        K.Adapter.from_pretrained(tmp_path / "p", target.config)
    ids = torch.tensor([held[0].input_ids[:6]])
    model = K.KangarooModel(target, loaded, exit_layer=2)
    plain_out = model.generate(ids, max_new_tokens=12, kangaroo=None, ignore_eos=True)
    spec = model.generate(ids, max_new_tokens=12, kangaroo=K.KangarooConfig(gamma=3, eta=0.0), ignore_eos=True)
    assert torch.equal(plain_out, spec)
    # decode-time forward equals the training forward
    from kangaroo_rt.reference import rope_cos_sin
    x = torch.randn(1, 5, target.config.hidden_size)
    pos = torch.arange(5).unsqueeze(0)
    cos, sin = rope_cos_sin(pos, target.inv_freq, torch.float32)
    cache = loaded.new_cache(1, 8)
    torch.testing.assert_close(loaded(x, pos, cos, sin, cache, kv_len=5), loaded.forward_train(x, cos, sin))
