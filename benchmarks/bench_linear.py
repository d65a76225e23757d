"""Microbenchmark of the CPU linear kernel (csrc/cpu/linear.cpp through kangaroo_rt._cpu) against torch's F.linear,
on the decode path's shapes, cold cache.

Each pass runs every matrix of a SmolLM2-135M-shaped model once, in order: 30 layers x {q 576x576, k 192x576,
v 192x576, o 576x576, gate 1536x576, up 1536x576, down 576x1536} and the tied 49152x576 head (538 MB in fp32,
269 MB in bf16: far more than the last-level cache, so every weight comes from DRAM, as in decoding). For
M = 1, 2, 4, 8, 16, 32, 64 activation rows, with fp32 weights (fp32 activations) and bf16 weights (bf16
activations, as a bf16 model decodes), it reports the median time per pass, the GB/s of weight bytes and their
fraction of the DRAM read bandwidth (torch.sum over 512 MB, timed in turns with the passes: the median of one sum
per repeat; the probe at the start, the best of 14, is recorded too), kernel vs torch, and M
rows vs one row, and the hardware's limit for the pass (roof: the weight bytes at the read bandwidth, or its
multiply-adds, weights x M, at the peak rate of the kernel's inner instruction on these threads, measured in the
same run by kangaroo_rt._cpu.peak_macs, whichever takes longer) with the sweep's fraction of it. bf16 weights are
read as the decode stacks read them, through their packed copies (kangaroo_rt._cpu.pack_bf16, made before timing:
panels of 16 rows, each one sequential run; a row-major bf16 weight is packed by every call, which is not what
decoding does). The layer matrices of each
K (576: q, k, v, o, gate, up; 1536: down) are also timed alone at 1 and 8 rows, one call per pass ("by_k"). And 1-8
rows with the weights in cache ("hot": a 1.8 MB matrix swept 16 times in one call): the kernel's multiply-add rate
there, its fraction of the peak, and the weight bytes a second it stands for, about the fastest M rows can stream
however fast the memory is; below the read bandwidth M rows cannot cost what one row does, and near it they are
unlikely to.
The kernel runs twice: one call per matrix from Python, as the head and the adapter call it
(each call pays a few microseconds of binding, allocation and thread start-up), and the whole pass as one call
("sweep": the matrices one after another on one set of threads that claim chunks as the decoder stack does, so
the kernel's stream as the layer stack drives it). Then fused projections, kernel and torch alike: q/k/v as one
(960, 576) weight and gate/up as one (3072, 576), one call per layer, against separate calls. Then prefill: 128 and 512 rows over 4 layers'
matrices (compute-bound: GFLOP/s, kernel against torch), the numbers behind _cpu_ext.linear's sending bf16
calls of more than 64 rows to torch. Kernel and torch passes alternate, and so do the row counts (each repeat
times every row count's passes in turn, since 2026-12-06; before, one row count's repeats ran before the next
one's), so that a load from another process, or a swing of the host's bandwidth (bench_host_bandwidth), hits
all of them alike; how many cores other processes kept busy meanwhile is measured and recorded (from /proc/stat,
less this process's own CPU time): above ~0.1 the numbers are not clean.

    PYTHONPATH=. python benchmarks/bench_linear.py [--threads 2] [--out DIR] [--quick]

Prints a table and writes ``<out>/bench_linear.json`` (``bench_linear-smoke.json`` with --quick: a tiny model,
two row counts; the numbers only show that the script works). Without kangaroo_rt._cpu it says so and exits 0.
"""
# gpu_suite: gpu-args --quick
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_bench_utils as kb  # noqa: E402

from kangaroo_rt import _cpu_ext  # noqa: E402
from kangaroo_rt.bench import device_name  # noqa: E402

NAME = "bench_linear"
ROWS = (1, 2, 4, 8, 16, 32, 64)
FUSED_ROWS = (1, 8)
# (name, N, K) of one SmolLM2-135M layer, and of the tied head
LAYER = (("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576), ("gate", 1536, 576),
         ("up", 1536, 576), ("down", 576, 1536))
HEAD = ("head", 49152, 576)
LAYERS = 30
QUICK_LAYERS, QUICK_HEAD, QUICK_ROWS = 2, ("head", 1024, 576), (1, 8)
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
PREFILL_ROWS, PREFILL_LAYERS = (128, 512), 4
# The kernel with its weights in cache: a K = 576 matrix of about HOT_BYTES (SmolLM2's gate in bf16), swept HOT_PASSES
# times in one call so that the call's start-up is a small part, at HOT_ROWS rows. The caches hold it (1 MB of L2 a
# core and 32 MB of L3 on the AMD EPYC here; the threads claim chunks as they come, so some of it comes from L3): a
# lower bound on the in-cache rate
HOT_BYTES, HOT_PASSES, HOT_K, HOT_ROWS = 1536 * 576 * 2, 16, 576, (1, 2, 3, 4, 5, 6, 7, 8)
WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16}
Key = TypeVar("Key", bound=Hashable)  # a timed case's name


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed passes per case (median reported)")
    p.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                   help="a tiny model and two row counts: shows the script works (tests, gpu_suite --dry-run)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be positive")
    return args


