"""Where the CPU decode path's time goes, op by op: greedy decoding of held-out Spec-Bench prompts, plain and
Kangaroo in turns prompt by prompt (so that both see the same phases of a shared host's bandwidth), in one process,
with the CPU extension's phase accounting on (``kangaroo_rt._cpu_ext.phase_times``).

The one-call regions (the target pass, the draft chain) run every op of a layer as a phase whose chunks the threads
claim, and a thread moves on when the phase's last chunk is done. For every kind of phase (an op of the target's
layers over one row or several ("[n]"), of the draft's shallow layers or of the adapter; the head, the draft head,
the screened head; everything else) this reports the milliseconds a thread spends per plain step and per Kangaroo
round in the chunks' bodies and in waiting (claiming chunks, and at the phase's end for the other threads' last
ones), beside the wall time per step and round. Each prompt's prefill is measured apart (the prompt decoded to one
token, just before) and taken out, so the numbers are the decode loop's. Between the phases the threads run no kernel, so the bodies and
waits of a thread add up to nearly all of its time in a region. A wait is not always time lost: in a phase bound by
the memory stream (the linears), the other threads stream faster while one waits.

    python benchmarks/bench_phases.py [--model smollm2] [--dtype bfloat16] [--prompts 4] [--max-new-tokens 256]
                                      [--threads 2] [--out DIR]
    python benchmarks/bench_phases.py --smoke      (a random tiny model: seconds; the numbers mean nothing)
    python benchmarks/bench_phases.py --switch KANGAROO_RT_DRAFT_INT8 [...]
    python benchmarks/bench_phases.py --chains 1,2,4,6 [...]

With ``--chains 1,2,4,6`` it decodes plain and, for each count g, with Kangaroo at gamma g and eta 0 (every round
drafts g tokens and verifies g + 1), in turns prompt by prompt, and says what a round's verification and drafting
cost in plain steps as the decode loop runs them (the target pass's phases over the plain step's), per chain length:
the figure the verify-step budget is about, with the screened head and the one-call passes that decoding uses
(``bench_phases-<model>-chains.json``).

With ``--switch ENV`` it compares Kangaroo with a runtime switch on ("1") and off ("0") instead of plain decoding
with Kangaroo, the sides in turns prompt by prompt (the first one alternating): each kind per round both ways, MAT,
ms a round and a token, and whether the tokens are the same (``bench_phases-<model>-<ENV>.json``).

Results: ``<out>/bench_phases-<model>.json`` (``bench_phases-smoke.json``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

from kernel_bench_utils import write_result  # noqa: E402

# gpu_suite: gpu-args --smoke
NAME = "bench_phases"
QUESTIONS = os.path.join(ROOT, "benchmarks", "data", "spec_bench", "question.jsonl")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a model name of kangaroo_rt.models (default smollm2)")
    p.add_argument("--questions", default=QUESTIONS, help="Spec-Bench-format JSONL; the first prompt of each "
                   "category is taken, in file order")
    p.add_argument("--prompts", type=int, default=4, help="prompts to decode (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the model's cpu_dtype")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--smoke", action="store_true", help="a random tiny agreeing pair, 2 prompts x 12 tokens")
    p.add_argument("--switch", metavar="ENV", help="instead of plain against Kangaroo: Kangaroo with the environment "
                   "switch ENV at 1 against 0 (e.g. KANGAROO_RT_DRAFT_INT8, KANGAROO_RT_HEAD_SCREEN), in turns "
                   "prompt by prompt")
    p.add_argument("--chains", metavar="G,G,...", help="instead: plain against Kangaroo with fixed chains of G drafts "
                   "(gamma G, eta 0) for each G, in turns prompt by prompt (e.g. 1,2,4,6)")
    p.add_argument("--gamma", type=int, help="Kangaroo's gamma instead of the model's (with --switch or the default "
                   "mode; e.g. --gamma 6 --eta 0 for fixed 7-token verifications)")
    p.add_argument("--eta", type=float, help="Kangaroo's eta instead of the model's")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.chains is not None and (args.gamma is not None or args.eta is not None):
        p.error("--chains sets gamma and eta itself (gamma G, eta 0): leave --gamma and --eta out")
    if args.gamma is not None and args.gamma < 1:
        p.error(f"--gamma must be >= 1, got {args.gamma}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    if args.chains is not None:
        if args.switch:
            p.error("--chains and --switch are two modes: pick one")
        try:
            args.chains = sorted({int(g) for g in args.chains.split(",") if g.strip()})
        except ValueError:
            p.error(f"--chains takes draft counts such as 1,2,4,6, got {args.chains!r}")
        if not args.chains or args.chains[0] < 1:
            p.error("--chains: every draft count must be >= 1")
    for name in ("prompts", "max_new_tokens", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def load(args: argparse.Namespace, scratch: str):
    """-> (KangarooModel, KangarooConfig, prompts as (1, T) id tensors, eos id or None, what was loaded)."""
    from kangaroo_rt import bench
    from kangaroo_rt.config import KangarooConfig

    ns = argparse.Namespace(smoke=args.smoke, model=args.model, adapter=None, tokenizer=None,
                            questions=None if args.smoke else args.questions, template="auto", exit_layer=None)
    cpu = torch.device("cpu")  # (smoke: float32, as kangaroo-rt bench's own smoke run)
    dtype = getattr(torch, args.dtype) if args.dtype and not args.smoke else bench.default_dtype(ns, cpu)
    model, _, _, encode, eos, questions, template, settings, what = bench.load_run(ns, cpu, dtype, scratch)
    questions = bench.per_category(questions, 1)
    prompts = [p.ids for p in bench.build_prompts(questions, encode, template, args.prompts,
                                                  48 if args.smoke else None)]
    gamma = args.gamma if args.gamma is not None else settings.get("gamma", 6)
    kcfg = KangarooConfig(gamma=gamma, eta=args.eta if args.eta is not None else settings.get("eta", 0.6))
    return model, kcfg, prompts, eos, f"{what}, {str(dtype).removeprefix('torch.')}"


def timed_generate(model, ids: torch.Tensor, max_new: int, kcfg, eos: Optional[int]):
    """One greedy decoding under the phase accounting -> (phase times, wall s, new tokens, rounds, its tokens)."""
    from kangaroo_rt import _cpu_ext

    with _cpu_ext.phase_times() as times:
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new, eos_token_id=eos, kangaroo=kcfg, return_dict_in_generate=True)
        wall = time.perf_counter() - t0
    new = out.sequences[0, ids.shape[1]:].tolist()
    return dict(times), wall, len(new), sum(out.stats.rounds) if kcfg is not None else 0, new


class Tally:
    """One mode's decode loops, the prefill taken out: phase times (ns, summed over threads), wall, tokens, rounds."""

    def __init__(self) -> None:
        self.times: Dict[str, List[int]] = {}
        self.wall = 0.0
        self.tokens = self.rounds = self.prompts = 0
        self.outputs: List[List[int]] = []

    def add(self, full, prefill) -> None:
        times, wall, tokens, rounds, new = full
        for kind, v in times.items():
            acc = self.times.setdefault(kind, [0, 0, 0])
            for i, (x, y) in enumerate(zip(v, prefill[0].get(kind, (0, 0, 0)))):
                acc[i] += x - y
        self.wall += wall - prefill[1]
        self.tokens, self.rounds, self.prompts = self.tokens + tokens, self.rounds + rounds, self.prompts + 1
        self.outputs.append(new)

    def per_unit(self, kangaroo: bool, threads: int) -> Dict:
        """Its phases per unit (a Kangaroo round, or a plain step after the prefill's token) and thread, in ms."""
        units = self.rounds if kangaroo else self.tokens - self.prompts  # a prompt's first token: its prefill's
        if units <= 0:
            raise RuntimeError("the prompts decoded to no step beyond their first token: raise --max-new-tokens")
        scale = 1e-6 / units / threads  # ns summed over threads -> ms per unit and thread
        kinds = {k: {"body_ms": v[0] * scale, "wait_ms": v[1] * scale, "phases_per_unit": v[2] / units / threads}
                 for k, v in self.times.items() if v[2] > 0}  # (kinds of the prefill alone left out)
        return {"units": units, "unit": "round" if kangaroo else "step", "new_tokens": self.tokens,
                "wall_ms_per_unit": self.wall * 1e3 / units,
                "body_ms_per_unit": sum(v["body_ms"] for v in kinds.values()),
                "wait_ms_per_unit": sum(v["wait_ms"] for v in kinds.values()),
                "mat": (self.tokens - self.prompts) / self.rounds if kangaroo else None, "kinds": kinds}


