"""Microbenchmark of kernels/attention.py (decode / verify / prefill over the static cache) vs the torch reference;
with --cpu, of the CPU extension's attention (csrc/cpu/attention.cpp) at SmolLM2's decode and verify shapes.

    python benchmarks/bench_attention.py [--out DIR] [--interpret | --cpu [--threads N]]
"""
import kernel_bench_utils as kb

NAME = "bench_attention"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    import torch

    from kangaroo_rt import ops, reference

    if args.cpu:
        return kb.run_cases(NAME, _cpu_cases(), args, device, smoke)
    attn = ops.load_kernel_module("attention")
    dtype = torch.float32 if smoke else torch.float16
    # (batch, q heads, kv heads, q_len, context, head_dim): 7B-like (32 heads of 128), GQA 4:1, prefill.
    shapes = ([(2, 4, 2, 3, 64, 64)] if smoke else
              [(1, 32, 32, 1, 1024, 128), (1, 32, 32, 7, 1024, 128), (1, 32, 32, 1, 4096, 128),
               (4, 32, 32, 7, 2048, 128), (8, 32, 8, 1, 4096, 128), (8, 32, 8, 7, 4096, 128),
               (1, 32, 32, 300, 300, 128)])
    cases = []
    for b, hq, hkv, q_len, ctx, d in shapes:
        q = torch.randn(b, hq, q_len, d, device=device, dtype=dtype)
        kc = torch.randn(b, hkv, ctx, d, device=device, dtype=dtype)
        vc = torch.randn(b, hkv, ctx, d, device=device, dtype=dtype)
        positions = (ctx - q_len + torch.arange(q_len, device=device))[None].expand(b, q_len).contiguous()
        es = q.element_size()
        nbytes = 2 * b * hkv * ctx * d * es + 2 * q.numel() * es

        def check(q=q, kc=kc, vc=vc, positions=positions):
            torch.testing.assert_close(attn.attention(q, kc, vc, positions),
                                       reference.attention(q, kc, vc, positions), atol=2e-2, rtol=2e-2)

        cases.append({
            "case": f"B{b} Hq{hq} Hkv{hkv} q{q_len} ctx{ctx} d{d} {str(dtype)[6:]}",
            "bytes": nbytes,
            "check": check,
            "triton": lambda q=q, kc=kc, vc=vc, p=positions: attn.attention(q, kc, vc, p),
            "torch": lambda q=q, kc=kc, vc=vc, p=positions: reference.attention(q, kc, vc, p),
        })
    kb.run_cases(NAME, cases, args, device, smoke)



def _cpu_cases():
    """SmolLM2-135M (9 query heads, 3 kv heads of 64): a plain step, verify over 5 and 7 tokens, batch 4."""
    import torch

    from kangaroo_rt import _cpu_ext, reference

    cpu = _cpu_ext.load()
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for b, q_len, ctx in ((1, 1, 512), (1, 5, 512), (1, 7, 512), (1, 1, 2048), (4, 5, 512)):
            hq, hkv, d = 9, 3, 64
            q = torch.randn(b, q_len, hq, d, dtype=dtype).transpose(1, 2)
            kc = torch.randn(b, hkv, ctx + q_len, d, dtype=dtype)
            vc = torch.randn_like(kc)
            positions = (ctx + torch.arange(q_len))[None].expand(b, q_len).contiguous()
            es = q.element_size()
            cases.append({
                "case": f"B{b} Hq{hq} Hkv{hkv} q{q_len} ctx{ctx} d{d} {str(dtype)[6:]}",
                "bytes": 2 * b * hkv * (ctx + q_len) * d * es + 2 * q.numel() * es,
                "check": lambda a=(q, kc, vc, positions): torch.testing.assert_close(
                    cpu.attention(*a, None), reference.attention(*a), atol=2e-2, rtol=2e-2),
                "cpu": lambda a=(q, kc, vc, positions): cpu.attention(*a, None),
                "torch": lambda a=(q, kc, vc, positions): reference.attention(*a),
            })
    return cases


if __name__ == "__main__":
    main()
