"""Microbenchmark of kernels/accept.py (acceptance + commit of a Kangaroo round) vs the torch reference; with
--cpu, of the CPU extension's commit ops (csrc/cpu/accept.cpp: accept_greedy_commit, and commit_tokens as a plain
decoding step commits one token a row).

These ops move little data: the point is launch count (one kernel instead of a dozen torch ops), and on the CPU
the call count (one call instead of about 25 tensor ops).

    python benchmarks/bench_accept.py [--out DIR] [--interpret | --cpu [--threads N]]
"""
import kernel_bench_utils as kb

NAME = "bench_accept"


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    import torch

    from kangaroo_rt import ops, reference

    if args.cpu:
        from kangaroo_rt import _cpu_ext

        mod, kernel = _cpu_ext.load(), "cpu"
    else:
        mod, kernel = ops.load_kernel_module("accept"), "triton"
    torch.manual_seed(0)
    shapes = [(2, 3, 97)] if smoke else [(1, 6, 32000), (8, 6, 32000), (64, 6, 32000)]
    eos = torch.tensor([2], device=device)
    cases = []
    for b, k, vocab in shapes:
        target = torch.randint(3, vocab, (b, k + 1), device=device)
        drafts = target[:, :k].clone()
        # rejected halfway: another token in [3, vocab) (a bare + 1 could reach vocab and index past the probs)
        drafts[:, k // 2] = (drafts[:, k // 2] - 2) % (vocab - 3) + 3
        n_drafts = torch.full((b,), k, device=device)
        out = torch.zeros(b, 4096, dtype=torch.long, device=device)
        n_gen = torch.zeros(b, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        pos = torch.zeros(b, dtype=torch.long, device=device)

        def commit(fn, a=(drafts, n_drafts, target, out, n_gen, finished, pos)):
            a[4].zero_()
            a[6].zero_()
            return fn(*a, eos)

        cases.append({"case": f"accept_greedy_commit B{b} K{k}", "bytes": 3 * b * (k + 1) * 8,
                      kernel: lambda c=commit: c(mod.accept_greedy_commit),
                      "torch": lambda c=commit: c(reference.accept_greedy_commit)})
        if args.cpu:  # the CPU extension has no sampling kernels; a plain step's one-token commit instead
            ones = torch.ones(b, dtype=torch.long, device=device)

            def commit_one(fn, a=(out, n_gen, finished, target[:, :1], ones)):
                a[1].zero_()
                return fn(*a, eos)

            cases.append({"case": f"commit_tokens B{b} n1", "bytes": 3 * b * 8,
                          "cpu": lambda c=commit_one: c(mod.commit_tokens),
                          "torch": lambda c=commit_one: c(reference.commit_tokens)})
            continue
        p = torch.softmax(torch.randn(b, k + 1, vocab, device=device), -1)
        q = torch.softmax(torch.randn(b, k, vocab, device=device), -1)
        u = torch.rand(b, k, device=device)
        cases.append({"case": f"accept_sampling_counts B{b} K{k} V{vocab}", "bytes": 4 * b * k * 8,
                      "triton": lambda a=(drafts, n_drafts, p, q, u): mod.accept_sampling_counts(*a),
                      "torch": lambda a=(drafts, n_drafts, p, q, u): reference.accept_sampling_counts(*a)})
    kb.run_cases(NAME, cases, args, device, smoke)


if __name__ == "__main__":
    main()
