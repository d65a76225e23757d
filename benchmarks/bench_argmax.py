"""Microbenchmark of the CPU extension's greedy choices (csrc/cpu/argmax.cpp) against the torch reference: argmax
over SmolLM2's 49152 logits for a plain step's 1 row and a verify pass's 3 and 7 (torch: widened to fp32, then
argmax), and a draft step's token and confidence over a 4096-token draft vocabulary (torch: softmax, max). CPU
only: on a GPU the ops are torch's and Triton's.

    python benchmarks/bench_argmax.py --cpu [--threads N] [--out DIR]
"""
import kernel_bench_utils as kb

NAME = "bench_argmax"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args, cpu_only=True)
    import torch

    from kangaroo_rt import _cpu_ext, reference

    mod = _cpu_ext.load()
    vocab, draft_vocab = (97, 33) if smoke else (49152, 4096)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        for rows in (1, 3, 7):
            x = (4 * torch.randn(rows, vocab, device=device)).to(dtype)
            cases.append({"case": f"argmax {rows}x{vocab} {name}", "bytes": x.numel() * x.element_size(),
                          "check": lambda x=x: torch.testing.assert_close(mod.argmax(x), reference.argmax(x)),
                          "cpu": lambda x=x: mod.argmax(x), "torch": lambda x=x: reference.argmax(x)})
        x = (4 * torch.randn(1, draft_vocab, device=device)).to(dtype)
        cases.append({"case": f"greedy_with_confidence 1x{draft_vocab} {name}", "bytes": x.numel() * x.element_size(),
                      "check": lambda x=x: torch.testing.assert_close(mod.greedy_with_confidence(x)[0],
                                                                      reference.greedy_with_confidence(x)[0]),
                      "cpu": lambda x=x: mod.greedy_with_confidence(x),
                      "torch": lambda x=x: reference.greedy_with_confidence(x)})
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
