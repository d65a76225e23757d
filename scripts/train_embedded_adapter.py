"""Train, tune and ship the Kangaroo adapter of the embedded model (after scripts/train_embedded.py).

Stages (each resumable; ``all`` runs them in order):
  prompts  held-out prompts from the held-out stdlib files -> assets/embedded/heldout_prompts.jsonl
  dump     exit-layer and final hidden states of training windows (kangaroo_rt.train.dump_states)
  train    the adapter with kangaroo_rt.train.Trainer on the dump
  tune     gamma/eta by measured speed on held-out prompts (benchmarks/bench_embedded.py's measurement)
  export   adapter in the official format + kangaroo.json with the tuned settings

    python scripts/train_embedded_adapter.py all --exit-layer 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kangaroo_rt.adapter import Adapter  # noqa: E402
from kangaroo_rt.loading import load_model  # noqa: E402
from kangaroo_rt.train.states import Dumped, dump_states  # noqa: E402
from kangaroo_rt.train.trainer import TrainConfig, Trainer, export_adapter  # noqa: E402

WORK = os.path.join(ROOT, "runs", "embedded")
OUT = os.path.join(ROOT, "kangaroo_rt", "assets", "embedded")
SEQ = 256


class _Window:
    """A training example: a token window, loss on every position."""

    def __init__(self, ids):
        self.input_ids = ids
        self.loss_mask = [1] * len(ids)


def _windows(n: int, seed: int):
    tokens = torch.load(os.path.join(WORK, "train_tokens.pt"))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - SEQ, (n,), generator=gen).tolist()
    return [_Window(tokens[s: s + SEQ].long().tolist()) for s in starts]


def stage_prompts(args) -> None:
    """Prompts cut from held-out files at the start of a ``def`` line: a realistic completion point."""
    path = os.path.join(OUT, "heldout_prompts.jsonl")
    if os.path.isfile(path):
        return
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(OUT)
    with open(os.path.join(OUT, "corpus_manifest.json")) as f:
        manifest = json.load(f)
    prompts = []
    for entry in manifest["files"]:
        if entry["split"] != "held_out":
            continue
        text = open(os.path.join(manifest["stdlib"], entry["path"]), encoding="utf-8").read()
        lines = text.splitlines(keepends=True)
        offsets = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and i >= 8]
        for i in offsets[1:3]:  # two completion points per file
            prompt = "".join(lines[max(0, i - 12): i + 1])
            ids = tok(prompt).input_ids
            if 24 <= len(ids) <= 200:
                prompts.append({"file": entry["path"], "line": i + 1, "prompt": prompt})
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    print(f"prompts: {len(prompts)} held-out completion prompts")


def _dump_dir(exit_layer: int) -> str:
    return os.path.join(WORK, f"dump_l{exit_layer}")


def stage_dump(args) -> None:
    torch.set_num_threads(args.threads)
    target = load_model(OUT, dtype=torch.float32)
    dump_states(target, args.exit_layer, _windows(args.windows, seed=1), _dump_dir(args.exit_layer),
                shard_size=256, batch_size=8, dtype=torch.float16)


def _trainer(args, target):
    adapter = Adapter.random(target.config, seed=0, std=0.02)
    with torch.no_grad():  # start from the logit lens: the target's own final norm on the exit state
        adapter.norm.weight.copy_(target.norm.weight)
    cfg = TrainConfig(steps=args.steps, micro_batch=8, lr=args.lr, warmup_steps=50, schedule="cosine", clip="norm",
                      clip_value=1.0, seed=0, out_dir=os.path.join(WORK, f"adapter_l{args.exit_layer}"),
                      save_every=100, log_every=25)
    source = Dumped(_dump_dir(args.exit_layer), target.device)
    return Trainer(target, adapter, args.exit_layer, source, cfg)


def stage_train(args) -> None:
    torch.set_num_threads(args.threads)
    target = load_model(OUT, dtype=torch.float32)
    trainer = _trainer(args, target)
    log = trainer.train()
    for r in log[-3:]:
        print(r)


def _trained_adapter(args, target) -> Adapter:
    trainer = _trainer(args, target)
    ckpt = os.path.join(trainer.cfg.out_dir, "checkpoint.pt")
    trainer.load_checkpoint(ckpt)
    if trainer.step < args.steps:
        raise SystemExit(f"adapter training is at step {trainer.step}/{args.steps}; run the train stage")
    return trainer.adapter.eval()


def stage_tune(args) -> None:
    from bench_embedded import load_prompts, measure

    torch.set_num_threads(args.threads)
    target = load_model(OUT, dtype=torch.float32)
    adapter = _trained_adapter(args, target)
    prompts = load_prompts(limit=args.tune_prompts)
    results = []
    for gamma in (4, 6, 8):
        for eta in (0.2, 0.4, 0.6):
            r = measure(target, adapter, args.exit_layer, prompts, gamma=gamma, eta=eta,
                        max_new_tokens=args.max_new_tokens)
            results.append(r)
            print(f"gamma {gamma} eta {eta}: MAT {r['mat']:.2f} speedup {r['speedup']:.2f}x")
    best = max(results, key=lambda r: r["speedup"])
    with open(os.path.join(WORK, f"tune_l{args.exit_layer}.json"), "w") as f:
        json.dump({"results": results, "best": best}, f, indent=2)
    print(f"best: gamma {best['gamma']} eta {best['eta']} ({best['speedup']:.2f}x, MAT {best['mat']:.2f})")


def stage_export(args) -> None:
    target = load_model(OUT, dtype=torch.float32)
    adapter = _trained_adapter(args, target)
    with open(os.path.join(WORK, f"tune_l{args.exit_layer}.json")) as f:
        best = json.load(f)["best"]
    folder = os.path.join(OUT, "adapter")
    export_adapter(adapter.to(torch.float16), folder, args.exit_layer,
                   extra={"gamma": best["gamma"], "eta": best["eta"], "adapter_steps": args.steps,
                          "adapter_windows": args.windows, "adapter_lr": args.lr})
    os.remove(os.path.join(folder, "model.safetensors"))  # ship one copy: the official pytorch_model.bin
    print(f"exported adapter to {folder}")


STAGES = {"prompts": stage_prompts, "dump": stage_dump, "train": stage_train, "tune": stage_tune, "export": stage_export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES) + ["all"])
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2048, help="training windows of 256 tokens")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tune-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for name, fn in STAGES.items():
        if args.stage in (name, "all"):
            fn(args)


if __name__ == "__main__":
    main()
