"""Kangaroo vs this project's plain decoding on the embedded model, side by side in one run.

For each held-out prompt (batch 1, greedy) the two methods run interleaved on identical weights and
cache; tokens must be identical (a mismatch is reported and fails the run). Prints a table and
writes JSON to benchmarks/results/ (or --out).

    PYTHONPATH=. python benchmarks/bench_embedded.py --prompts 24 --max-new-tokens 128

``--skip N`` measures the prompts after the first N (scripts/train_embedded_adapter.py tunes gamma/eta
on the first 12 by default: ``--skip 12`` measures only prompts the tuning never saw) and writes
``bench_embedded-skipN.json``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kernel_bench_utils import write_result  # noqa: E402

from kangaroo_rt.bench import device_name  # noqa: E402
from kangaroo_rt.config import KangarooConfig  # noqa: E402
from kangaroo_rt.embedded import heldout_prompt_ids  # noqa: E402
from kangaroo_rt.generate import KangarooModel  # noqa: E402

ASSETS = os.environ.get("EMBEDDED_OUT", os.path.join(ROOT, "kangaroo_rt", "assets", "embedded"))


def load_prompts(limit: Optional[int] = None) -> List[torch.Tensor]:
    """Token ids of the embedded model's held-out prompts (in ``EMBEDDED_OUT`` when set)."""
    return heldout_prompt_ids(limit, ASSETS)


def _time(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def measure(target, adapter, exit_layer: int, prompts: List[torch.Tensor], gamma: int, eta: float,
            max_new_tokens: int) -> Dict:
    """Interleaved plain / Kangaroo decoding of every prompt; returns totals and ratios."""
    model = KangarooModel(target, adapter, exit_layer=exit_layer, kangaroo=KangarooConfig(gamma=gamma, eta=eta))
    model.generate(prompts[0], max_new_tokens=8, ignore_eos=True)  # warm-up, allocates the caches
    t_plain = t_kg = 0.0
    tokens = rounds = accepted = 0
    attempts = [0] * gamma
    accepts = [0] * gamma
    mismatches = 0
    draft_s = verify_s = 0.0
    for ids in prompts:
        plain, dt_p = _time(lambda: model.generate(ids, max_new_tokens=max_new_tokens, ignore_eos=True, kangaroo=None))
        out, dt_k = _time(lambda: model.generate(ids, max_new_tokens=max_new_tokens, ignore_eos=True,
                                                 return_dict_in_generate=True))
        mismatches += int(not torch.equal(plain, out.sequences))
        t_plain += dt_p
        t_kg += dt_k
        tokens += max_new_tokens
        s = out.stats
        rounds += s.rounds[0]
        accepted += sum(s.accepted_lengths[0])
        attempts = [a + b for a, b in zip(attempts, s.position_attempts[0])]
        accepts = [a + b for a, b in zip(accepts, s.position_accepts[0])]
        draft_s += s.draft_time_s
        verify_s += s.verify_time_s
    return {"gamma": gamma, "eta": eta, "exit_layer": exit_layer, "prompts": len(prompts),
            "new_tokens_per_prompt": max_new_tokens, "plain_tokens_per_s": tokens / t_plain,
            "kangaroo_tokens_per_s": tokens / t_kg, "speedup": t_plain / t_kg, "mat": accepted / max(1, rounds),
            "acceptance_by_position": [a / t if t else None for a, t in zip(accepts, attempts)],
            "draft_time_fraction": draft_s / max(1e-9, draft_s + verify_s), "greedy_mismatches": mismatches}


def main() -> int:
    from kangaroo_rt import load_default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24, help="how many prompts to measure")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gamma", type=int, help="default: the shipped tuned value")
    parser.add_argument("--eta", type=float, help="default: the shipped tuned value")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--smoke", action="store_true", help="2 prompts x 16 tokens, marked as a smoke run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.max_new_tokens = 2, 16
    if args.prompts < 1 or args.skip < 0 or args.max_new_tokens < 1:
        parser.error("--prompts and --max-new-tokens must be positive and --skip >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_default(device=device)
    gamma = args.gamma if args.gamma is not None else model.kangaroo.gamma
    eta = args.eta if args.eta is not None else model.kangaroo.eta
    prompts = [p.to(device) for p in load_prompts(args.skip + args.prompts)[args.skip:]]
    if len(prompts) < args.prompts:
        parser.error(f"only {len(prompts)} held-out prompts are left after skipping {args.skip}")
    r = measure(model.target, model.adapter, model.exit_layer, prompts, gamma, eta, args.max_new_tokens)
    name = device_name(device)
    r.update({"benchmark": "bench_embedded", "smoke_run": args.smoke, "device": name,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "skipped_prompts": args.skip})
    print(f"| method   | tokens/s | speedup | MAT  |\n|----------|----------|---------|------|\n"
          f"| plain    | {r['plain_tokens_per_s']:8.1f} | 1.00x   |  -   |\n"
          f"| kangaroo | {r['kangaroo_tokens_per_s']:8.1f} | {r['speedup']:.2f}x   | {r['mat']:.2f} |")
    after = f" (after the first {args.skip})" if args.skip else ""
    print(f"exit layer {r['exit_layer']}, gamma {gamma}, eta {eta}, {r['prompts']} prompts{after} x "
          f"{args.max_new_tokens} tokens, {name}; acceptance by position "
          f"{[None if a is None else round(a, 2) for a in r['acceptance_by_position']]}")
    write_result(args.out, "bench_embedded" + (f"-skip{args.skip}" if args.skip else "") +
                 ("-smoke" if args.smoke else ""), r)
    if r["greedy_mismatches"]:
        print(f"ERROR: {r['greedy_mismatches']} prompts decoded differently by Kangaroo and plain decoding")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
