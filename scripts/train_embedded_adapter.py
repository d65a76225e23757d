"""Train, tune and ship the Kangaroo adapter of the embedded model (after scripts/train_embedded.py).

Stages (each resumable; ``all`` runs them in order):
  prompts  held-out prompts from the held-out stdlib files -> assets/embedded/heldout_prompts.jsonl
  selfgen  the target's own greedy continuations of training-split prefixes (what Kangaroo drafts)
  dump     exit-layer and final hidden states of the training windows (kangaroo_rt.train.dump_states)
  train    the adapter with kangaroo_rt.train.Trainer on the dump
  tune     gamma/eta by measured speed on held-out prompts (benchmarks/bench_embedded.py's measurement)
  export   adapter in the official format + kangaroo.json with the tuned settings
  card     the model card (after benchmarks/bench_embedded.py has run)

    python scripts/train_embedded_adapter.py all                      # prompts .. export, shipped settings
    PYTHONPATH=. python benchmarks/bench_embedded.py                  # the side-by-side measurement
    python scripts/train_embedded_adapter.py card                     # the model card from the records
"""
from __future__ import annotations

import argparse
import json
import math
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

# Overridable for dry runs of the pipeline on a scratch folder.
WORK = os.environ.get("EMBEDDED_WORK", os.path.join(ROOT, "runs", "embedded"))
OUT = os.environ.get("EMBEDDED_OUT", os.path.join(ROOT, "kangaroo_rt", "assets", "embedded"))
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


def _selfgen_path(n: int) -> str:
    return os.path.join(WORK, f"selfgen_{n}.pt")


def _training_windows(args):
    """Corpus windows, plus ``--selfgen`` windows of the target's own greedy continuations."""
    windows = _windows(args.windows, seed=1)
    if args.selfgen:
        generated = torch.load(_selfgen_path(args.selfgen))
        windows += [_Window(row.tolist()) for row in generated]
    return windows


def stage_selfgen(args) -> None:
    """Greedy continuations by the target itself of training-split prefixes (the text Kangaroo drafts at
    decode time): 32 corpus tokens + 224 generated tokens per window, batched plain decoding."""
    from kangaroo_rt.generate import KangarooModel
    from tqdm.auto import tqdm

    if not args.selfgen or os.path.isfile(_selfgen_path(args.selfgen)):
        return
    torch.set_num_threads(args.threads)
    target = load_model(OUT, dtype=torch.float32)
    model = KangarooModel(target, None, exit_layer=args.exit_layer)
    prefixes = torch.tensor([w.input_ids[:32] for w in _windows(args.selfgen, seed=2)])
    rows = []
    for lo in tqdm(range(0, len(prefixes), 32), desc="self-generated windows", unit="batch"):
        rows.append(model.generate(prefixes[lo:lo + 32], max_new_tokens=SEQ - 32, kangaroo=None, ignore_eos=True))
    torch.save(torch.cat(rows), _selfgen_path(args.selfgen))


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


def _run_name(args) -> str:
    """Work folders are named by the settings that change their contents."""
    return f"l{args.exit_layer}_w{args.windows}_sg{args.selfgen}"


def _adapter_dir(args) -> str:
    return os.path.join(WORK, f"adapter_{_run_name(args)}_{args.labels}_s{args.steps}")


def _tune_path(args) -> str:
    return _adapter_dir(args) + "_tune.json"


def _dump_dir(args) -> str:
    return os.path.join(WORK, f"dump_{_run_name(args)}")


def stage_dump(args) -> None:
    torch.set_num_threads(args.threads)
    target = load_model(OUT, dtype=torch.float32)
    dump_states(target, args.exit_layer, _training_windows(args), _dump_dir(args),
                shard_size=256, batch_size=8, dtype=torch.float16)