def _model(dtype: torch.dtype, layers: int, head: Tuple[str, int, int]) -> List[Tuple[str, torch.Tensor]]:
    """(name, weight (N, K)) of every matrix, in the order a decode step reads them; each its own allocation."""
    gen = torch.Generator().manual_seed(0)
    mats = []
    for layer in range(layers):
        for name, n, k in LAYER:
            mats.append((f"{layer}.{name}", (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)))
    mats.append((head[0], (torch.randn(head[1], head[2], generator=gen) / head[2] ** 0.5).to(dtype)))
    return mats


def _pass(linear: Callable, mats: List[Tuple[str, torch.Tensor]], xs: Dict[int, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for _, w in mats:
            linear(xs[w.shape[1]], w)
    return run


def _time_pair(fns: Dict[Key, Callable[[], None]], repeats: int) -> Dict[Key, float]:
    """Median seconds per call of each function, their calls interleaved."""
    times: Dict[Key, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: page faults, thread pool
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class OtherLoad:
    """Cores kept busy by other processes between start() and stop() (Linux /proc/stat); None elsewhere."""

    def __init__(self) -> None:
        self.wall, self.own, self.busy = 0.0, 0.0, None

    @staticmethod
    def _busy_s() -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest is within user)
        except (OSError, ValueError):
            return None
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def start(self) -> None:
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), self._busy_s()

    def stop(self) -> Optional[float]:
        busy = self._busy_s()
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (time.process_time() - self.own)
        return max(0.0, others / (time.perf_counter() - self.wall))


class Kernel:
    """kangaroo_rt._cpu's linear and linear_sweep as decoding reads the weights: bf16 ones through their packed copies
    (pack_bf16, made at a weight's first call and kept for the run, so that no timed pass packs), fp32 row-major."""

    def __init__(self, cpu, dtype: torch.dtype) -> None:
        self.cpu, self.packed = cpu, dtype == torch.bfloat16
        self._copies: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, its packed copy)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return w
        kept = self._copies.get(id(w))
        if kept is None or kept[0] is not w:
            kept = self._copies[id(w)] = (w, self.cpu.pack_bf16(w))
        return kept[1]

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.cpu.linear(x, self.weight(w), packed=self.packed)

    def sweep(self, x: torch.Tensor, weights: List[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return self.cpu.linear_sweep(x, [self.weight(w) for w in weights], out, packed=self.packed)


def _check(kernel: Kernel, mats: List[Tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """The kernel agrees with torch, and a row's bits do not depend on the batch (tests/test_linear.py does it
    thoroughly); a benchmark of wrong numbers would be worthless."""
    w = mats[4][1]
    x = torch.randn(8, w.shape[1]).to(dtype)
    got = kernel.linear(x, w)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), atol=tol, rtol=tol)
    if not all(torch.equal(kernel.linear(x[i:i + 1], w)[0], got[i]) for i in range(x.shape[0])):
        raise AssertionError("a row's result depends on the batch")


def peak_macs(cpu, label: str, threads: int, quick: bool) -> float:
    """The best of three measurements of the kernel's multiply-add rate for these weights on these threads
    (kangaroo_rt._cpu.peak_macs: its inner instruction on register chains), multiply-adds per second."""
    dtype = "float32" if label == "fp32" else "bfloat16"
    return max(cpu.peak_macs(dtype, threads, 2_000_000 if quick else 20_000_000) for _ in range(3))


def roof(nbytes: int, macs: int, bandwidth: float, peak: float) -> Dict[str, float]:
    """The hardware's limit for a pass: the weight bytes at the read bandwidth, or its multiply-adds at the peak
    rate, whichever takes longer (ms)."""
    memory_ms, compute_ms = 1e3 * nbytes / (bandwidth * 1e9), 1e3 * macs / peak
    return {"memory_ms": memory_ms, "compute_ms": compute_ms, "roof_ms": max(memory_ms, compute_ms),
            "bound": "memory" if memory_ms >= compute_ms else "compute"}


def measure_weights(cpu, label: str, args: argparse.Namespace,
                    probe: Tuple[Callable[[], object], int]) -> Dict[str, List[Dict]]:
    """{"rows": per row count, "parts": head / layers at one row, "fused": fused projections, "prefill": ...,
    "read_bandwidth": [GB/s of probe (kb.cpu_read_probe) timed in turns with the row counts' passes]}"""
    dtype = WEIGHTS[label]
    layers, head = (QUICK_LAYERS, QUICK_HEAD) if args.quick else (LAYERS, HEAD)
    mats = _model(dtype, layers, head)
    kernel = Kernel(cpu, dtype)
    _check(kernel, mats, dtype)
    nbytes = sum(w.numel() * w.element_size() for _, w in mats)
    peak = peak_macs(cpu, label, args.threads, args.quick)
    rows: List[Dict] = []
    weights = [w for _, w in mats]
    k_max = max(w.shape[1] for w in weights)
    # Every row count's passes in turns within each repeat, so that M rows over one row compares passes of the same
    # minutes: this host's read bandwidth moves by tens of percent within a minute (bench_host_bandwidth).
    timed: Dict[Tuple[int, str], Callable[[], None]] = {}
    counts = QUICK_ROWS if args.quick else ROWS
    timed[0, "read"] = probe[0]  # the read bandwidth, in the same turns
    # The layer matrices of each K alone, one call per pass (how the row count's cost depends on K: 8 fp32 rows of
    # x at K = 1536 are 48 KB, an L1 of Zen 5 by themselves)
    by_k = {k: [w for name, w in mats if name != HEAD[0] and w.shape[1] == k] for k in sorted(
        {w.shape[1] for name, w in mats if name != HEAD[0]})}
    k_counts = [m for m in counts if m in (1, 8)] or list(counts[:1])
    for k, ws in by_k.items():
        for m in k_counts:
            x_k, out_k = torch.randn(m, k).to(dtype), torch.empty(m, sum(w.shape[0] for w in ws), dtype=dtype)
            timed[m, f"K={k}"] = lambda x_k=x_k, out_k=out_k, ws=ws: kernel.sweep(x_k, ws, out_k)
    for m in counts:
        xs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in weights}}
        x_all = torch.randn(m, k_max).to(dtype)
        out = torch.empty(m, sum(w.shape[0] for w in weights), dtype=dtype)
        sweep = lambda x_all=x_all, out=out: kernel.sweep(x_all, weights, out)  # noqa: E731
        timed.update({(m, "kernel"): _pass(kernel.linear, mats, xs), (m, "sweep"): sweep,
                      (m, "torch"): _pass(F.linear, mats, xs)})
    t = _time_pair(timed, args.repeats)
    bandwidth = probe[1] / t[0, "read"] / 1e9
    print(f"{label:>5}   read bandwidth timed in turns with these passes: {bandwidth:.1f} GB/s (torch.sum, median)",
          flush=True)
    for m in counts:
        row = {"weights": label, "rows": m, "bytes": nbytes, "peak_macs_per_s": peak, "read_bandwidth_gbs": bandwidth,
               **roof(nbytes, m * sum(w.numel() for w in weights), bandwidth, peak)}
        for name in ("kernel", "sweep", "torch"):
            row[f"{name}_ms"] = 1e3 * t[m, name]
            row[f"{name}_gbs"] = nbytes / t[m, name] / 1e9
            row[f"{name}_fraction_of_read_bw"] = row[f"{name}_gbs"] / bandwidth
            row[f"{name}_fraction_of_roof"] = row["roof_ms"] / row[f"{name}_ms"]
        row["speedup"] = t[m, "torch"] / t[m, "kernel"]
        one = next((r for r in rows if r["rows"] == 1), row)
        for name in ("kernel", "sweep", "torch"):
            row[f"{name}_vs_m1"] = row[f"{name}_ms"] / one[f"{name}_ms"]
        rows.append(row)
        print(f"{label:>5} {m:>3} {row['kernel_ms']:>9.2f} {row['torch_ms']:>9.2f} {row['kernel_gbs']:>7.1f} "
              f"{100 * row['kernel_fraction_of_read_bw']:>5.0f}% {row['torch_gbs']:>7.1f} "
              f"{100 * row['torch_fraction_of_read_bw']:>5.0f}% {row['speedup']:>6.2f}x "
              f"{row['kernel_vs_m1']:>6.2f}x {row['torch_vs_m1']:>6.2f}x {row['sweep_ms']:>8.2f} "
              f"{row['sweep_gbs']:>7.1f} {100 * row['sweep_fraction_of_read_bw']:>5.0f}% {row['sweep_vs_m1']:>6.2f}x "
              f"{row['roof_ms']:>7.2f} {row['bound']:>7} {100 * row['sweep_fraction_of_roof']:>5.0f}%", flush=True)
    k_rows = []
    for k, ws in by_k.items():
        nbytes_k = sum(w.numel() * w.element_size() for w in ws)
        for m in k_counts:
            ms = 1e3 * t[m, f"K={k}"]
            k_rows.append({"weights": label, "k": k, "rows": m, "matrices": len(ws), "bytes": nbytes_k, "ms": ms,
                           "gbs": nbytes_k / ms / 1e6, "vs_m1": ms / (1e3 * t[k_counts[0], f"K={k}"])})
            print(f"{label:>5}   K={k:<5} layer matrices only ({len(ws)}), one call per pass, {m} rows: {ms:7.2f} ms, "
                  f"{k_rows[-1]['gbs']:6.1f} GB/s, {k_rows[-1]['vs_m1']:.2f}x {k_counts[0]} row(s)", flush=True)
    hot = measure_hot(kernel, label, args, peak, bandwidth)
    fused = measure_fused(kernel, label, mats, args)
    return {"rows": rows, "parts": measure_parts(kernel, label, mats, args, bandwidth), "fused": fused,
            "read_bandwidth": [bandwidth], "by_k": k_rows, "hot": hot,
            "prefill": measure_prefill(kernel, label, mats, args)}


