"""Shared by the benchmarks that decode the same prompts with two variants of one runtime in one process
(bench_hugepages: weights in 4 KB / 2 MB pages; bench_greedy_decode: the Python loop / the one-call loop): the
arguments, the held-out prompts (one Spec-Bench question per category, chat template), the alternating runs, and
the table and JSON they end with. The host's bandwidth drifts by tens of percent within minutes, so the variants
take turns prompt by prompt, over two passes, the order alternating."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kernel_bench_utils import write_result  # noqa: E402

from kangaroo_rt import models  # noqa: E402
from kangaroo_rt.bench import device_name  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
METHODS = ("ar", "kangaroo")
SMOKE_TOKENS = 8
QUESTIONS = os.path.join(ROOT, "benchmarks", "data", "spec_bench", "question.jsonl")  # the held-out prompts

# (variant, method, ids (1, T), max_new_tokens) -> output sequences (1, T + n)
Decode = Callable[[str, str, torch.Tensor, int], torch.Tensor]


def parse_args(doc: str, argv: Optional[Sequence[str]] = None, max_new_tokens: int = 400,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The shared options; extra(parser) adds a benchmark's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(p)
    p.add_argument("--model", default="smollm2", choices=[n for n in models.REGISTRY if n != "embedded"])
    p.add_argument("--questions", default=QUESTIONS)
    p.add_argument("--prompts", type=int, default=8, help="one per category, in file order (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--smoke", "--quick", action="store_true", dest="smoke",
                   help="a random tiny model, a few tokens: shows that the script works")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.max_new_tokens < 1 or args.threads < 1:
        p.error("--prompts, --max-new-tokens and --threads must be positive")
    return args


SMOKE_VOCAB = 211


def smoke_model(dtype: torch.dtype = torch.float32, place: Optional[Callable[[torch.nn.Module], None]] = None):
    """The --smoke model of these benchmarks: a random tiny target whose adapter mostly agrees with it (exit layer
    1, gamma 4, eta 0.3), in dtype; place(target), when given, runs before the model is built (bench_hugepages)."""
    from kangaroo_rt import KangarooConfig, KangarooModel
    from kangaroo_rt.testing import agreeing_pair, tiny_config

    target, adapter = agreeing_pair(tiny_config(vocab_size=SMOKE_VOCAB, hidden_size=128, num_layers=4,
                                                intermediate_size=256), exit_layer=1, seed=3)
    target, adapter = target.to(dtype), adapter.to(dtype)
    if place is not None:
        place(target)
    return KangarooModel(target, adapter, exit_layer=1, kangaroo=KangarooConfig(gamma=4, eta=0.3))


def prompts(args: argparse.Namespace, vocab: int = SMOKE_VOCAB) -> List[torch.Tensor]:
    """The prompts' token ids (1, T) each: --prompts held-out questions, one per category, with the model's chat
    template; with --smoke two random ones below ``vocab``."""
    if args.smoke:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, 9), generator=gen) for _ in range(2)]
    tok = models.load_tokenizer(args.model)
    picked, seen = [], set()
    with open(args.questions) as f:
        for line in f:
            q = json.loads(line)
            if q["category"] not in seen:
                seen.add(q["category"])
                picked.append(q["turns"][0])
    ids = []
    for text in picked[:args.prompts]:
        out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids.append(out if isinstance(out, torch.Tensor) else out["input_ids"])
    return ids


def alternate(variants: Sequence[str], decode: Decode, prompt_ids: Sequence[torch.Tensor],
              tokens: int) -> Tuple[Dict[str, float], bool]:
    """Every prompt decoded by every variant, plain ("ar") and Kangaroo, in two passes, the variants' order
    alternating. -> ({"<variant> <method>": new tokens/s}, whether every output is the same across variants and
    methods (it must be: greedy Kangaroo is lossless, and the variants compute the same bits))."""
    wall: Dict[Tuple[str, str], float] = {}
    made: Dict[Tuple[str, str], int] = {}
    outputs: Dict[Tuple[int, str], List[torch.Tensor]] = {}
    with torch.no_grad():
        for rep in range(2):
            for i, ids in enumerate(prompt_ids):
                order = tuple(variants) if (rep + i) % 2 == 0 else tuple(reversed(variants))
                for variant in order:
                    for method in METHODS:
                        start = time.perf_counter()
                        out = decode(variant, method, ids, tokens)
                        key = (variant, method)
                        wall[key] = wall.get(key, 0.0) + time.perf_counter() - start
                        made[key] = made.get(key, 0) + out.shape[1] - ids.shape[1]
                        outputs.setdefault((i, method), []).append(out)
    identical = all(torch.equal(o, outs[0]) for outs in outputs.values() for o in outs) and all(
        torch.equal(outputs[(i, "ar")][0], outputs[(i, "kangaroo")][0]) for i in range(len(prompt_ids)))
    rate = {f"{variant} {method}": made[key] / wall[key] for key in wall for variant, method in [key]}
    return rate, identical


def report(name: str, args: argparse.Namespace, variants: Tuple[str, str], labels: Tuple[str, str], ratio_key: str,
           rate: Dict[str, float], identical: bool, n_prompts: int, what: str, extra: Dict) -> int:
    """Prints the table (tokens/s of each variant and method, the second variant over the first, in the JSON under
    ``ratio_key``) and writes ``<out>/<name>.json`` (``<name>-smoke.json`` with --smoke). -> the exit status (1 if
    the outputs differ)."""
    where = device_name(torch.device("cpu"))
    dtype = "float32" if args.smoke else args.dtype  # (the smoke models are testing.agreeing_pair's fp32)
    tokens = SMOKE_TOKENS if args.smoke else args.max_new_tokens
    print(f"{name}: {where}, {'a random tiny model' if args.smoke else args.model} in {dtype}, "
          f"{n_prompts} prompts x {tokens} new tokens, twice, alternating; {what}"
          + ("; --smoke: the numbers only show that the script works" if args.smoke else ""))
    first, second = labels
    ratio_label = f"{second} / {first}"
    print(f"{'method':<10} {first + ' tok/s':>16} {second + ' tok/s':>16} {ratio_label:>18}")
    ratios = {}
    for method in METHODS:
        a, b = rate[f"{variants[0]} {method}"], rate[f"{variants[1]} {method}"]
        ratios[method] = b / a
        print(f"{method:<10} {a:>16.1f} {b:>16.1f} {ratios[method]:>17.3f}x")
    print(f"every output identical (variants and methods): {identical}")
    result = {"benchmark": name, "smoke_run": args.smoke, "device": where, "threads": args.threads,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "model": "random tiny" if args.smoke else args.model, "dtype": dtype, "prompts": n_prompts,
              "max_new_tokens": tokens, "tokens_per_s": rate, ratio_key: ratios,
              "identical_outputs": identical, **extra}
    write_result(args.out, name + ("-smoke" if args.smoke else ""), result)
    return 0 if identical else 1