def measure_switch(model, prompts: List[torch.Tensor], max_new: int, kcfg, eos: Optional[int], threads: int,
                   env: str):
    """Kangaroo with ``env`` at "1" and at "0", prompt by prompt in turns (the side that goes first alternating), each
    prompt's prefill taken out as in :func:`measure`. -> (on, off per round, whether their tokens are the same)."""
    tallies = {"1": Tally(), "0": Tally()}
    try:
        for value in ("1", "0"):  # warm-up of both sides
            os.environ[env] = value
            timed_generate(model, prompts[0], 4, kcfg, eos)
        for i, ids in enumerate(prompts):
            for value in (("1", "0") if i % 2 == 0 else ("0", "1")):
                os.environ[env] = value
                prefill = timed_generate(model, ids, 1, kcfg, eos)
                tallies[value].add(timed_generate(model, ids, max_new, kcfg, eos), prefill)
    finally:
        os.environ.pop(env, None)
    on, off = tallies["1"], tallies["0"]
    return on.per_unit(True, threads), off.per_unit(True, threads), on.outputs == off.outputs


def measure(model, prompts: List[torch.Tensor], max_new: int, kcfg, eos: Optional[int], threads: int):
    """Plain decoding and Kangaroo prompt by prompt in turns, so that both see the same phases of a shared host's
    bandwidth; each prompt's prefill (decoded to one token) timed just before and taken out. -> (plain, Kangaroo
    per unit, whether their tokens are the same)."""
    for k in (None, kcfg):  # warm-up: packed copies, plans, caches
        timed_generate(model, prompts[0], 4, k, eos)
    plain, kangaroo = Tally(), Tally()
    for ids in prompts:
        for k, tally in ((None, plain), (kcfg, kangaroo)):
            prefill = timed_generate(model, ids, 1, k, eos)
            tally.add(timed_generate(model, ids, max_new, k, eos), prefill)
    return (plain.per_unit(False, threads), kangaroo.per_unit(True, threads), plain.outputs == kangaroo.outputs)