def measure_parts(kernel: "Kernel", label: str, mats: List[Tuple[str, torch.Tensor]], args: argparse.Namespace,
                  bandwidth: float) -> List[Dict]:
    """One row, the head alone and the layer matrices alone: how far the many small matrices (a few microseconds
    of call and thread start-up each) pull the whole pass below the head's rate. And the whole pass read by
    torch.sum one matrix at a time: what a plain read reaches when the stream stops and starts at each matrix, next
    to the read bandwidth of one large buffer."""
    parts = {"head": [m for m in mats if m[0] == HEAD[0]], "layers": [m for m in mats if m[0] != HEAD[0]]}
    xs = {k: torch.randn(1, k).to(WEIGHTS[label]) for k in {w.shape[1] for _, w in mats}}
    weights = [w for _, w in mats]
    t = _time_pair({**{part: _pass(kernel.linear, ms, xs) for part, ms in parts.items()},
                    "read": lambda: [w.sum() for w in weights]}, args.repeats)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    read = {"weights": label, "rows": 1, "part": "torch.sum of each matrix", "bytes": nbytes,
            "read_ms": 1e3 * t["read"], "read_gbs": nbytes / t["read"] / 1e9,
            "read_fraction_of_read_bw": nbytes / t["read"] / 1e9 / bandwidth, "calls": len(weights)}
    print(f"{label:>5}   the same pass read by torch.sum, one call per matrix: {read['read_ms']:8.2f} ms, "
          f"{read['read_gbs']:6.1f} GB/s ({100 * read['read_fraction_of_read_bw']:.0f}% of read bandwidth)", flush=True)
    out = [read]
    for part, ms in parts.items():
        nbytes = sum(w.numel() * w.element_size() for _, w in ms)
        out.append({"weights": label, "rows": 1, "part": part, "bytes": nbytes, "kernel_ms": 1e3 * t[part],
                    "kernel_gbs": nbytes / t[part] / 1e9, "kernel_fraction_of_read_bw": nbytes / t[part] / 1e9 / bandwidth,
                    "calls": len(ms)})
        print(f"{label:>5}   1 {part:>6}: {1e3 * t[part]:8.2f} ms over {len(ms)} calls, {out[-1]['kernel_gbs']:6.1f} GB/s "
              f"({100 * out[-1]['kernel_fraction_of_read_bw']:.0f}% of read bandwidth)", flush=True)
    return out


