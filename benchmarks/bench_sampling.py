"""Microbenchmark of the sampling kernels against the torch reference.

On a GPU (or --interpret): kernels/sampling.py, greedy argmax with its top-1 probability. With --cpu: the CPU
extension's sampling (csrc/cpu/sampling.cpp) over SmolLM2's 49152 logits, for a plain step's 1 row and a verify
pass's 3 and 7: process_logits with temperature 0.7 and top-p 0.9 (torch: a sort of the whole row), with top-k 50
and top-p 0.9 (torch: topk, then the sort), temperature alone (torch: softmax), and the draw of one token per row
(torch.multinomial), and a verification's acceptance (accept_sampling over k + 1 = 2 and 4 positions with uniforms
of 1, so that a draft stays only where p(d) > q(d): torch's gathers and residual, then its draw). GB/s counts the
logits read and the probabilities written (a draw, an acceptance: the probabilities read), all in cache, against the
DRAM read bandwidth: the fraction says how far the kernel is from a pure stream.

With --cpu and KANGAROO_RT_SAMPLING_DECODE=N (N prompts; `kangaroo-rt fetch smollm2` first) it also decodes N
held-out Spec-Bench prompts with SmolLM2 in bf16, sampling (temperature 0.7, top-p 0.9), 256 new tokens, plain and
Kangaroo, with these kernels and with torch's sampling (the reference's process_logits, torch.multinomial) in turns
in this one process: ms per token each way and their ratio; then the same with the sampled rounds' drafting in the
one-call chain and step by step from Python (the same tokens both ways); then with the sampled passes (plain steps
and verifications: layers, head, probabilities, draws, acceptance and commit) in one extension call and the whole
decode in one (csrc/cpu/target_pass.cpp, kangaroo_rt._cpu.decode_loop) against those passes from Python (the same
tokens both ways); last, the serving engine (kangaroo_rt.Engine: the N prompts as concurrent requests, each with
its own seed, temperature 0.7 and top-p 0.9, one a greedy request) with its rounds' drafting and passes in one call
each against step by step from Python (the same tokens both ways).

    python benchmarks/bench_sampling.py [--out DIR] [--interpret]
    KANGAROO_RT_SAMPLING_DECODE=3 python benchmarks/bench_sampling.py --cpu [--threads N] [--out DIR]
"""
import os

import kernel_bench_utils as kb

NAME = "bench_sampling"


def _check(mod, logits):
    from kangaroo_rt import reference

    if not bool((mod.greedy_with_confidence(logits)[0] == reference.greedy_with_confidence(logits)[0]).all()):
        raise AssertionError("the kernel's argmax differs from the reference")


def _cpu_cases(device, smoke):
    import torch

    from kangaroo_rt import _cpu_ext, reference

    _cpu_ext.load()
    vocab = 97 if smoke else 49152
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype)[6:]
        for rows in (1, 3, 7):
            logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype)
            traffic = logits.numel() * (logits.element_size() + 4)
            for label, args in (("T0.7 p0.9", (0.7, None, 0.9)), ("T0.7 k50 p0.9", (0.7, 50, 0.9)),
                                ("T0.7", (0.7, None, None))):
                cases.append({
                    "case": f"process_logits {label} {rows}x{vocab} {name}", "bytes": traffic,
                    "check": lambda x=logits, a=args: _check_probs(_cpu_ext.process_logits(x, *a),
                                                                   reference.process_logits(x, *a)),
                    "cpu": lambda x=logits, a=args: _cpu_ext.process_logits(x, *a),
                    "torch": lambda x=logits, a=args: reference.process_logits(x, *a),
                })
        if dtype == torch.float32:
            for rows in (1, 7):
                probs = reference.process_logits((3 * torch.randn(rows, vocab, generator=gen)), 1.0, None, None)
                cases.append({"case": f"sample {rows}x{vocab}", "bytes": probs.numel() * 4,
                              "cpu": lambda p=probs: _cpu_ext.sample(p, gen),
                              "torch": lambda p=probs: reference.sample(p, gen)})
            for k in (1, 3):  # a verification's acceptance of k drafts (one row)
                p = reference.process_logits(3 * torch.randn(1, k + 1, vocab, generator=gen), 0.7, None, 0.9)
                q = reference.process_logits(3 * torch.randn(1, k, vocab, generator=gen), 0.7, None, 0.9)
                drafts = q[0].argmax(-1)[None]
                args = (drafts, torch.full((1,), k), p, q, torch.ones(1, k))
                cases.append({"case": f"accept_sampling 1x{k + 1}x{vocab}", "bytes": (p.numel() + q.numel()) * 4,
                              "cpu": lambda a=args: _cpu_ext.accept_sampling(*a, gen),
                              "torch": lambda a=args: reference.accept_sampling(*a, gen)})
    return cases


SAMPLING_OPS = ("process_logits", "sample", "accept_sampling")


