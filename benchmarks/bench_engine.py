"""The serving engine under load, in one process: plain decoding, Kangaroo, and Kangaroo under verification budgets.

For each number of concurrent requests in --requests (default 1, 2, 4, 8), held-out Spec-Bench prompts (every tenth
question's first turn, SmolLM2's chat template; repeated when more are asked for than there are) go to one
``kangaroo_rt.Engine`` all at once, --tokens new tokens each, and the engine steps until every one finished. The
methods run in turns within each repeat (the order reversed every other repeat), so a shared host's drifting memory
bandwidth moves them alike; requests end at EOS or their limit, so the count is the load a run starts with:
``plain`` (``kangaroo=None``), ``kangaroo`` (the model's settings) and ``budget N`` (``max_verify_tokens=N``, for
each N of --budgets, default 8 and 12: each round's drafts a row capped at N // running requests - 1,
docs/engine.md). The first repeat warms up and is not timed. Reported per method: tokens per second (the median over
repeats), its ratio to plain decoding (the median of the per-repeat ratios), MAT and the mean draft length, and
whether its tokens equal plain decoding's (greedy: they must; sampled, with --temperature, Kangaroo's draws differ
from plain decoding's with or without a budget, so this says nothing).

    PYTHONPATH=. python benchmarks/bench_engine.py [--dtype bfloat16] [--requests 1,2,4,8] [--tokens 128]
        [--budgets 8,12] [--repeats 4] [--temperature 0] [--top-p P] [--out DIR] [--smoke]

Prints a table and writes ``<out>/bench_engine.json`` (``bench_engine-smoke.json`` with --smoke: a random tiny
pair, 1 and 3 requests, budget 3, which gives the three rounds without drafts; the numbers only show that the
script works).
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import kernel_bench_utils as kb  # noqa: E402

NAME = "bench_engine"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--requests", default="1,2,4,8", help="comma list of concurrent request counts")
    p.add_argument("--tokens", type=int, default=128, help="new tokens a request")
    p.add_argument("--budgets", default="8,12", help="comma list of max_verify_tokens values ('' for none)")
    p.add_argument("--repeats", type=int, default=4, help="timed repeats (one more warms up; even: both orders)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else every request sampled, seeded")
    p.add_argument("--top-p", type=float)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--smoke", "--quick", action="store_true", dest="smoke",
                   help="a random tiny model: shows that the script works")
    args = p.parse_args(argv)
    try:
        args.requests = [int(n) for n in args.requests.split(",") if n.strip()]
        args.budgets = [int(n) for n in args.budgets.split(",") if n.strip()]
    except ValueError:
        p.error("--requests and --budgets are comma lists of ints")
    if not args.requests or min(args.requests) < 1 or (args.budgets and min(args.budgets) < 1):
        p.error("--requests needs counts >= 1 and --budgets values >= 1")
    if args.tokens < 1 or args.repeats < 1 or args.temperature < 0:
        p.error("--tokens and --repeats must be positive, --temperature >= 0")
    if args.smoke:
        args.requests, args.budgets, args.tokens, args.repeats = [1, 3], [3], 8, 1
    return args


def _model(args: argparse.Namespace):
    import torch

    from kangaroo_rt import KangarooConfig, KangarooModel, models
    from kangaroo_rt.testing import agreeing_pair, tiny_config

    dtype = getattr(torch, args.dtype)
    if args.smoke:
        target, adapter = agreeing_pair(tiny_config(num_layers=4), 2)
        model = KangarooModel(target.to(dtype), adapter.to(dtype), exit_layer=2,
                              kangaroo=KangarooConfig(gamma=4, eta=0.6))
        gen = torch.Generator().manual_seed(0)
        return model, [torch.randint(0, target.config.vocab_size, (1, 9), generator=gen) for _ in range(13)]
    return models.load_named("smollm2", dtype=dtype), kb.held_out_prompts(13)


def _serve(model, prompts: List, args: argparse.Namespace, kangaroo, budget: Optional[int]):
    """All prompts as concurrent requests of one Engine, stepped to the end -> (seconds, tokens per request,
    metrics)."""
    from kangaroo_rt.engine import RequestParams

    max_len = max(p.shape[1] for p in prompts) + args.tokens + model.kangaroo.gamma + 2
    sampled = args.temperature > 0
    params = [RequestParams(max_new_tokens=args.tokens, temperature=args.temperature,
                            top_p=args.top_p if sampled else None, seed=i if sampled else None)
              for i in range(len(prompts))]
    return kb.serve_all(model, prompts, params, max_len, kangaroo, budget)


def measure(model, prompts: List, n: int, args: argparse.Namespace) -> List[Dict]:
    """The methods' rows for n concurrent requests."""
    batch = [prompts[i % len(prompts)] for i in range(n)]
    methods = [("plain", None, None), ("kangaroo", model.kangaroo, None)] + [
        (f"budget {b}", model.kangaroo, b) for b in args.budgets]
    times: Dict[str, List[float]] = {name: [] for name, _, _ in methods}
    tokens: Dict[str, List] = {}
    metrics: Dict[str, Dict] = {}
    for r in range(args.repeats + 1):
        for name, kcfg, budget in (methods if r % 2 == 0 else methods[::-1]):
            seconds, toks, m = _serve(model, batch, args, kcfg, budget)
            if r > 0:
                times[name].append(sum(len(t) for t in toks) / seconds)
            tokens[name], metrics[name] = toks, m
    rows = []
    for name, _, budget in methods:
        row = {"requests": n, "method": name, "max_verify_tokens": budget,
               "tok_s": statistics.median(times[name]), "tok_s_repeats": times[name],
               "vs_plain": statistics.median(a / b for a, b in zip(times[name], times["plain"])),
               "mat": metrics[name]["mat"] if name != "plain" else None,
               "mean_draft_length": metrics[name]["mean_draft_length"] if name != "plain" else None,
               "same_tokens_as_plain": tokens[name] == tokens["plain"]}
        rows.append(row)
        print(f"{n:>8} {name:>10} {row['tok_s']:>8.1f} {row['vs_plain']:>8.3f}x "
              f"{row['mat'] if row['mat'] is not None else float('nan'):>6.2f} "
              f"{row['mean_draft_length'] if row['mean_draft_length'] is not None else float('nan'):>7.2f} "
              f"{'yes' if row['same_tokens_as_plain'] else 'no':>5}", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from kangaroo_rt.bench import device_name

    torch.set_num_threads(args.threads)
    model, prompts = _model(args)
    where = device_name(torch.device("cpu"))
    how = "greedy" if args.temperature == 0 else f"sampled, temperature {args.temperature}, top-p {args.top_p}"
    print(f"{NAME}: {where}, {args.threads} threads, {'a random tiny pair' if args.smoke else 'SmolLM2'} in "
          f"{args.dtype}, {args.tokens} tokens a request, {how}, {args.repeats} timed repeats")
    print(f"{'requests':>8} {'method':>10} {'tok/s':>8} {'/plain':>9} {'MAT':>6} {'drafts':>7} {'same':>5}")
    rows = []
    with torch.no_grad():
        for n in args.requests:
            rows += measure(model, prompts, n, args)
    result = {"benchmark": NAME, "smoke_run": args.smoke, "device": where, "threads": args.threads,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "dtype": args.dtype, "tokens": args.tokens, "temperature": args.temperature, "top_p": args.top_p,
              "repeats": args.repeats, "rows": rows}
    kb.write_result(args.out, NAME + ("-smoke" if args.smoke else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
