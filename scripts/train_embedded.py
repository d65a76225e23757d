"""Train the embedded default model: corpus -> tokenizer -> tokens -> pretraining -> export.

Everything is seeded and every stage is resumable (re-running skips finished stages; pretraining
continues from its last checkpoint). The corpus is the Python standard library's source shipped with
the running interpreter (PSF license); the file list and hashes are recorded in the output folder.

    python scripts/train_embedded.py all                     # the whole pipeline
    python scripts/train_embedded.py pretrain --steps 2400   # one stage
    python scripts/train_embedded.py timing                  # re-time a few pretraining steps (model card)

Work files go to runs/embedded/ (ignored by git); the shipped folder is kangaroo_rt/assets/embedded/.
The adapter for this model is trained by scripts/train_embedded_adapter.py with kangaroo_rt.train.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overridable for dry runs of the pipeline on a scratch folder.
WORK = os.environ.get("EMBEDDED_WORK", os.path.join(ROOT, "runs", "embedded"))
OUT = os.environ.get("EMBEDDED_OUT", os.path.join(ROOT, "kangaroo_rt", "assets", "embedded"))
EOS = "<|endoftext|>"

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=24, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0)
TRAIN = dict(seq_len=256, batch=8, lr=2e-3, min_lr_ratio=0.1, warmup=100, weight_decay=0.1, clip=1.0, seed=0,
             ckpt_every=100, eval_every=400, eval_windows=32)


def _excluded(rel: str) -> bool:
    parts = rel.split(os.sep)
    return (parts[0] in ("site-packages", "dist-packages") or any(p in ("test", "tests", "idle_test") for p in parts)
            or not rel.endswith(".py"))


def corpus_files() -> list:
    """(relative path, absolute path) of the standard-library sources, sorted; tests excluded."""
    stdlib = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, stdlib)
            if not _excluded(rel):
                out.append((rel, path))
    return out


def is_held_out(rel: str) -> bool:
    """About 3% of files, chosen by a hash of the path, never seen in training."""
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 32 == 0


def stage_corpus(args) -> None:
    path = os.path.join(OUT, "corpus_manifest.json")
    if os.path.isfile(path):
        return
    files = []
    for rel, full in corpus_files():
        data = open(full, "rb").read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                      "split": "held_out" if is_held_out(rel) else "train"})
    manifest = {"source": "CPython standard library sources (PSF License Agreement)",
                "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"], "files": files}
    os.makedirs(OUT, exist_ok=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=0)
    n_train = sum(f["split"] == "train" for f in files)
    print(f"corpus: {len(files)} files ({n_train} train), {sum(f['bytes'] for f in files) / 1e6:.1f} MB")


def _texts(split: str) -> list:
    with open(os.path.join(OUT, "corpus_manifest.json")) as f:
        manifest = json.load(f)
    stdlib = manifest["stdlib"]
    return [open(os.path.join(stdlib, e["path"]), encoding="utf-8").read()
            for e in manifest["files"] if e["split"] == split]


def stage_tokenizer(args) -> None:
    if os.path.isfile(os.path.join(OUT, "tokenizer.json")):
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=[EOS], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts("train"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(OUT)
    assert fast.convert_tokens_to_ids(EOS) == MODEL["eos_token_id"]
    print(f"tokenizer: vocab {tok.get_vocab_size()}")


def _tokens(split: str) -> torch.Tensor:
    path = os.path.join(WORK, f"{split}_tokens.pt")
    if os.path.isfile(path):
        return torch.load(path)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(OUT)
    ids = []
    for text in _texts(split):
        ids.extend(tok(text).input_ids)
        ids.append(MODEL["eos_token_id"])
    t = torch.tensor(ids, dtype=torch.int16)
    os.makedirs(WORK, exist_ok=True)
    torch.save(t, path)
    print(f"{split} tokens: {len(t) / 1e6:.2f} M")
    return t


def stage_tokens(args) -> None:
    _tokens("train")
    _tokens("held_out")


def _batch(tokens: torch.Tensor, step: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([tokens[s: s + seq_len + 1].long() for s in starts.tolist()])


def _lr(step: int, total: int) -> float:
    base, warm = TRAIN["lr"], TRAIN["warmup"]
    if step < warm:
        return base * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = TRAIN["min_lr_ratio"]
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, windows: int) -> float:
    model.eval()
    seq = TRAIN["seq_len"]
    step = max(1, (len(tokens) - seq - 1) // windows)
    losses = []
    for i in range(windows):
        x = tokens[i * step: i * step + seq + 1].long()[None]
        losses.append(float(torch.nn.functional.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:])))
    model.train()
    return sum(losses) / len(losses)


def stage_pretrain(args) -> None:
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    train, held = _tokens("train"), _tokens("held_out")
    ckpt_path = os.path.join(WORK, "pretrain.pt")
    torch.manual_seed(TRAIN["seed"])
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.95), weight_decay=TRAIN["weight_decay"])
    step, log = 0, []
    if os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, total = state["step"], state["total"]
        log = state.get("log", [])
    else:
        total = args.steps
    model.train()
    bar = tqdm(total=total, initial=step, desc="pretraining", unit="step")
    # elapsed_s is the training wall time over every (resumed) segment, not just this process's.
    t_start = time.perf_counter() - (log[-1]["elapsed_s"] if log else 0.0)
    while step < total:
        for g in opt.param_groups:
            g["lr"] = _lr(step, total)
        x = _batch(train, step, TRAIN["batch"], TRAIN["seq_len"], TRAIN["seed"])
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}")
        record = {"step": step, "loss": float(loss), "elapsed_s": time.perf_counter() - t_start}
        if step % TRAIN["eval_every"] == 0 or step == total:
            record["held_out_loss"] = held_out_loss(model, held, TRAIN["eval_windows"])
            tqdm.write(f"step {step}: held-out loss {record['held_out_loss']:.3f}")
        log.append(record)
        if step % TRAIN["ckpt_every"] == 0 or step == total:
            tmp = ckpt_path + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                        "log": log}, tmp)
            os.replace(tmp, ckpt_path)
    bar.close()


def stage_export(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    state = torch.load(os.path.join(WORK, "pretrain.pt"), weights_only=True)
    if state["step"] < state["total"]:
        raise SystemExit(f"pretraining is at step {state['step']}/{state['total']}; run the pretrain stage to finish it")
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    model.load_state_dict(state["model"])
    model.half().save_pretrained(OUT, safe_serialization=True)
    log = state["log"]
    evals = [r for r in log if "held_out_loss" in r]
    summary = {"steps": state["step"], "tokens_seen": state["step"] * TRAIN["batch"] * TRAIN["seq_len"],
               "train_minutes": log[-1]["elapsed_s"] / 60 if log else None,
               "final_held_out_loss": evals[-1]["held_out_loss"] if evals else None,
               "held_out_curve": [(r["step"], round(r["held_out_loss"], 4)) for r in evals],
               "model": MODEL, "train": TRAIN, "torch": torch.__version__, "threads": args.threads}
    with open(os.path.join(OUT, "pretrain_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"exported to {OUT}: held-out loss {summary['final_held_out_loss']}")


def stage_timing(args) -> None:
    """Re-time pretraining: ``--timing-steps`` steps from scratch, same settings, in a scratch folder.

    Writes ``pretrain_timing.json`` beside the model (the shipped run's summary records only the wall time
    of its last process when it was resumed, so this is the per-step cost the model card quotes)."""
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="kangaroo_rt_timing_")
    global WORK
    work, WORK = WORK, scratch
    try:
        for split in ("train", "held_out"):
            shutil.copy(os.path.join(work, f"{split}_tokens.pt"), scratch)
        timed = argparse.Namespace(**{**vars(args), "steps": args.timing_steps})
        stage_pretrain(timed)
        log = torch.load(os.path.join(scratch, "pretrain.pt"), weights_only=True)["log"]
    finally:
        WORK = work
        shutil.rmtree(scratch, ignore_errors=True)
    warm = log[1:]  # the first step pays one-time allocation costs
    per_step = (warm[-1]["elapsed_s"] - log[0]["elapsed_s"]) / len(warm)
    result = {"seconds_per_step": per_step, "steps_timed": len(warm), "threads": args.threads,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(OUT, "pretrain_timing.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"pretraining: {per_step:.2f} s/step over {len(warm)} steps")


STAGES = {"corpus": stage_corpus, "tokenizer": stage_tokenizer, "tokens": stage_tokens, "pretrain": stage_pretrain,
          "export": stage_export, "timing": stage_timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES) + ["all"])
    parser.add_argument("--steps", type=int, default=1800, help="pretraining steps (fixed by the first run's checkpoint)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timing-steps", type=int, default=12, help="steps the timing stage runs")
    args = parser.parse_args()
    for name, fn in STAGES.items():
        if args.stage == name or (args.stage == "all" and name != "timing"):
            fn(args)


if __name__ == "__main__":
    main()
