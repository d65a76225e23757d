"""Adapter training: learning, exact resume, torchrun DDP equivalence, offline dump, export."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.train.loss import distill_loss
from kangaroo_rt.train.states import Dumped, dump_states
from kangaroo_rt import ops, reference
from kangaroo_rt.train import trainer as trainer_module
from kangaroo_rt.train.trainer import TrainConfig, Trainer, export_adapter, local_device, lr_factor
from train_fixtures import make_problem

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _agreement(target, adapter, source):
    with torch.no_grad():
        b = source.batch(list(range(len(source))))
        total, n, agree = distill_loss(target, adapter, b["exit"], b["final"], b["mask"])
    return float(total / n), int(agree) / int(n)


def test_training_raises_agreement_and_mat():
    torch.manual_seed(0)
    target, adapter, source, held = make_problem()
    from kangaroo_rt.train.states import OnTheFly
    held_source = OnTheFly(target, 2, held)
    cfg = TrainConfig(steps=300, micro_batch=8, lr=1e-2, warmup_steps=10, clip="norm", clip_value=1.0,
                      progress=False, log_every=100, eval_every=300)
    trainer = Trainer(target, adapter, 2, source, cfg, eval_prompts=[e.input_ids[:4] for e in held])
    loss0, top1_0 = _agreement(target, adapter, held_source)
    mat0 = trainer.evaluate()["eval_mat"]
    log = trainer.train()
    loss1, top1_1 = _agreement(target, adapter, held_source)
    mat1 = log[-1]["eval_mat"]
    chance = 1 / 64
    assert top1_0 < 3 * chance  # the scrambled adapter starts near chance
    assert top1_1 > 10 * chance, (top1_0, top1_1)
    assert loss1 < loss0 * 0.6
    assert mat1 > mat0 + 0.2, (mat0, mat1)
    assert [r["step"] for r in log if "loss" in r] == [100, 200, 300]


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5) and lr_factor(110, cfg) == pytest.approx(0.0)
    lin = TrainConfig(steps=110, warmup_steps=10, schedule="linear")
    assert lr_factor(60, lin) == pytest.approx(0.5)
    assert lr_factor(50, TrainConfig(steps=110, warmup_steps=0, schedule="constant")) == 1.0


@pytest.mark.parametrize("bad", [dict(steps=0), dict(schedule="step"), dict(clip="max"), dict(amp="int8"), dict(lr=0.0),
                                 dict(labels="hard")])
def test_bad_train_config(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_top1_labels_are_cross_entropy_on_the_target_argmax():
    torch.manual_seed(0)
    target, adapter, source, _ = make_problem()
    b = source.batch(list(range(4)))
    with torch.no_grad():
        soft, n, agree_soft = distill_loss(target, adapter, b["exit"], b["final"], b["mask"])
        top1, n_top1, agree = distill_loss(target, adapter, b["exit"], b["final"], b["mask"], labels="top1")
        pos = torch.arange(b["exit"].shape[1]).expand(b["exit"].shape[:2])
        draft = target.lm_head(adapter.forward_train(b["exit"], *target.rope(pos)))[b["mask"]]
        teacher = target.head(b["final"])[b["mask"]].argmax(-1)
    expected = torch.nn.functional.cross_entropy(draft, teacher, reduction="sum")
    torch.testing.assert_close(top1, expected, rtol=1e-5, atol=1e-4)
    assert int(n) == int(n_top1) == teacher.numel() and int(agree) == int(agree_soft)
    assert not torch.allclose(soft, top1)  # the soft loss also carries the target's entropy
    with pytest.raises(ValueError, match="labels"):
        distill_loss(target, adapter, b["exit"], b["final"], b["mask"], labels="argmax")


def test_top1_labels_raise_agreement():
    torch.manual_seed(0)
    target, adapter, source, held = make_problem()
    from kangaroo_rt.train.states import OnTheFly
    held_source = OnTheFly(target, 2, held)
    cfg = TrainConfig(steps=150, micro_batch=8, lr=1e-2, warmup_steps=10, clip="norm", clip_value=1.0,
                      labels="top1", progress=False, log_every=50)
    _, top1_0 = _agreement(target, adapter, held_source)
    Trainer(target, adapter, 2, source, cfg).train()
    _, top1_1 = _agreement(target, adapter, held_source)
    assert top1_1 > top1_0 + 0.1, (top1_0, top1_1)


def test_exact_resume(tmp_path):
    def run(out_dir, stop_at=None):
        target, adapter, source, _ = make_problem()
        cfg = TrainConfig(steps=6, micro_batch=4, grad_accum=2, lr=1e-2, warmup_steps=2, out_dir=str(out_dir),
                          progress=False, log_every=1)
        Trainer(target, adapter, 2, source, cfg).train(stop_at=stop_at)
        return adapter

    straight = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", stop_at=3)
    assert not torch.equal(interrupted.norm.weight, straight.norm.weight)
    resumed = run(tmp_path / "b")  # picks up checkpoint.pt at step 3
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]


def test_torchrun_two_processes_equal_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    worker = os.path.join(HERE, "ddp_worker.py")
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    # --standalone: a free port of torchrun's choosing, so concurrent runs do not collide on a fixed one.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          worker, str(two), "2", "1", "6"], env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    subprocess.run([sys.executable, worker, str(one), "2", "2", "6"], check=True, env=env, timeout=300)
    a, b = torch.load(two), torch.load(one)
    initial = make_problem()[1].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
        assert not torch.equal(a[k], initial[k]) or k.endswith("input_layernorm.weight")


def test_dump_then_train_matches_on_the_fly(tmp_path):
    target, adapter, source, _ = make_problem(n_train=10)
    dump_states(target, 2, source.examples, str(tmp_path / "dump"), shard_size=4, batch_size=3,
                dtype=torch.float32, progress=False)
    dumped = Dumped(str(tmp_path / "dump"), torch.device("cpu"))
    assert len(dumped) == 10 and [dumped.weight(i) for i in range(10)] == [source.weight(i) for i in range(10)]
    b1, b2 = source.batch([3, 7]), dumped.batch([3, 7])
    for key in ("exit", "final", "mask"):
        torch.testing.assert_close(b1[key], b2[key], atol=1e-5, rtol=0)
    # Resuming a finished dump rewrites nothing.
    before = os.path.getmtime(tmp_path / "dump" / "shard-00000.safetensors")
    dump_states(target, 2, source.examples, str(tmp_path / "dump"), shard_size=4, batch_size=3,
                dtype=torch.float32, progress=False)
    assert os.path.getmtime(tmp_path / "dump" / "shard-00000.safetensors") == before
    with pytest.raises(ValueError, match="other settings"):
        dump_states(target, 2, source.examples, str(tmp_path / "dump"), shard_size=5, progress=False)


def test_incomplete_dump_is_refused(tmp_path):
    target, _, source, _ = make_problem(n_train=9)
    folder = tmp_path / "dump"
    dump_states(target, 2, source.examples, str(folder), shard_size=4, dtype=torch.float32, progress=False)
    index = json.loads((folder / "index.json").read_text())
    index["shards"] = index["shards"][:1]
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="incomplete"):
        Dumped(str(folder), torch.device("cpu"))


def test_export_loads_strictly(tmp_path):
    target, adapter, _, _ = make_problem(n_train=4)
    export_adapter(adapter, str(tmp_path / "ad"), exit_layer=2, extra={"eta": 0.6})
    names = sorted(os.listdir(tmp_path / "ad"))
    assert names == ["config.json", "kangaroo.json", "model.safetensors", "pytorch_model.bin"]
    official = torch.load(tmp_path / "ad" / "pytorch_model.bin", weights_only=True)
    assert sorted(official) == sorted(K.adapter.ADAPTER_KEYS)
    loaded = K.Adapter.from_pretrained(str(tmp_path / "ad"), target.config)
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    model = K.KangarooModel(target, loaded, exit_layer=2)
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(model.generate(ids, max_new_tokens=8), model.generate(ids, max_new_tokens=8, kangaroo=None))


def _small_trainer(**cfg):
    target, adapter, source, held = make_problem(n_train=8, n_held=1)
    config = TrainConfig(**{"steps": 2, "micro_batch": 4, "lr": 1e-2, "warmup_steps": 1, "progress": False, **cfg})
    return Trainer(target, adapter, 2, source, config, eval_prompts=[held[0].input_ids[:4]])


def test_train_step_backpropagates_when_the_norm_is_a_kernel(monkeypatch):
    """On CUDA the adapter's RMSNorm dispatches to a kernel with no backward; training must not go through it."""
    def kernel_without_backward(x, weight, eps):
        with torch.no_grad():
            return reference.rms_norm(x, weight, eps)

    monkeypatch.setitem(ops._REGISTRY, "rms_norm", dict(ops._REGISTRY["rms_norm"],
                                                        triton=(kernel_without_backward, ("cpu",))))
    monkeypatch.setenv("KANGAROO_RT_BACKEND", "triton")
    ops._RESOLVED.clear()
    try:
        assert ops.resolve("rms_norm", torch.device("cpu"))[0] == "triton"
        trainer = _small_trainer()
        before = trainer.adapter.norm.weight.detach().clone()
        m = trainer.train_step()
    finally:
        ops._RESOLVED.clear()
    assert m["tokens"] > 0 and not torch.equal(trainer.adapter.norm.weight, before)