def _trainer(args, target):
    adapter = Adapter.random(target.config, seed=0, std=0.02)
    with torch.no_grad():  # start from the logit lens: the target's own final norm on the exit state
        adapter.norm.weight.copy_(target.norm.weight)
    cfg = TrainConfig(steps=args.steps, micro_batch=8, lr=args.lr, warmup_steps=50, schedule="cosine", clip="norm",
                      clip_value=1.0, seed=0, labels=args.labels, out_dir=_adapter_dir(args),
                      save_every=100, log_every=25)
    source = Dumped(_dump_dir(args), target.device)
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
        for eta in (0.4, 0.6, 0.8):
            r = measure(target, adapter, args.exit_layer, prompts, gamma=gamma, eta=eta,
                        max_new_tokens=args.max_new_tokens)
            results.append(r)
            print(f"gamma {gamma} eta {eta}: MAT {r['mat']:.2f} speedup {r['speedup']:.2f}x")
    best = max(results, key=lambda r: r["speedup"])
    with open(_tune_path(args), "w") as f:
        json.dump({"results": results, "best": best}, f, indent=2)
    print(f"best: gamma {best['gamma']} eta {best['eta']} ({best['speedup']:.2f}x, MAT {best['mat']:.2f})")


def stage_export(args) -> None:
    target = load_model(OUT, dtype=torch.float32)
    adapter = _trained_adapter(args, target)
    with open(_tune_path(args)) as f:
        best = json.load(f)["best"]
    folder = os.path.join(OUT, "adapter")
    export_adapter(adapter.to(torch.float16), folder, args.exit_layer,
                   extra={"gamma": best["gamma"], "eta": best["eta"], "adapter_steps": args.steps,
                          "adapter_windows": args.windows, "adapter_selfgen_windows": args.selfgen,
                          "adapter_labels": args.labels, "adapter_lr": args.lr})
    os.remove(os.path.join(folder, "model.safetensors"))  # ship one copy: the official pytorch_model.bin
    print(f"exported adapter to {folder}")


