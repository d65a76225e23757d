"""Microbenchmark of the CPU extension's SwiGLU activation (csrc/cpu/silu_mul.cpp), silu(gate) * up, against
torch's ``F.silu(gate) * up``, on the halves of a fused gate/up output at SmolLM2's width (I = 1536) for decode,
verify and prefill rows. CPU only: on a GPU the op is torch's.

    python benchmarks/bench_silu_mul.py --cpu [--threads N] [--out DIR]
"""
import kernel_bench_utils as kb

NAME = "bench_silu_mul"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args, cpu_only=True)
    import torch

    from kangaroo_rt import _cpu_ext, reference

    mod = _cpu_ext.load()
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 8, 64):
            gate_up = 4 * torch.randn(rows, 2 * 1536, device=device).to(dtype)
            gate, up = gate_up.split(1536, dim=-1)
            es = gate.element_size()
            cases.append({"case": f"silu_mul {rows}x1536 {str(dtype)[6:]}", "bytes": 3 * gate.numel() * es,
                          "check": lambda g=gate, u=up: torch.testing.assert_close(
                              mod.silu_mul(g, u), reference.silu_mul(g, u), atol=1e-2, rtol=1e-2),
                          "cpu": lambda g=gate, u=up: mod.silu_mul(g, u),
                          "torch": lambda g=gate, u=up: reference.silu_mul(g, u)})
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