def test_fp32_adapter_against_a_bf16_target_trains_and_evaluates():
    """The CLI's default: fp32 adapter weights, a half-precision target, no --amp."""
    trainer = _small_trainer()
    trainer.target.to(torch.bfloat16)
    assert trainer.adapter.dtype == torch.float32
    m = trainer.train_step()
    assert m["loss"] > 0 and trainer.adapter.dtype == torch.float32
    assert trainer.evaluate()["eval_mat"] >= 1.0
    assert trainer.adapter.dtype == torch.float32 and trainer.adapter.training  # evaluated a copy


def test_distributed_statistics_live_on_the_trainers_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the per-step statistics go to the trainer's device (checked here
    on CPU with a stand-in all_reduce over a two-rank world that sums equal halves)."""
    trainer = _small_trainer()
    reduced = []

    def all_reduce(t, op=None):
        reduced.append(t)
        t.mul_(2)

    monkeypatch.setattr(trainer_module.dist, "all_reduce", all_reduce)
    trainer.world = 2
    m = trainer.train_step()
    stats = reduced[-1]
    assert stats.dtype == torch.float64 and stats.shape == (3,) and stats.device == trainer.device
    assert all(t.device == trainer.device for t in reduced)
    assert m["tokens"] == int(stats[1])
    trainer.device = torch.device("meta")
    assert trainer._stats_tensor([1.0, 2, 3]).device == torch.device("meta")


def test_local_device_follows_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_device("cuda") == torch.device("cuda") and local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == torch.device("cuda", 3)
    assert local_device("cuda:1") == torch.device("cuda", 1)  # an explicit index is kept
    assert local_device("cpu") == torch.device("cpu")
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert trainer_module.init_distributed(torch.device("cuda", 3)) == (0, 1)
    assert current == [torch.device("cuda", 3)]