def measure_chains(model, prompts: List[torch.Tensor], max_new: int, gammas: Sequence[int], eos: Optional[int],
                   threads: int):
    """Plain decoding and Kangaroo at gamma g, eta 0 for each g, prompt by prompt in turns (prefills out as in
    :func:`measure`). -> (plain per step, {g: Kangaroo per round}, whether every mode's tokens equal plain's)."""
    from kangaroo_rt.config import KangarooConfig

    modes = [(None, None)] + [(g, KangarooConfig(gamma=g, eta=0.0)) for g in gammas]
    for _, k in modes:  # warm-up: packed copies, plans, caches
        timed_generate(model, prompts[0], 4, k, eos)
    tallies = {g: Tally() for g, _ in modes}
    for ids in prompts:
        for g, k in modes:
            prefill = timed_generate(model, ids, 1, k, eos)
            tallies[g].add(timed_generate(model, ids, max_new, k, eos), prefill)
    plain = tallies[None]
    same = all(t.outputs == plain.outputs for t in tallies.values())
    return plain.per_unit(False, threads), {g: tallies[g].per_unit(True, threads) for g in gammas}, same


def part_of(kind: str) -> str:
    """The part of a decode a phase kind belongs to: "verification" (the target's layers, the head or its screen:
    a plain step is all of it), "drafting" (the shallow layers, the adapter, the draft head) or "other"."""
    if kind.startswith("layers.") or kind in ("head", "screen"):
        return "verification"
    if kind.startswith(("shallow.", "adapter.")) or kind == "draft_head":
        return "drafting"
    return "other"