def measure_hot(kernel: "Kernel", label: str, args: argparse.Namespace, peak: float, bandwidth: float) -> List[Dict]:
    """The decode row counts with the weights in cache (HOT_BYTES swept HOT_PASSES times in one call): the kernel's
    multiply-adds a second, their fraction of the inner instruction's peak (peak_macs), and the weight bytes a second
    that rate stands for: about the fastest a pass of M rows can stream whatever the memory gives. Below the read
    bandwidth, M rows cost more than one row even with arithmetic and stream overlapped perfectly; near it, they are
    likely to (hot_vs_read_bw: that rate over the read bandwidth timed in turns with the passes)."""
    dtype = WEIGHTS[label]
    elt = torch.empty((), dtype=dtype).element_size()
    n = HOT_BYTES // (HOT_K * elt)
    matrix_bytes = n * HOT_K * elt
    weights = [torch.randn(n, HOT_K).to(dtype)] * HOT_PASSES
    counts = QUICK_ROWS if args.quick else HOT_ROWS
    fns: Dict[int, Callable[[], object]] = {}
    for m in counts:
        x, out = torch.randn(m, HOT_K).to(dtype), torch.empty(m, n * HOT_PASSES, dtype=dtype)
        fns[m] = lambda x=x, out=out: kernel.sweep(x, weights, out)
    t = _time_pair(fns, args.repeats)
    nbytes = matrix_bytes * HOT_PASSES
    rows = []
    for m in counts:
        macs = m * n * HOT_K * HOT_PASSES
        row = {"weights": label, "rows": m, "bytes": nbytes, "matrix_bytes": matrix_bytes,
               "passes": HOT_PASSES, "macs": macs, "ms": 1e3 * t[m],
               "gmacs": macs / t[m] / 1e9, "fraction_of_peak": macs / t[m] / peak,
               "weight_gbs": nbytes / t[m] / 1e9, "hot_vs_read_bw": nbytes / t[m] / 1e9 / bandwidth}
        rows.append(row)
        print(f"{label:>5} {m:>3}   weights in cache: {row['gmacs']:6.0f} GMAC/s ({100 * row['fraction_of_peak']:3.0f}% "
              f"of the peak), {row['weight_gbs']:6.1f} GB/s of weights, {row['hot_vs_read_bw']:.2f}x the read "
              "bandwidth", flush=True)
    return rows


