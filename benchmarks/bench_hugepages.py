"""What 2 MB pages for the weights buy on CPU decoding (kangaroo_rt/hugepages.py), measured in one process.

The same model is loaded twice, once with ``KANGAROO_RT_HUGEPAGES=0`` (torch's allocations: 4 KB pages under the
usual ``madvise`` policy) and once placed in a mapping advised for huge pages. Each prompt is decoded by both, plain
and Kangaroo, the order alternating prompt by prompt and over two passes, so that the host's bandwidth drift hits
both alike. Reports tokens/s per (pages, method), the 2 MB / 4 KB ratios, and whether every output is identical
(it must be: the bytes are the same).

    PYTHONPATH=. python benchmarks/bench_hugepages.py [--model smollm2] [--prompts 8] [--max-new-tokens 400]
        [--dtype bfloat16] [--threads 2] [--out DIR] [--smoke]

Prints a table and writes ``<out>/bench_hugepages.json`` (``bench_hugepages-smoke.json`` with --smoke: a random
tiny model placed with no size threshold, a few tokens; the numbers only show that the script works).
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kangaroo_rt import KangarooConfig, KangarooModel, hugepages, models  # noqa: E402
from kangaroo_rt.bench import device_name  # noqa: E402

NAME = "bench_hugepages"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=[n for n in models.REGISTRY if n != "embedded"])
    p.add_argument("--questions", default=os.path.join(ROOT, "benchmarks", "data", "spec_bench", "question.jsonl"))
    p.add_argument("--prompts", type=int, default=8, help="one per category, in file order (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--smoke", "--quick", action="store_true", dest="smoke",
                   help="a random tiny model, a few tokens: shows that the script works")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.max_new_tokens < 1 or args.threads < 1:
        p.error("--prompts, --max-new-tokens and --threads must be positive")
    return args


def _models(args: argparse.Namespace) -> Tuple[Dict[str, KangarooModel], List[torch.Tensor]]:
    """{"4k": model, "2m": the same model placed}, and the prompts' token ids."""
    if args.smoke:
        from kangaroo_rt.testing import agreeing_pair, tiny_config

        pairs = [agreeing_pair(tiny_config(vocab_size=211, hidden_size=128, num_layers=4, intermediate_size=256),
                               exit_layer=1, seed=3) for _ in range(2)]
        hugepages.place(pairs[1][0], min_bytes=0)
        built = {name: KangarooModel(t, a, exit_layer=1, kangaroo=KangarooConfig(gamma=4, eta=0.3))
                 for name, (t, a) in zip(("4k", "2m"), pairs)}
        gen = torch.Generator().manual_seed(0)
        return built, [torch.randint(0, 211, (1, 9), generator=gen) for _ in range(2)]
    dtype = DTYPES[args.dtype]
    saved = os.environ.get("KANGAROO_RT_HUGEPAGES")
    try:
        os.environ["KANGAROO_RT_HUGEPAGES"] = "0"
        small = models.load_named(args.model, dtype=dtype)
        os.environ["KANGAROO_RT_HUGEPAGES"] = "1"
        huge = models.load_named(args.model, dtype=dtype)
    finally:
        if saved is None:
            os.environ.pop("KANGAROO_RT_HUGEPAGES", None)
        else:
            os.environ["KANGAROO_RT_HUGEPAGES"] = saved
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
    return {"4k": small, "2m": huge}, ids


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not hugepages.available():
        print(f"{NAME}: no transparent huge pages to advise here (or KANGAROO_RT_HUGEPAGES=0); nothing to compare")
        return 0
    built, prompts = _models(args)
    tokens = 8 if args.smoke else args.max_new_tokens
    wall: Dict[Tuple[str, str], float] = {}
    made: Dict[Tuple[str, str], int] = {}
    outputs: Dict[Tuple[int, str], List[torch.Tensor]] = {}
    with torch.no_grad():
        for rep in range(2):
            for i, ids in enumerate(prompts):
                order = ("4k", "2m") if (rep + i) % 2 == 0 else ("2m", "4k")
                for pages in order:
                    for method in ("ar", "kangaroo"):
                        start = time.perf_counter()
                        out = built[pages].generate(ids, max_new_tokens=tokens,
                                                    **({"kangaroo": None} if method == "ar" else {}))
                        key = (pages, method)
                        wall[key] = wall.get(key, 0.0) + time.perf_counter() - start
                        made[key] = made.get(key, 0) + out.shape[1] - ids.shape[1]
                        outputs.setdefault((i, method), []).append(out)
    identical = all(torch.equal(o, outs[0]) for outs in outputs.values() for o in outs) and all(
        torch.equal(outputs[(i, "ar")][0], outputs[(i, "kangaroo")][0]) for i in range(len(prompts)))
    rate = {f"{pages} {method}": made[(pages, method)] / wall[(pages, method)] for pages, method in wall}
    where = device_name(torch.device("cpu"))
    dtype = "float32" if args.smoke else args.dtype  # (the smoke model is testing.agreeing_pair's fp32)
    print(f"{NAME}: {where}, {'a random tiny model' if args.smoke else args.model} in {dtype}, "
          f"{len(prompts)} prompts x {tokens} new tokens, twice, alternating; huge pages now "
          f"{hugepages.huge_page_bytes() / 2**20:.0f} MB of this process"
          + ("; --smoke: the numbers only show that the script works" if args.smoke else ""))
    print(f"{'method':<10} {'4 KB tok/s':>11} {'2 MB tok/s':>11} {'2 MB / 4 KB':>12}")
    ratios = {}
    for method in ("ar", "kangaroo"):
        ratios[method] = rate[f"2m {method}"] / rate[f"4k {method}"]
        print(f"{method:<10} {rate[f'4k {method}']:>11.1f} {rate[f'2m {method}']:>11.1f} {ratios[method]:>11.3f}x")
    print(f"every output identical (pages and methods): {identical}")
    result = {"benchmark": NAME, "smoke_run": args.smoke, "device": where, "threads": args.threads,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "model": "random tiny" if args.smoke else args.model, "dtype": dtype, "prompts": len(prompts),
              "max_new_tokens": tokens, "tokens_per_s": rate, "two_mb_vs_four_kb": ratios,
              "identical_outputs": identical}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{NAME}{'-smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
