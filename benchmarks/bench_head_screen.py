"""Microbenchmark of the screened greedy head (csrc/cpu/head_screen.cpp) against the whole head and its argmax, both
from the CPU extension, and the torch reference (F.linear, then argmax), on SmolLM2's head shape (49152 x 576,
random weights; 57 MB in bf16, 113 MB in fp32; the screen reads 28 MB of int8) for M = 1, 2, 4, 8 rows, cold cache
(64 MB written between calls, as a decode step's layers stream through the caches between two heads). Reports each
one's median ms, the screen's GB/s of int8 bytes and their fraction of the DRAM read bandwidth measured in the same
run, the screened / whole-head ratio and the median count of rows computed exactly (those whose bounds can reach
the best); then the screen with running floors (x's first int8 part alone where it rules a row out: 6 rows and
more, as the target pass runs it) against both parts everywhere. The target pass takes the screen for up to kr_cpu_screen_max_rows(dtype) rows, from these ratios. A bf16 whole head is read through its packed copy, as the pass reads it.

    python benchmarks/bench_head_screen.py --cpu [--threads N] [--out DIR]

A second table times the draft head's int8 estimates (screen_estimate, what Kangaroo's draft chain reads as its
head's logits) against the whole draft head: 4096 x 576, one row, cold and warm.

With KANGAROO_RT_SCREEN_DECODE=N (N prompts; a real model must be fetched: `kangaroo-rt fetch smollm2`) it also
decodes N held-out Spec-Bench prompts with SmolLM2 in bf16, greedy, 256 new tokens, plain and Kangaroo, the screen
on and off (KANGAROO_RT_HEAD_SCREEN) alternating call by call in this one process, so that both sides see the same
phases of a shared host: ms per token each way, their ratio, and whether the tokens are the same.
KANGAROO_RT_DRAFT_INT8_DECODE=N does the same with the int8 draft head on and off (KANGAROO_RT_DRAFT_INT8).
"""
import os
import statistics
import time

import kernel_bench_utils as kb

NAME = "bench_head_screen"


def cold_ms(fn, flush, repeats: int = 15) -> float:
    """Median ms of fn over repeats, the caches overwritten (flush.add_) before each call."""
    times = []
    for _ in range(repeats + 2):
        flush.add_(1)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def main():
    args = kb.parse_args(__doc__)
    kb.setup(NAME, args, cpu_only=True)
    import torch

    from kangaroo_rt import _cpu_ext, reference

    cpu = _cpu_ext.load()
    V, K = 49152, 576
    bandwidth = kb.cpu_read_bandwidth_gbs()
    flush = torch.ones(64 << 20, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"DRAM read bandwidth {bandwidth:.1f} GB/s (torch.sum); head {V} x {K}, cold cache")
    print(f"{'dtype':>6} {'M':>3} {'whole ms':>9} {'torch ms':>9} {'screen ms':>10} {'screen/whole':>13} "
          f"{'GB/s':>6} {'% bw':>5} {'exact rows':>10} {'floors ms':>9} {'floors/screen':>14}")
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(V, K, generator=gen) * 0.05).to(dtype)
        screen = list(_cpu_ext.make_head_screen(w))
        # the whole head as the target pass reads it: a bf16 head through its packed copy (kr_cpu_pack_bf16)
        packed = dtype == torch.bfloat16
        head = cpu.pack_bf16(w) if packed else w
        screen_bytes = sum(t.numel() * t.element_size() for t in screen)
        for M in (1, 2, 4, 6, 8):
            x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
            want = reference.head_argmax(x, w)
            assert torch.equal(cpu.screened_argmax(x, w, screen), want), "screened_argmax differs from the head's"
            hi, lo = cpu.screen_bounds(x, screen)
            exact_rows = statistics.median((hi >= lo.max(dim=1, keepdim=True).values).sum(dim=1).tolist())
            t_whole = cold_ms(lambda: cpu.argmax(cpu.linear(x, head, packed=packed)), flush)
            t_torch = cold_ms(lambda: reference.head_argmax(x, w), flush)
            t_screen = cold_ms(lambda: cpu.screened_argmax(x, w, screen, floors=False), flush)
            t_floors = cold_ms(lambda: cpu.screened_argmax(x, w, screen, floors=True), flush)
            gbs = screen_bytes / t_screen / 1e6
            row = {"dtype": str(dtype)[6:], "rows": M, "whole_ms": t_whole, "torch_ms": t_torch, "screen_ms": t_screen,
                   "screen_vs_whole": t_screen / t_whole, "screen_bytes": screen_bytes, "screen_gbs": gbs,
                   "fraction_of_read_bw": gbs / bandwidth, "exact_rows_median": exact_rows,
                   "floors_ms": t_floors, "floors_vs_screen": t_floors / t_screen}
            rows.append(row)
            print(f"{row['dtype']:>6} {M:>3} {t_whole:>9.3f} {t_torch:>9.3f} {t_screen:>10.3f} "
                  f"{row['screen_vs_whole']:>12.2f}x {gbs:>6.1f} {100 * gbs / bandwidth:>5.1f} {exact_rows:>10.0f} "
                  f"{t_floors:>9.3f} {row['floors_vs_screen']:>13.2f}x")
    draft_rows = draft_head_rows(cpu, bandwidth, flush, gen)
    from kangaroo_rt.bench import device_name

    decode = decode_ab(int(os.environ.get("KANGAROO_RT_SCREEN_DECODE", "0")))
    draft_decode = draft_decode_ab(int(os.environ.get("KANGAROO_RT_DRAFT_INT8_DECODE", "0")))
    kb.write_result(args.out, NAME + "-cpu", {
        "benchmark": NAME, "kernel": "kangaroo_rt._cpu", "smoke_run": False,
        "device": f"{device_name(torch.device('cpu'))}, {cpu.isa()} variant", "threads": args.threads,
        "date": __import__("datetime").datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "read_bandwidth_gbs": bandwidth, "head": [V, K], "rows": rows, "decode": decode,
        "draft_head": draft_rows, "draft_decode": draft_decode})


