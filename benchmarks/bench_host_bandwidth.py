"""The host's memory read bandwidth over time: how fast a decode-like weight stream runs, second by second, after
the machine has idled.

Why it exists: on the shared 2-core AMD EPYC this project measures on, the bandwidth a stream gets swings between
about 40 and 80 GB/s over seconds to tens of seconds, which the other benchmarks' notes call fast and slow phases.
Measured 2026-12-06 (cpu-20261206-s20-host-bandwidth): after 90 s idle, 60-70 GB/s for 45 s with dips to 48;
after 120 s idle, 45-50 for 7 s, 60-68 for the next 20, then 53-58, then 38-45 to the end of 90 s. (A scratch
C++ read loop the same morning read ~80 GB/s for 12 s after a 120 s pause, then ~48.) So a pause does not
dependably bring a fast phase, and a benchmark that times one case after another mixes the phases into its ratios
(M rows over one row, say): time the cases in turns, as bench_ab and bench_linear do. This script idles for
--idle seconds, then streams for --seconds, and reports the GB/s of every --bucket seconds, with the medians over
the first 10 seconds and over the second half of the run.

The stream is what a decode step reads: one row (M = 1) through the CPU linear kernel over SmolLM2-135M's 30
layers of fp32 matrices (q, k, v, o, gate, up, down: 425 MB, far more than the last-level cache), one
``kangaroo_rt._cpu.linear_sweep`` call per pass on --threads threads. Without the CPU extension it streams
``torch.sum`` over a 512 MB fp32 buffer instead (what the other benchmarks call the DRAM read bandwidth).

    PYTHONPATH=. python benchmarks/bench_host_bandwidth.py [--idle 60] [--seconds 40] [--bucket 1] [--out DIR]

Prints a table and writes ``<out>/bench_host_bandwidth.json`` (``bench_host_bandwidth-smoke.json`` with --quick: no
idling, a one-second run over 2 layers; it only shows that the script works).
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_bench_utils as kb  # noqa: E402
from bench_linear import LAYER, LAYERS, QUICK_LAYERS  # noqa: E402  (SmolLM2's layer matrices, (name, N, K))

from kangaroo_rt import _cpu_ext  # noqa: E402
from kangaroo_rt.bench import device_name  # noqa: E402

NAME = "bench_host_bandwidth"
FIRST_S = 10.0  # the first window reported on its own (first_10s_median_gbs)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idle", type=float, default=60.0, help="seconds to sleep before streaming (default 60)")
    p.add_argument("--seconds", type=float, default=40.0, help="seconds to stream (default 40)")
    p.add_argument("--bucket", type=float, default=1.0, help="seconds per reported interval (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                   help="no idling, one second over 2 layers: shows the script works")
    args = p.parse_args(argv)
    if args.idle < 0 or args.seconds <= 0 or args.bucket <= 0 or args.threads < 1:
        p.error("--idle must be >= 0, and --seconds, --bucket and --threads positive")
    if args.quick:
        args.idle, args.seconds, args.bucket = 0.0, 1.0, 0.25
    return args


def stream(quick: bool) -> Tuple[str, int, Callable[[], None]]:
    """(what streams, bytes per pass, one pass)."""
    if _cpu_ext.is_available():
        layers = QUICK_LAYERS if quick else LAYERS
        weights = [torch.randn(n, k) for _ in range(layers) for _, n, k in LAYER]
        x = torch.randn(1, max(k for _, _, k in LAYER))
        out = torch.empty(1, sum(w.shape[0] for w in weights))
        cpu = _cpu_ext.load()
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        return (f"kangaroo_rt._cpu.linear_sweep, one row over {layers} SmolLM2 layers (fp32)", nbytes,
                lambda: cpu.linear_sweep(x, weights, out))
    read, nbytes = kb.cpu_read_probe((64 if quick else 512) * 2**20)
    return "torch.sum over an fp32 buffer", nbytes, read


def timeline(run: Callable[[], None], nbytes: int, seconds: float, bucket: float,
             clock: Callable[[], float] = time.perf_counter) -> List[Dict[str, float]]:
    """Passes back to back for ``seconds`` (by ``clock``), grouped into buckets by their end time: each bucket's start
    (s after the first pass began), passes and GB/s (its passes' bytes over their summed time)."""
    passes: List[Tuple[float, float]] = []  # (end since start, duration)
    start = clock()
    while True:
        t0 = clock()
        run()
        t1 = clock()
        passes.append((t1 - start, t1 - t0))
        if t1 - start >= seconds:
            break
    buckets: Dict[int, List[float]] = {}
    for end, took in passes:
        buckets.setdefault(int(end // bucket), []).append(took)
    return [{"start_s": i * bucket, "passes": len(t), "gbs": len(t) * nbytes / sum(t) / 1e9}
            for i, t in sorted(buckets.items())]


def summary(rows: List[Dict[str, float]], seconds: float) -> Dict[str, Optional[float]]:
    """Median GB/s of the buckets in the first FIRST_S seconds and in the run's second half (None where none)."""
    first = [r["gbs"] for r in rows if r["start_s"] < FIRST_S]
    late = [r["gbs"] for r in rows if r["start_s"] >= seconds / 2]
    return {"first_10s_median_gbs": statistics.median(first) if first else None,
            "second_half_median_gbs": statistics.median(late) if late else None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    what, nbytes, run = stream(args.quick)
    run()  # page faults, thread pool
    where = device_name(torch.device("cpu"))
    print(f"{NAME}: {where}, {args.threads} threads; stream: {what}, {nbytes / 1e6:.0f} MB a pass; idling "
          f"{args.idle:.0f} s, then streaming {args.seconds:.0f} s"
          + ("; --quick: the numbers only show that the script works" if args.quick else ""), flush=True)
    time.sleep(args.idle)
    rows = timeline(run, nbytes, args.seconds, args.bucket)
    print(f"{'from s':>7} {'passes':>6} {'GB/s':>7}")
    for r in rows:
        print(f"{r['start_s']:>7.1f} {r['passes']:>6} {r['gbs']:>7.1f}")
    totals = summary(rows, args.seconds)
    print(" ".join(f"{k.replace('_median_gbs', '').replace('_', ' ')}: "
                   + ("-" if v is None else f"{v:.1f} GB/s") for k, v in totals.items()) + " (medians of the buckets)")
    result = {"benchmark": NAME, "smoke_run": args.quick, "device": where, "threads": args.threads,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "stream": what, "bytes_per_pass": nbytes, "idle_s": args.idle, "seconds": args.seconds,
              "bucket_s": args.bucket, "buckets": rows, **totals}
    kb.write_result(args.out, NAME + ("-smoke" if args.quick else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