def measure_prefill(kernel: "Kernel", label: str, mats: List[Tuple[str, torch.Tensor]], args: argparse.Namespace) -> List[Dict]:
    """GFLOP/s at prefill row counts over the first layers' matrices (weights in cache: compute-bound)."""
    layer_mats = [m for m in mats if m[0] != HEAD[0]][:len(LAYER) * (1 if args.quick else PREFILL_LAYERS)]
    results = []
    for m in (QUICK_ROWS[-1:] if args.quick else PREFILL_ROWS):
        xs = {k: torch.randn(m, k).to(layer_mats[0][1].dtype) for k in {w.shape[1] for _, w in layer_mats}}
        flop = sum(2 * m * w.numel() for _, w in layer_mats)
        t = _time_pair({"kernel": _pass(kernel.linear, layer_mats, xs), "torch": _pass(F.linear, layer_mats, xs)},
                       args.repeats)
        results.append({"weights": label, "rows": m, "flop": flop,
                        "kernel_gflops": flop / t["kernel"] / 1e9, "torch_gflops": flop / t["torch"] / 1e9,
                        "kernel_vs_torch": t["torch"] / t["kernel"]})
    return results


def measure_fused(kernel: "Kernel", label: str, mats: List[Tuple[str, torch.Tensor]], args: argparse.Namespace) -> List[Dict]:
    """Per layer, one call on the concatenated weight against one call per projection, over every layer."""
    by_name = dict(mats)
    layers = QUICK_LAYERS if args.quick else LAYERS
    results = []
    for group, parts in FUSED.items():
        separate = [by_name[f"{layer}.{p}"] for layer in range(layers) for p in parts]
        fused = [torch.cat([by_name[f"{layer}.{p}"] for p in parts]) for layer in range(layers)]
        nbytes = sum(w.numel() * w.element_size() for w in fused)
        for m in QUICK_ROWS if args.quick else FUSED_ROWS:
            x = torch.randn(m, separate[0].shape[1]).to(separate[0].dtype)
            for impl, linear in (("kernel", kernel.linear), ("torch", F.linear)):
                t = _time_pair({"fused": lambda: [linear(x, w) for w in fused],
                                "separate": lambda: [linear(x, w) for w in separate]}, args.repeats)
                row = {"weights": label, "group": group, "rows": m, "impl": impl, "bytes": nbytes,
                       "fused_ms": 1e3 * t["fused"], "separate_ms": 1e3 * t["separate"],
                       "fused_gbs": nbytes / t["fused"] / 1e9, "separate_gbs": nbytes / t["separate"] / 1e9,
                       "separate_vs_fused": t["separate"] / t["fused"]}
                results.append(row)
        del fused
    return results


