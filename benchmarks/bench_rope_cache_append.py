"""Microbenchmark of kernels/rope_cache_append.py (RoPE + KV-cache append) vs the torch reference.

    python benchmarks/bench_rope_cache_append.py [--out DIR] [--interpret]
"""
import kernel_bench_utils as kb

NAME = "bench_rope_cache_append"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    import torch

    from kangaroo_rt import ops, reference

    mod = ops.load_kernel_module("rope_cache_append")
    dtype = torch.float32 if smoke else torch.float16
    # (batch, q heads, kv heads, q_len, max_len, head_dim)
    shapes = ([(2, 4, 2, 3, 16, 64)] if smoke else
              [(1, 32, 32, 1, 4096, 128), (8, 32, 32, 7, 2048, 128), (8, 32, 8, 1, 4096, 128),
               (1, 32, 32, 300, 4096, 128)])
    cases = []
    for b, hq, hkv, q_len, t_max, d in shapes:
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
            "triton": lambda a=(q, k, v, cos, sin, kc, vc, positions): mod.rope_cache_append(*a),
            "torch": lambda a=(q, k, v, cos, sin, kc, vc, positions): reference.rope_cache_append(*a),
        })
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