def chain_rows(plain: Dict, rounds: Dict[int, Dict]) -> List[Dict]:
    """Per chain length: a round's wall time, and its verification's and drafting's phases (bodies and waits, per
    thread), in plain steps (the plain step's wall, and all of its phases)."""
    def parts(m: Dict) -> Dict[str, float]:
        out = {"verification": 0.0, "drafting": 0.0, "other": 0.0}
        for kind, v in m["kinds"].items():
            out[part_of(kind)] += v["body_ms"] + v["wait_ms"]
        return out

    step_phases = sum(parts(plain).values())
    rows = []
    for g, m in sorted(rounds.items()):
        p = parts(m)
        rows.append({"drafts": g, "verify_tokens": g + 1, "mat": m["mat"], "round_ms": m["wall_ms_per_unit"],
                     "round_plain_steps": m["wall_ms_per_unit"] / plain["wall_ms_per_unit"],
                     "verification_ms": p["verification"], "verification_plain_steps": p["verification"] / step_phases,
                     "drafting_ms": p["drafting"], "drafting_plain_steps": p["drafting"] / step_phases})
    return rows


def write_run(args, suffix: str, what: str, n_prompts: int, max_new: int, **fields) -> None:
    """A mode's JSON, ``bench_phases-<model><suffix>.json`` (``bench_phases-smoke<suffix>.json``): the run's header
    (host, date, model, prompts, threads, ISA), then the mode's ``fields``."""
    from kangaroo_rt import _cpu_ext
    from kangaroo_rt.bench import device_name

    result = {"benchmark": NAME, "smoke_run": args.smoke, "device": device_name(torch.device("cpu")),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "model": what, "prompts": n_prompts,
              "max_new_tokens": max_new, "threads": args.threads, "isa": _cpu_ext.load().isa(), **fields}
    write_result(args.out, (f"{NAME}-smoke" if args.smoke else f"{NAME}-{args.model}") + suffix, result)


def report_chains(args, what: str, n_prompts: int, max_new: int, plain: Dict, rounds: Dict[int, Dict],
                  same: bool) -> int:
    """The --chains mode's table and JSON (``bench_phases-<model>-chains.json``)."""
    rows = chain_rows(plain, rounds)
    step_phases = plain["body_ms_per_unit"] + plain["wait_ms_per_unit"]
    print(f"plain step: {plain['wall_ms_per_unit']:.3f} ms wall, {step_phases:.3f} ms in phases (a thread)")
    print(f"{'drafts':>6} {'verified':>8} {'round ms':>9} {'round':>7} {'verification':>13} {'drafting':>9}   "
          "(in plain steps)")
    for r in rows:
        print(f"{r['drafts']:>6} {r['verify_tokens']:>8} {r['round_ms']:>9.3f} {r['round_plain_steps']:>7.3f} "
              f"{r['verification_plain_steps']:>13.3f} {r['drafting_plain_steps']:>9.3f}")
    print(f"tokens identical to plain decoding in every mode: {same}")
    write_run(args, "-chains", what, n_prompts, max_new, mode="chains", eta=0.0, tokens_identical=same, rows=rows,
              plain=plain, kangaroo={str(g): m for g, m in rounds.items()})
    return 0 if same else 1