def _print_prefill(prefill: List[Dict]) -> None:
    print(f"\nprefill ({PREFILL_LAYERS} layers' matrices, weights in cache):")
    print(f"{'w':>5} {'M':>4} {'kernel GFLOP/s':>14} {'torch GFLOP/s':>13} {'kernel/torch':>12}")
    for r in prefill:
        print(f"{r['weights']:>5} {r['rows']:>4} {r['kernel_gflops']:>14.0f} {r['torch_gflops']:>13.0f} "
              f"{r['kernel_vs_torch']:>11.2f}x")


def _print_fused(fused: List[Dict]) -> None:
    print(f"\nfused projections ({'+'.join(FUSED['qkv'])} and {'+'.join(FUSED['gate_up'])} per layer, every layer):")
    print(f"{'w':>5} {'group':>8} {'M':>3} {'impl':>7} {'fused ms':>9} {'separate ms':>11} {'fused GB/s':>10} "
          f"{'separate/fused':>14}")
    for r in fused:
        print(f"{r['weights']:>5} {r['group']:>8} {r['rows']:>3} {r['impl']:>7} {r['fused_ms']:>9.3f} "
              f"{r['separate_ms']:>11.3f} {r['fused_gbs']:>10.1f} {r['separate_vs_fused']:>13.2f}x")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not _cpu_ext.is_available():
        print(f"{NAME}: kangaroo_rt._cpu is not built (KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation "
              "-e .); nothing to measure")
        return 0
    cpu = _cpu_ext.load()
    torch.set_num_threads(args.threads)
    load = OtherLoad()
    load.start()
    # the best of two probes a moment apart: on a shared host one probe can land in another tenant's burst
    probe = 64 * 2**20 if args.quick else 512 * 2**20
    bandwidth = kb.cpu_read_bandwidth_gbs(probe, repeats=7)
    time.sleep(0 if args.quick else 1.0)
    bandwidth = max(bandwidth, kb.cpu_read_bandwidth_gbs(probe, repeats=7))
    where = device_name(torch.device("cpu"))
    print(f"{NAME}: {where}, kernel variant {cpu.isa()}, DRAM read bandwidth {bandwidth:.1f} GB/s "
          f"(torch.sum, {args.threads} threads; the %bw columns use the probe timed in turns with each dtype's passes)"
          + ("; --quick: a tiny model, the numbers only show that the script works" if args.quick else ""))
    print(f"{'w':>5} {'M':>3} {'kernel ms':>9} {'torch ms':>9} {'kGB/s':>7} {'%bw':>6} {'tGB/s':>7} {'%bw':>6} "
          f"{'k/t':>7} {'kM/M1':>7} {'tM/M1':>7} {'sweep ms':>8} {'sGB/s':>7} {'%bw':>6} {'sM/M1':>7} "
          f"{'roof ms':>7} {'bound':>7} {'%roof':>6}")
    measured: Dict[str, List] = {"rows": [], "parts": [], "fused": [], "prefill": [], "by_k": [], "hot": []}
    in_turns: Dict[str, float] = {}
    probe_read = kb.cpu_read_probe(probe)
    for label in WEIGHTS:
        for key, values in measure_weights(cpu, label, args, probe_read).items():
            if key == "read_bandwidth":
                in_turns[label] = values[0]
            else:
                measured[key] += values
    rows, fused, prefill = measured["rows"], measured["fused"], measured["prefill"]
    _print_fused(fused)
    _print_prefill(prefill)
    others = load.stop()
    result = {"benchmark": NAME, "smoke_run": args.quick, "device": where, "threads": args.threads,
              "isa": cpu.isa(), "prefetch": cpu.prefetch_target(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "read_bandwidth_gbs": bandwidth, "read_bandwidth_in_turns_gbs": in_turns,
              "repeats": args.repeats,
              "other_processes_cores": others, "rows": rows,
              "fused": fused, "prefill": prefill, "parts": measured["parts"], "by_k": measured["by_k"],
              "hot": measured["hot"]}
    shared = "unknown" if others is None else f"{others:.2f} cores"
    print(f"other processes kept {shared} busy during the run (above ~0.1 the numbers are not clean)")
    kb.write_result(args.out, NAME + ("-smoke" if args.quick else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
