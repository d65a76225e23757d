"""Shared harness of the kernel microbenchmarks (benchmarks/bench_<kernel>.py).

On a CUDA GPU each case is timed for the Triton kernel and the torch reference with
``triton.testing.do_bench``, and reported as time, achieved GB/s and the fraction of a measured
device-to-device copy bandwidth. Without a GPU a script says so and exits 0, unless ``--interpret``
asks for a smoke run of tiny shapes under the Triton interpreter (the timings then mean nothing).
``--cpu`` times the CPU extension's kernel of the same op (csrc/cpu/, kangaroo_rt._cpu) against the torch
reference instead, at decode shapes, with the fraction of the DRAM read bandwidth measured in the same run.
Results go to ``<out>/<script>.json`` (``<script>-cpu.json`` with --cpu).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple


def write_result(out: str, stem: str, result: Dict) -> str:
    """Every benchmark's last step: ``result`` as ``<out>/<stem>.json`` (out created if missing); prints and returns
    the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{stem}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return path


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder for the JSON results (default benchmarks/results)")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: smoke-run tiny shapes under TRITON_INTERPRET=1 (timings are meaningless)")
    parser.add_argument("--cpu", action="store_true",
                        help="time the CPU extension's kernel (kangaroo_rt._cpu) against torch, on CPU tensors")
    parser.add_argument("--threads", type=int, default=2, help="torch threads with --cpu (default 2)")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    return args


def setup(name: str, args: argparse.Namespace, cpu_only: bool = False):
    """-> (device, smoke) or exit 0 when there is nothing to measure here (``cpu_only``: a kernel of the CPU
    extension alone, which only ``--cpu`` measures)."""
    if cpu_only and not args.cpu:
        print(f"{name}: a CPU kernel; run with --cpu")
        sys.exit(0)
    import torch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    if args.cpu:
        from kangaroo_rt import _cpu_ext

        if not _cpu_ext.is_available():
            print(f"{name}: kangaroo_rt._cpu is not built (KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation "
                  "-e .); nothing to run")
            sys.exit(0)
        torch.set_num_threads(args.threads)
        return torch.device("cpu"), False
    if torch.cuda.is_available() and not args.interpret:
        return torch.device("cuda"), False
    if not args.interpret:
        print(f"{name}: needs a GPU for timings (no CUDA device here); run with --interpret for a CPU smoke run")
        sys.exit(0)
    from kangaroo_rt import ops

    ok, why = ops.triton_interpreter_supported()  # also says when triton is not installed
    if not ok:
        print(f"{name}: {why}; nothing to run")
        sys.exit(0)
    print(f"{name}: smoke run under the Triton interpreter on CPU, tiny shapes; timings are not meaningful")
    return torch.device("cpu"), True


def cpu_time_ms(fn: Callable[[], object], min_s: float = 0.3, warmup: int = 10) -> float:
    """Median milliseconds per call on the host, over at least ``min_s`` seconds of calls."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_ms(fn: Callable[[], object], smoke: bool) -> float:
    """Median milliseconds per call."""
    if smoke:
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbs(device, smoke: bool) -> Optional[float]:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    if smoke:
        return None
    import torch

    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), smoke)
    return 2 * src.numel() / ms / 1e6


def cpu_read_probe(nbytes: int = 512 * 2**20) -> Tuple[Callable[[], object], int]:
    """The host's DRAM read probe: ``tensor.sum`` over an fp32 buffer of ``nbytes`` (allocated once, on torch's
    threads; a buffer far larger than the last-level cache reads from DRAM). Returns (one read, bytes it reads), for
    a benchmark to time in turns with its own cases."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    return buf.sum, buf.numel() * 4


