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


def _run_dir(exit_layer: int, steps: int) -> str:
    return _path(f"adapter_l{exit_layer}_s{steps}")


def _train(args, exit_layer: int, steps: int):
    """Train (resumably) at ``exit_layer``; -> (adapter, dev top-1 agreement, train log tail)."""
    from kangaroo_rt.adapter import Adapter
    from kangaroo_rt.train.loss import distill_loss
    from kangaroo_rt.train.states import Dumped
    from kangaroo_rt.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    target = load_model(models.model_folder("smollm2"), dtype=torch.float32)
    adapter = Adapter.random(target.config, seed=0, std=0.02)
    with torch.no_grad():  # start from the logit lens: the target's own final norm on the exit state
        adapter.norm.weight.copy_(target.norm.weight)
    cfg = TrainConfig(steps=steps, micro_batch=args.micro_batch, lr=args.lr, warmup_steps=min(20, steps // 5),
                      schedule="cosine", clip="norm", clip_value=1.0, seed=0, labels=args.labels,
                      out_dir=_run_dir(exit_layer, steps), save_every=10, log_every=5)
    trainer = Trainer(target, adapter, exit_layer, Dumped(_dump_dir("train", exit_layer), target.device), cfg)
    start = time.perf_counter()
    log = trainer.train()
    seconds = time.perf_counter() - start
    dev = Dumped(_dump_dir("dev", exit_layer), target.device)
    adapter.eval()
    n = agree = 0
    with torch.no_grad():
        for lo in range(0, len(dev), 8):
            b = dev.batch(list(range(lo, min(len(dev), lo + 8))))
            _, k, a = distill_loss(target, adapter, b["exit"], b["final"], b["mask"], labels=args.labels)
            n, agree = n + int(k), agree + int(a)
    return adapter, agree / max(1, n), {"train_seconds_this_run": seconds, "log_tail": log[-2:]}


def stage_sweep(args) -> None:
    """Short trainings at each exit layer: dev top-1 agreement (acceptance proxy) vs the draft-step cost."""
    path = _path("sweep.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    for e in args.sweep:
        if str(e) in results:
            continue
        _, dev_top1, info = _train(args, e, args.sweep_steps)
        results[str(e)] = {"exit_layer": e, "steps": args.sweep_steps, "dev_top1": dev_top1, **info}
        print(f"sweep: exit layer {e}: dev top-1 {dev_top1:.3f}")
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def stage_train(args) -> None:
    _, dev_top1, info = _train(args, args.exit_layer, args.steps)
    with open(_path(f"train_l{args.exit_layer}_s{args.steps}.json"), "w") as f:
        json.dump({"exit_layer": args.exit_layer, "steps": args.steps, "dev_top1": dev_top1, **info}, f, indent=2)
    print(f"train: exit layer {args.exit_layer}, {args.steps} steps: dev top-1 {dev_top1:.3f}")


def _draft_cost(target, exit_layer: int) -> float:
    """A draft step's weight bytes over a plain step's (batch-1 decoding streams the weights): layers
    0..exit-1 + the adapter's attention + the head, against all layers + the head."""
    layer = sum(p.numel() for p in target.layers[0].parameters())
    head = target.lm_head.weight.numel()
    attn = sum(p.numel() for p in target.layers[0].self_attn.parameters())
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
    adapter = _trained(args, args.exit_layer, args.steps).eval()
    target = load_model(models.model_folder("smollm2"), dtype=torch.float32)
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
        json.dump({"results": results, "best": best}, f, indent=2)


def stage_export(args) -> None:
    from kangaroo_rt.train.trainer import export_adapter

    with open(_path(f"tune_l{args.exit_layer}_s{args.steps}.json")) as f:
        best = json.load(f)["best"]
    adapter = _trained(args, args.exit_layer, args.steps)
    folder = os.path.join(OUT, "adapter")
    export_adapter(adapter.to(torch.float16), folder, args.exit_layer,
                   extra={"gamma": best["gamma"], "eta": best["eta"], "adapter_steps": args.steps,
                          "adapter_micro_batch": args.micro_batch, "adapter_labels": args.labels,
                          "adapter_lr": args.lr})
    os.remove(os.path.join(folder, "model.safetensors"))  # ship one copy: the official pytorch_model.bin
    print(f"exported adapter to {folder}")


def stage_record(args) -> None:
    """The training record the model card quotes: data, sweep with draft costs, final run, tuning."""
    rows = _read_jsonl(_path("responses.jsonl"))
    target = load_model(models.model_folder("smollm2"), dtype=torch.float32)
    sweep = json.load(open(_path("sweep.json")))
    for e, r in sweep.items():
        r["draft_cost_vs_plain_step"] = _draft_cost(target, int(e))
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
        "torch": torch.__version__,
    }
    with open(os.path.join(OUT, "training_record.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record["data"]))


STAGES = {"prompts": stage_prompts, "generate": stage_generate, "dump": stage_dump, "sweep": stage_sweep,
          "train": stage_train, "tune": stage_tune, "export": stage_export, "record": stage_record}


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
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--labels", default="top1", choices=["soft", "top1"])
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