def stage_card(args) -> None:
    """The model card, from the recorded summaries and benchmarks/results/bench_embedded.json."""
    with open(os.path.join(OUT, "pretrain_summary.json")) as f:
        pre = json.load(f)
    with open(os.path.join(OUT, "adapter", "kangaroo.json")) as f:
        settings = json.load(f)
    shipped = argparse.Namespace(exit_layer=settings["exit_layer"], windows=settings["adapter_windows"],
                                 selfgen=settings["adapter_selfgen_windows"], labels=settings["adapter_labels"],
                                 steps=settings["adapter_steps"])
    with open(_tune_path(shipped)) as f:
        tune = json.load(f)
    with open(os.path.join(ROOT, "benchmarks", "results", "bench_embedded.json")) as f:
        bench = json.load(f)
    with open(os.path.join(OUT, "corpus_manifest.json")) as f:
        manifest = json.load(f)
    m = pre["model"]
    n_params = sum(t.numel() for t in load_model(OUT).parameters())
    files = manifest["files"]
    held_loss = pre["final_held_out_loss"]
    accept = ", ".join("-" if a is None else f"{a:.2f}" for a in bench["acceptance_by_position"])
    rows = "\n".join(f"| {r['gamma']} | {r['eta']} | {r['mat']:.2f} | {r['speedup']:.2f}x |" for r in tune["results"])
    parts = []
    if settings["adapter_windows"]:
        parts.append(f"{settings['adapter_windows']} windows of 256 corpus tokens")
    if settings["adapter_selfgen_windows"]:
        parts.append(f"{settings['adapter_selfgen_windows']} windows of the target's own greedy continuations "
                     "(32 training-split tokens + 224 generated: the text Kangaroo drafts at decode time)")
    data = " and ".join(parts) + ", hidden states dumped once"
    labels = ("cross-entropy on the target's argmax, what greedy verification accepts"
              if settings["adapter_labels"] == "top1" else "soft-label cross-entropy on the target's distribution")
    timing_path = os.path.join(OUT, "pretrain_timing.json")
    if os.path.isfile(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
        minutes = pre["steps"] * timing["seconds_per_step"] / 60
        pretrain_time = (f"about {minutes:.0f} minutes on 2 CPU cores ({timing['seconds_per_step']:.2f} s/step, re-timed over "
                         f"{timing['steps_timed']} steps by `train_embedded.py timing` on {timing['date']}; the summary's "
                         f"{pre['train_minutes']:.0f} minutes are the last run segment's only)")
    else:
        pretrain_time = f"in {pre['train_minutes']:.0f} minutes on 2 CPU cores"
    card = f"""# kangaroo_rt embedded model

A small Llama-architecture code model, its byte-level BPE tokenizer and its Kangaroo adapter, trained
by this repository on this repository's CI-class machine so that the tests, the demo and the CPU
benchmarks run on a real, trained model. It completes Python code; it is not a general assistant.

## Data
CPython {manifest['python']} standard-library sources (`*.py`, test packages excluded), PSF License
Agreement. {len(files)} files, {sum(f['bytes'] for f in files) / 1e6:.1f} MB; files whose path hash is
0 mod 32 ({sum(f['split'] == 'held_out' for f in files)} files) are held out. Every file and its SHA-256
is listed in `corpus_manifest.json`.

## Model
Llama ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, {m['num_attention_heads']} heads,
{m['num_key_value_heads']} KV heads, head dim {m['hidden_size'] // m['num_attention_heads']}, vocab {m['vocab_size']}, tied embeddings,
RoPE theta {m['rope_theta']}), {n_params / 1e6:.1f} M parameters, shipped as fp16 safetensors; `transformers`'
`LlamaForCausalLM` loads this folder too. Trained by `scripts/train_embedded.py` (seeded, resumable):
{pre['steps']} steps of {pre['train']['batch']} x {pre['train']['seq_len']} tokens ({pre['tokens_seen'] / 1e6:.1f} M tokens), AdamW
lr {pre['train']['lr']} cosine to {pre['train']['min_lr_ratio']}x, {pretrain_time}
(torch {pre['torch']}). Held-out loss {held_loss:.3f} nats/token (perplexity {math.exp(held_loss):.1f}).

## Kangaroo adapter
The official format in `adapter/` (`config.json` + `pytorch_model.bin`), exit layer {settings['exit_layer']}, trained by
`scripts/train_embedded_adapter.py` with `kangaroo_rt.train`: {data}, {settings['adapter_steps']} steps of 8 windows,
lr {settings['adapter_lr']} cosine, clipping by norm 1.0, output norm initialised from the target's final norm, labels
`{settings['adapter_labels']}` ({labels}). Tuned by measured speed on the first {tune['results'][0]['prompts']} held-out prompts x
{tune['results'][0]['new_tokens_per_prompt']} new tokens (the measurement below includes those prompts):

| gamma | eta | MAT | speedup |
|---|---|---|---|
{rows}

Shipped settings: gamma {settings['gamma']}, eta {settings['eta']} (`adapter/kangaroo.json`).

## Measured (benchmarks/bench_embedded.py, {bench['date']}, {bench['device']})
{bench['prompts']} held-out prompts x {bench['new_tokens_per_prompt']} new tokens, batch 1, greedy, both methods in one run:
plain {bench['plain_tokens_per_s']:.1f} tokens/s, Kangaroo {bench['kangaroo_tokens_per_s']:.1f} tokens/s, **{bench['speedup']:.2f}x**,
MAT {bench['mat']:.2f}, acceptance by draft position {accept}; greedy mismatches: {bench['greedy_mismatches']}.

## Limitations
A {n_params / 1e6:.0f} M-parameter model trained on a few million tokens: its completions look like standard-library
Python (docstrings, `self.` attributes, `def`/`return` structure) but are often wrong, and greedy decoding falls
into repetition loops after a few lines. Those loops are predictable, which is part of why Kangaroo's acceptance
rises with the number of new tokens; the figures above are for the stated token count. End a prompt without
its final newline (as `kangaroo-rt demo` does): the tokenizer merges a newline with the next line's indentation,
so a bare trailing newline tells the model that the next line starts at column 0. The held-out prompts end with
one (each is cut after a `def` line), so their completions mostly start a new top-level definition.
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(card)
    print(card)


STAGES = {"prompts": stage_prompts, "selfgen": stage_selfgen, "dump": stage_dump, "train": stage_train, "tune": stage_tune, "export": stage_export,
          "card": stage_card}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES) + ["all"])
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--windows", type=int, default=0, help="training windows of 256 corpus tokens")
    parser.add_argument("--selfgen", type=int, default=2048,
                        help="training windows of the target's own greedy continuations (32 corpus + 224 generated)")
    parser.add_argument("--labels", default="top1", choices=["soft", "top1"],
                        help="distill the target's distribution or its argmax (kangaroo_rt.train.distill_loss)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tune-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for name, fn in STAGES.items():
        if args.stage == name or (args.stage == "all" and name != "card"):
            fn(args)


if __name__ == "__main__":
    main()
