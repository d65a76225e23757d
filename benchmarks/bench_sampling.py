"""Microbenchmark of kernels/sampling.py (greedy argmax + top-1 probability) vs the torch reference.

    python benchmarks/bench_sampling.py [--out DIR] [--interpret]
"""
import kernel_bench_utils as kb

NAME = "bench_sampling"


def _check(mod, logits):
    from kangaroo_rt import reference

    if not bool((mod.greedy_with_confidence(logits)[0] == reference.greedy_with_confidence(logits)[0]).all()):
        raise AssertionError("the kernel's argmax differs from the reference")


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    import torch

    from kangaroo_rt import ops, reference

    mod = ops.load_kernel_module("sampling")
    shapes = [(2, 97, torch.float32)] if smoke else [(1, 32000, torch.float16), (8, 32000, torch.float16),
                                                     (64, 32000, torch.float16), (8, 128256, torch.bfloat16),
                                                     (8, 32000, torch.float32)]
    cases = []
    for b, vocab, dtype in shapes:
        logits = torch.randn(b, vocab, device=device, dtype=dtype) * 4
        cases.append({
            "case": f"greedy_with_confidence B{b} V{vocab} {str(dtype)[6:]}",
            "bytes": logits.numel() * logits.element_size(),
            "check": lambda x=logits: _check(mod, x),
            "triton": lambda x=logits: mod.greedy_with_confidence(x),
            "torch": lambda x=logits: reference.greedy_with_confidence(x),
        })
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