def cpu_read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Host DRAM read bandwidth: bytes per second of :func:`cpu_read_probe` (best of ``repeats``), in GB/s."""
    import time

    read, nbytes = cpu_read_probe(nbytes)
    read()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def run_cases(name: str, cases: List[Dict], args: argparse.Namespace, device, smoke: bool,
              extra: Optional[Callable[[], Dict]] = None) -> List[Dict]:
    """cases: dicts with "case" (str), "bytes" (int, minimum traffic), the kernel's callable ("triton", or "cpu"
    with --cpu) and "torch", and optionally "check" (callable raising on a wrong result). Prints a table, writes
    JSON, with the entries extra() returns (run after the table) added."""
    import torch

    on_cpu = getattr(args, "cpu", False)
    kernel = "cpu" if on_cpu else "triton"
    if on_cpu:
        bandwidth, limit = cpu_read_bandwidth_gbs(), "% DRAM bw"
        timer = lambda fn: cpu_time_ms(fn)  # noqa: E731
    else:
        bandwidth, limit = copy_bandwidth_gbs(device, smoke), "% copy bw"
        timer = lambda fn: time_ms(fn, smoke)  # noqa: E731
    rows = []
    print(f"{'case':<44} {kernel + ' ms':>10} {'torch ms':>10} {'speedup':>8} {'GB/s':>8} {limit:>9}")
    for case in cases:
        if "check" in case:
            case["check"]()
        t_kernel = timer(case[kernel])
        t_torch = timer(case["torch"])
        gbs = case["bytes"] / t_kernel / 1e6
        row = {"case": case["case"], f"{kernel}_ms": t_kernel, "torch_ms": t_torch, "speedup": t_torch / t_kernel,
               "bytes": case["bytes"], f"{kernel}_gbs": gbs, "torch_gbs": case["bytes"] / t_torch / 1e6,
               ("fraction_of_read_bw" if on_cpu else "fraction_of_copy_bw"): (gbs / bandwidth) if bandwidth else None}
        rows.append(row)
        frac = f"{100 * gbs / bandwidth:.1f}" if bandwidth else "-"
        print(f"{case['case']:<44} {t_kernel:>10.4f} {t_torch:>10.4f} {row['speedup']:>7.2f}x {gbs:>8.1f} {frac:>9}")
    if on_cpu:
        from kangaroo_rt import _cpu_ext
        from kangaroo_rt.bench import device_name

        device_label = f"{device_name(device)}, {_cpu_ext.load().isa()} variant"
    else:
        device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    result = {
        "benchmark": name,
        "kernel": "kangaroo_rt._cpu" if on_cpu else "triton",
        "device": device_label,
        "smoke_run": smoke,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **({"read_bandwidth_gbs": bandwidth} if on_cpu else
           {"triton": __import__("triton").__version__, "copy_bandwidth_gbs": bandwidth}),
        "rows": rows,
        **(extra() if extra is not None else {}),
    }
    write_result(args.out, name + ("-cpu" if on_cpu else ("-smoke" if smoke else "")), result)
    return rows


def held_out_prompts(n_prompts: int) -> List:
    """n_prompts held-out Spec-Bench prompts (every tenth question's first turn) in SmolLM2's chat template, each a
    (1, T) int64 tensor."""
    import torch

    from kangaroo_rt.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spec_bench", "question.jsonl")
    with open(path) as f:
        questions = [json.loads(line) for line in f][::10][:n_prompts]
    prompts = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True,
                                      return_tensors="pt")
        prompts.append(ids if torch.is_tensor(ids) else ids["input_ids"])
    return prompts


def serve_all(model, prompts: List, params: List, max_len: int, kangaroo, max_verify_tokens: Optional[int] = None):
    """The prompts ((1, T) each) as concurrent requests of one kangaroo_rt.Engine (a slot each, request i with
    ``params[i]``, a RequestParams), stepped until every one finished -> (seconds the steps took, each request's
    generated tokens, the engine's metrics)."""
    import time

    from kangaroo_rt.engine import Engine

    engine = Engine(model, max_batch=len(prompts), max_len=max_len, kangaroo=kangaroo,
                    max_verify_tokens=max_verify_tokens)
    ids = [engine.add_request(p[0].tolist(), q) for p, q in zip(prompts, params)]
    got: Dict[str, List[int]] = {i: [] for i in ids}
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    return time.perf_counter() - start, [got[i] for i in ids], engine.metrics()


def ab_entry(name: str, what: str, on_ms: List[float], off_ms: List[float], on_tokens, off_tokens) -> Dict:
    """One side-by-side result of an A/B in turns: ms per token with ``what`` on and off (per repeat), and the
    tokens each way -> {on_ms, off_ms (medians), on_vs_off (the median of the paired ratios), same_tokens, the
    repeats}; prints a line named ``name``."""
    import statistics

    entry = {"on_ms": statistics.median(on_ms), "off_ms": statistics.median(off_ms),
             "on_vs_off": statistics.median(a / b for a, b in zip(on_ms, off_ms)),
             "same_tokens": on_tokens == off_tokens, "on_ms_repeats": on_ms, "off_ms_repeats": off_ms}
    print(f"{name}: {entry['on_ms']:.3f} ms/token with {what}, {entry['off_ms']:.3f} without: "
          f"{entry['on_vs_off']:.3f}x (paired), tokens {'the same' if entry['same_tokens'] else 'not the same'}")
    return entry


def decode_ab(n_prompts: int, switch: Callable[[bool], None], what: str, generate_kwargs: Dict,
              new_tokens: int = 256, repeats: int = 3) -> Optional[Dict]:
    """Decoding A/B of a runtime switch in one process: SmolLM2 in bf16 (fetched: ``kangaroo-rt fetch smollm2``) on
    n_prompts held-out Spec-Bench prompts (every tenth, chat template), new_tokens each with generate_kwargs, plain
    and Kangaroo, ``switch(True)`` and ``switch(False)`` in turns within each repeat, so that both sides see the same
    phases of a shared host; the first round warms up and is not timed. -> {method: {on_ms, off_ms (ms per token,
    medians over repeats), on_vs_off (the median of the paired ratios), same_tokens, mean_accepted (Kangaroo's mean
    tokens per round), draft_ms_per_round and verify_ms_per_round (the decode loop's own seconds), ...},
    "kangaroo_over_plain": {on, off}}, or None for n_prompts <= 0. Prints a line per result;
    ``what`` names the switch in them."""
    if n_prompts <= 0:
        return None
    import statistics
    import time

    import torch

    import kangaroo_rt

    model = kangaroo_rt.load_default(dtype=torch.bfloat16, name="smollm2")
    prompts = held_out_prompts(n_prompts)
    methods = (("plain", {"kangaroo": None}), ("kangaroo", {}))
    times = {(m, on): [] for m, _ in methods for on in (True, False)}
    tokens, accepted = {}, {}
    phases = {on: [0.0, 0.0, 0] for on in (True, False)}  # Kangaroo's timed repeats: draft s, verify s, rounds
    for r in range(repeats + 1):
        for method, kw in methods:  # methods and settings in turns, so that each repeat sees one phase of the host
            for on in (True, False):
                switch(on)
                n, outs, rounds, t0 = 0, [], 0, time.perf_counter()
                for i, ids in enumerate(prompts):
                    out = model.generate(ids, max_new_tokens=new_tokens, seed=i, return_dict_in_generate=True,
                                         **generate_kwargs, **kw)
                    outs.append(out.sequences[0, ids.shape[1]:].tolist())
                    n += out.sequences.shape[1] - ids.shape[1]
                    rounds += sum(out.rounds)
                    if r > 0 and method == "kangaroo":
                        phases[on][0] += out.stats.draft_time_s
                        phases[on][1] += out.stats.verify_time_s
                        phases[on][2] += sum(out.rounds)
                if r > 0:
                    times[(method, on)].append((time.perf_counter() - t0) / n * 1e3)
                tokens[(method, on)] = outs
                accepted[(method, on)] = n / max(1, rounds)

    def paired(a, b):  # median over repeats of a / b
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    result = {}
    for method, _ in methods:
        on, off = (method, True), (method, False)
        result[method] = ab_entry(f"decode {method}", what, times[on], times[off], tokens[on], tokens[off])
        if method == "kangaroo":
            result[method].update(mean_accepted_on=accepted[on], mean_accepted_off=accepted[off])
            for side, key in ((True, "on"), (False, "off")):  # the decode loop's own seconds, per round
                draft_s, verify_s, n_rounds = phases[side]
                result[method][f"draft_ms_per_round_{key}"] = draft_s / max(1, n_rounds) * 1e3
                result[method][f"verify_ms_per_round_{key}"] = verify_s / max(1, n_rounds) * 1e3
            print(f"decode kangaroo: drafting {result[method]['draft_ms_per_round_on']:.3f} ms a round with {what}, "
                  f"{result[method]['draft_ms_per_round_off']:.3f} without; verification "
                  f"{result[method]['verify_ms_per_round_on']:.3f} / {result[method]['verify_ms_per_round_off']:.3f}")
    result["kangaroo_over_plain"] = {"on": paired(("plain", True), ("kangaroo", True)),
                                     "off": paired(("plain", False), ("kangaroo", False))}
    print(f"decode: Kangaroo over plain {result['kangaroo_over_plain']['on']:.3f}x with {what}, "
          f"{result['kangaroo_over_plain']['off']:.3f}x without (paired by repeat); Kangaroo's tokens per round "
          f"{accepted[('kangaroo', True)]:.2f} / {accepted[('kangaroo', False)]:.2f}")
    return result