def draft_head_rows(cpu, bandwidth: float, flush, gen):
    """The draft head's logits (SmolLM2's 4096-token draft vocabulary: 4096 x 576, one row) from its int8 form's
    estimates (screen_estimate: 2.4 MB of int8) against the whole head (the packed bf16 linear, 4.7 MB; fp32 9.4 MB),
    cold (64 MB written before each call, as a round's first draft step finds it) and warm (back to back, as the
    next steps of a chain can find it in L3). -> the table's rows."""
    import torch

    from kangaroo_rt import _cpu_ext

    N, K = 4096, 576
    rows = []
    print(f"\ndraft head {N} x {K}, 1 row: int8 estimates against the whole head")
    print(f"{'dtype':>6} {'cache':>5} {'whole ms':>9} {'int8 ms':>8} {'int8/whole':>11} {'GB/s':>6} {'% bw':>5}")
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(N, K, generator=gen) * 0.05).to(dtype)
        screen = list(_cpu_ext.make_head_screen(w))
        packed = dtype == torch.bfloat16
        head = cpu.pack_bf16(w) if packed else w
        q8_bytes = sum(t.numel() * t.element_size() for t in screen[:3])  # (err and wnorm are not read)
        x = (torch.randn(1, K, generator=gen) * 3).to(dtype)
        for cache, fl in (("cold", flush), ("warm", torch.ones(1, dtype=torch.uint8))):
            t_whole = cold_ms(lambda: cpu.linear(x, head, packed=packed), fl, repeats=60)
            t_q8 = cold_ms(lambda: cpu.screen_estimate(x, screen), fl, repeats=60)
            gbs = q8_bytes / t_q8 / 1e6
            row = {"dtype": str(dtype)[6:], "cache": cache, "rows": N, "whole_ms": t_whole, "int8_ms": t_q8,
                   "int8_vs_whole": t_q8 / t_whole, "int8_bytes": q8_bytes, "int8_gbs": gbs,
                   "fraction_of_read_bw": gbs / bandwidth}
            rows.append(row)
            print(f"{row['dtype']:>6} {cache:>5} {t_whole:>9.3f} {t_q8:>8.3f} {row['int8_vs_whole']:>10.2f}x "
                  f"{gbs:>6.1f} {100 * gbs / bandwidth:>5.1f}")
    return rows


def env_decode_ab(n_prompts: int, env: str, what: str):
    """SmolLM2 bf16 greedy decoding of n_prompts held-out prompts, plain and Kangaroo, with the switch ``env`` at "1"
    and "0" in turns (kernel_bench_utils.decode_ab); ``what`` names it in the lines printed."""

    def switch(on: bool) -> None:
        os.environ[env] = "1" if on else "0"

    try:
        return kb.decode_ab(n_prompts, switch, what, {"do_sample": False})
    finally:
        os.environ.pop(env, None)


def decode_ab(n_prompts: int):
    """The screen on and off (KANGAROO_RT_HEAD_SCREEN)."""
    from kangaroo_rt import _cpu_ext

    return env_decode_ab(n_prompts, _cpu_ext.SCREEN_ENV, "the screen")


def draft_decode_ab(n_prompts: int):
    """The draft head read as int8 and as its own dtype (KANGAROO_RT_DRAFT_INT8; plain decoding never drafts, so its
    ratio is the noise)."""
    from kangaroo_rt import _cpu_ext

    return env_decode_ab(n_prompts, _cpu_ext.DRAFT_INT8_ENV, "the int8 draft head")


if __name__ == "__main__":
    main()