def table(plain: Dict, kangaroo: Dict, labels=("plain, ms a step", "Kangaroo, ms a round")) -> str:
    kinds = sorted(set(plain["kinds"]) | set(kangaroo["kinds"]),
                   key=lambda k: -sum(m["kinds"].get(k, {}).get("body_ms", 0) + m["kinds"].get(k, {}).get("wait_ms", 0)
                                      for m in (plain, kangaroo)))

    def cells(m: Dict, k: str) -> str:
        v = m["kinds"].get(k)
        return f"{'-':>9} {'-':>9}" if v is None else f"{v['body_ms']:9.3f} {v['wait_ms']:9.3f}"

    lines = [f"{'':24} {labels[0]:>19}  {labels[1]:>19}",
             f"{'phase kind':24} {'body':>9} {'wait':>9}  {'body':>9} {'wait':>9}"]
    for k in kinds:
        lines.append(f"{k:24} {cells(plain, k)}  {cells(kangaroo, k)}")
    lines.append(f"{'all phases':24} {plain['body_ms_per_unit']:9.3f} {plain['wait_ms_per_unit']:9.3f}  "
                 f"{kangaroo['body_ms_per_unit']:9.3f} {kangaroo['wait_ms_per_unit']:9.3f}")
    lines.append(f"{'wall':24} {plain['wall_ms_per_unit']:19.3f}  {kangaroo['wall_ms_per_unit']:19.3f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from kangaroo_rt import _cpu_ext

    if not _cpu_ext.is_available():
        print(f"{NAME}: the CPU extension kangaroo_rt._cpu is not built here; nothing to measure")
        return 0
    torch.set_num_threads(args.threads)
    max_new = 12 if args.smoke else args.max_new_tokens
    prompts_n = min(args.prompts, 2) if args.smoke else args.prompts
    args.prompts = prompts_n
    with tempfile.TemporaryDirectory(prefix="kangaroo_phases_") as scratch:
        model, kcfg, prompts, eos, what = load(args, scratch)
        model.max_len = max(p.shape[1] for p in prompts) + max_new + max([kcfg.gamma] + (args.chains or [])) + 2
        if args.chains:
            plain, rounds, same = measure_chains(model, prompts, max_new, args.chains, eos, args.threads)
            print(f"{what}; {len(prompts)} prompts x up to {max_new} new tokens, greedy, {args.threads} threads; "
                  f"Kangaroo with eta 0 and gamma {', '.join(map(str, args.chains))}")
            return report_chains(args, what, len(prompts), max_new, plain, rounds, same)
        if args.switch:
            on, off, same = measure_switch(model, prompts, max_new, kcfg, eos, args.threads, args.switch)
        else:
            plain, kangaroo, same = measure(model, prompts, max_new, kcfg, eos, args.threads)
    print(f"{what}; {len(prompts)} prompts x up to {max_new} new tokens, greedy, {args.threads} threads; "
          f"gamma {kcfg.gamma}, eta {kcfg.eta}")
    if args.switch:
        return report_switch(args, what, kcfg, len(prompts), max_new, on, off, same)
    print(table(plain, kangaroo))
    ratio = plain["wall_ms_per_unit"] * kangaroo["mat"] / kangaroo["wall_ms_per_unit"]
    print(f"Kangaroo: MAT {kangaroo['mat']:.2f}, a round {kangaroo['wall_ms_per_unit'] / plain['wall_ms_per_unit']:.2f} "
          f"plain steps, {ratio:.2f}x plain decoding's tokens a second; tokens identical: {same}")
    write_run(args, "", what, len(prompts), max_new, gamma=kcfg.gamma, eta=kcfg.eta, tokens_identical=same,
              kangaroo_over_plain=ratio, plain=plain, kangaroo=kangaroo)
    return 0 if same else 1


def report_switch(args, what: str, kcfg, n_prompts: int, max_new: int, on: Dict, off: Dict, same: bool) -> int:
    """The --switch mode's table, summary line and JSON (``bench_phases-<model>-<ENV>.json``)."""
    env = args.switch
    print(table(on, off, (f"{env}=1, ms a round", f"{env}=0, ms a round")))
    ms_token = {side: m["wall_ms_per_unit"] / m["mat"] for side, m in (("on", on), ("off", off))}
    print(f"{env}=1 against 0: MAT {on['mat']:.3f} / {off['mat']:.3f}, a round {on['wall_ms_per_unit']:.3f} / "
          f"{off['wall_ms_per_unit']:.3f} ms, a token {ms_token['on']:.3f} / {ms_token['off']:.3f} ms "
          f"({ms_token['off'] / ms_token['on']:.3f}x the tokens a second); tokens identical: {same}")
    write_run(args, f"-{env}", what, n_prompts, max_new, switch=env, gamma=kcfg.gamma, eta=kcfg.eta,
              tokens_identical=same, on_over_off=ms_token["off"] / ms_token["on"], on=on, off=off)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
