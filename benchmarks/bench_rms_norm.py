"""Microbenchmark of kernels/rms_norm.py (RMSNorm, fused residual add + RMSNorm) vs the torch reference; with
--cpu, of the CPU extension's (csrc/cpu/rms_norm.cpp) at SmolLM2's width (576) for decode and verify rows.

    python benchmarks/bench_rms_norm.py [--out DIR] [--interpret | --cpu [--threads N]]
"""
import kernel_bench_utils as kb

NAME = "bench_rms_norm"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    import torch

    from kangaroo_rt import ops, reference

    if args.cpu:
        from kangaroo_rt import _cpu_ext

        mod, dtypes, shapes = _cpu_ext.load(), (torch.float32, torch.bfloat16), [(1, 576), (7, 576), (300, 576)]
    else:
        mod = ops.load_kernel_module("rms_norm")
        dtypes = (torch.float32 if smoke else torch.float16,)
        shapes = [(3, 64)] if smoke else [(1, 4096), (7, 4096), (56, 4096), (300, 4096), (8, 5120)]
    kernel = "cpu" if args.cpu else "triton"
    cases = []
    for dtype, (rows, d) in [(dt, sh) for dt in dtypes for sh in shapes]:
        x = torch.randn(rows, d, device=device, dtype=dtype)
        r = torch.randn(rows, d, device=device, dtype=dtype)
        w = torch.randn(d, device=device, dtype=dtype)
        es = x.element_size()
        tag = f"{rows}x{d} {str(dtype)[6:]}"
        cases.append({"case": f"rms_norm {tag}", "bytes": 2 * x.numel() * es + d * es,
                      "check": lambda x=x, w=w: torch.testing.assert_close(
                          mod.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), atol=1e-2, rtol=1e-2),
                      kernel: lambda x=x, w=w: mod.rms_norm(x, w, 1e-6),
                      "torch": lambda x=x, w=w: reference.rms_norm(x, w, 1e-6)})
        cases.append({"case": f"add_rms_norm {tag}", "bytes": 4 * x.numel() * es + d * es,
                      kernel: lambda x=x, r=r, w=w: mod.add_rms_norm(x, r, w, 1e-6),
                      "torch": lambda x=x, r=r, w=w: reference.add_rms_norm(x, r, w, 1e-6)})
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
