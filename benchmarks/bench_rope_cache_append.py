"""Microbenchmark of kernels/rope_cache_append.py (RoPE + KV-cache append) vs the torch reference; with --cpu, of
the CPU extension's (csrc/cpu/rope_cache_append.cpp) at SmolLM2's decode and verify shapes.

    python benchmarks/bench_rope_cache_append.py [--out DIR] [--interpret | --cpu [--threads N]]
"""
import kernel_bench_utils as kb

NAME = "bench_rope_cache_append"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    import torch

    from kangaroo_rt import ops, reference

    if args.cpu:
        from kangaroo_rt import _cpu_ext

        mod, dtypes = _cpu_ext.load(), (torch.float32, torch.bfloat16)
        shapes = [(1, 9, 3, 1, 2048, 64), (1, 9, 3, 7, 2048, 64), (4, 9, 3, 5, 2048, 64), (1, 9, 3, 300, 2048, 64)]
    else:
        mod = ops.load_kernel_module("rope_cache_append")
        dtypes = (torch.float32 if smoke else torch.float16,)
        # (batch, q heads, kv heads, q_len, max_len, head_dim)
        shapes = ([(2, 4, 2, 3, 16, 64)] if smoke else
                  [(1, 32, 32, 1, 4096, 128), (8, 32, 32, 7, 2048, 128), (8, 32, 8, 1, 4096, 128),
                   (1, 32, 32, 300, 4096, 128)])
    kernel = "cpu" if args.cpu else "triton"
    cases = []
    for dtype, (b, hq, hkv, q_len, t_max, d) in [(dt, sh) for dt in dtypes for sh in shapes]:
        q = torch.randn(b, q_len, hq, d, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, q_len, hkv, d, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, q_len, hkv, d, device=device, dtype=dtype).transpose(1, 2)
        positions = (t_max - q_len + torch.arange(q_len, device=device))[None].expand(b, q_len).contiguous()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
        cos, sin = reference.rope_cos_sin(positions, inv_freq, dtype)
        kc = torch.zeros(b, hkv, t_max, d, device=device, dtype=dtype)
        vc = torch.zeros_like(kc)
        es = q.element_size()
        nbytes = 2 * (q.numel() + k.numel() + v.numel() + cos.numel()) * es
        cases.append({
            "case": f"B{b} Hq{hq} Hkv{hkv} q{q_len} d{d} {str(dtype)[6:]}",
            "bytes": nbytes,
            kernel: lambda a=(q, k, v, cos, sin, kc, vc, positions): mod.rope_cache_append(*a),
            "torch": lambda a=(q, k, v, cos, sin, kc, vc, positions): reference.rope_cache_append(*a),
        })
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