SAMPLED = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def _one_call_sampling(paths, on: bool) -> None:
    """The Decoder's one-call paths named in ``paths`` (_cpu_chain, _cpu_pass, _cpu_decode) as built (on), or
    serving greedy decoding only, sampled decoding going step by step from Python (off)."""
    from kangaroo_rt.speculative import Decoder

    for name in paths:
        built = _BUILT.setdefault(name, getattr(Decoder, name))
        setattr(Decoder, name, built if on else (lambda built: lambda self, state, *args: built(self, state, *args)
                                                 if state.sampler.greedy else None)(built))


_BUILT = {}
ONE_CALL = ("_cpu_chain", "_cpu_pass", "_cpu_decode")


def _decode_ab(n_prompts):
    """Sampled decoding with the CPU extension's sampling ops and with torch's (the reference's, registered as the
    cpu backend for the off turns; the one-call paths, which call the kernels themselves, off then too), in turns
    (kernel_bench_utils.decode_ab)."""
    from kangaroo_rt import _cpu_ext, ops, reference

    def switch(on: bool) -> None:
        for op in SAMPLING_OPS:
            ops.register(op, "cpu", ops.LazyExtensionOp(op, _cpu_ext) if on else getattr(reference, op), ("cpu",))
        _one_call_sampling(ONE_CALL, on)

    try:
        return kb.decode_ab(n_prompts, switch, "the sampling kernels", SAMPLED)
    finally:
        switch(True)


def _decode_chain_ab(n_prompts):
    """Sampled decoding with the rounds' drafting in the one-call chain (csrc/cpu/draft.cpp) and step by step from
    Python, the passes from Python both ways, in turns: both take the same uniforms, so the tokens must be the
    same."""
    try:
        _one_call_sampling(("_cpu_pass", "_cpu_decode"), False)
        return kb.decode_ab(n_prompts, lambda on: _one_call_sampling(("_cpu_chain",), on), "the one-call sampled chain",
                            SAMPLED)
    finally:
        _one_call_sampling(ONE_CALL, True)


def _decode_pass_ab(n_prompts):
    """Sampled decoding with the passes and the loop in one extension call (Decoder._cpu_pass, ._cpu_decode) and with
    the passes from Python (the drafting in the one-call chain both ways), in turns: the same uniforms from the same
    generator, so the tokens must be the same."""
    try:
        return kb.decode_ab(n_prompts, lambda on: _one_call_sampling(("_cpu_pass", "_cpu_decode"), on),
                            "the one-call sampled passes and loop", SAMPLED)
    finally:
        _one_call_sampling(ONE_CALL, True)


def _engine_ab(n_prompts, new_tokens=256, repeats=3):
    """The engine's sampled rounds (RowSampling: a generator and settings per request) with the one-call chain and
    passes and step by step from Python, in turns: n_prompts concurrent requests (the last one greedy), plain and
    Kangaroo. -> {method: {on_ms, off_ms (ms per token, medians), on_vs_off (median paired ratio), same_tokens}}."""
    if n_prompts <= 0:
        return None
    import torch

    import kangaroo_rt
    from kangaroo_rt.engine import RequestParams

    model = kangaroo_rt.load_default(dtype=torch.bfloat16, name="smollm2")
    prompts = kb.held_out_prompts(n_prompts)
    methods = (("plain", None), ("kangaroo", model.kangaroo))
    times, tokens = {}, {}
    try:
        for r in range(repeats + 1):
            for method, kcfg in methods:
                for on in (True, False):
                    _one_call_sampling(ONE_CALL, on)
                    params = [RequestParams(max_new_tokens=new_tokens, seed=i, **(
                        {} if i == len(prompts) - 1 and i > 0 else dict(temperature=0.7, top_p=0.9)))
                        for i in range(len(prompts))]
                    seconds, got, _ = kb.serve_all(model, prompts, params, 1024, kcfg)
                    if r > 0:
                        times.setdefault((method, on), []).append(seconds / sum(len(t) for t in got) * 1e3)
                    tokens[(method, on)] = got
    finally:
        _one_call_sampling(ONE_CALL, True)
    return {method: kb.ab_entry(f"engine {method}", "the one-call sampled rounds", times[(method, True)],
                                times[(method, False)], tokens[(method, True)], tokens[(method, False)])
            for method, _ in methods}


def _check_probs(got, want):
    """Ties in bf16 scores may sit at the top-p cut, where torch's unstable sort keeps any of them: compare the
    number of kept tokens and the probabilities where both keep a token."""
    import torch

    if not torch.equal((got > 0).sum(-1), (want > 0).sum(-1)):
        raise AssertionError("the kernel keeps another number of tokens than the reference")
    both = (got > 0) & (want > 0)
    torch.testing.assert_close(got[both], want[both], atol=1e-6, rtol=1e-4)


def main():
    args = kb.parse_args(__doc__)
    device, smoke = kb.setup(NAME, args)
    if args.cpu:
        n_prompts = int(os.environ.get("KANGAROO_RT_SAMPLING_DECODE", "0"))
        kb.run_cases(NAME, _cpu_cases(device, smoke), args, device, smoke,
                     extra=lambda: {"decode": _decode_ab(n_prompts), "decode_chain": _decode_chain_ab(n_prompts),
                                    "decode_pass": _decode_pass_ab(n_prompts), "engine": _engine_ab(n_prompts)})
        return
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
