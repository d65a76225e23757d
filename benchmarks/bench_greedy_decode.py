"""What decoding to the end in one extension call buys on the CPU (``kangaroo_rt._cpu.decode_loop``, used by
``Decoder.decode`` when no streamer waits for each step), measured in one process against the Python loop it
replaces (one ``target_pass`` call a plain step; ``draft_chain`` and ``target_pass`` a Kangaroo round).

The same model decodes each prompt both ways, plain and Kangaroo, the order alternating prompt by prompt and over two
passes, so that the host's bandwidth drift hits both alike (benchmarks/decode_ab.py). Reports tokens/s per (loop,
method), the one-call / Python ratios, and whether every output is identical (it must be: the same passes run).

    PYTHONPATH=. python benchmarks/bench_greedy_decode.py [--model smollm2] [--prompts 8] [--max-new-tokens 400]
        [--dtype bfloat16] [--threads 2] [--out DIR] [--smoke]

Prints a table and writes ``<out>/bench_greedy_decode.json`` (``bench_greedy_decode-smoke.json`` with --smoke: a
random tiny model, a few tokens; the numbers only show that the script works).
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_ab  # noqa: E402
from kangaroo_rt import _cpu_ext, models  # noqa: E402
from kangaroo_rt.speculative import Decoder  # noqa: E402

NAME = "bench_greedy_decode"


@contextlib.contextmanager
def python_loop() -> Iterator[None]:
    """Within, Decoder.decode runs its steps from Python (the one-call loop off)."""
    one_call = Decoder._cpu_decode
    Decoder._cpu_decode = lambda self, *args: None
    try:
        yield
    finally:
        Decoder._cpu_decode = one_call


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = decode_ab.parse_args(__doc__, argv)
    torch.set_num_threads(args.threads)
    if not _cpu_ext.is_available():
        print(f"{NAME}: kangaroo_rt._cpu is not built here; nothing to compare")
        return 0
    if args.smoke:
        model = decode_ab.smoke_model()
    else:
        model = models.load_named(args.model, dtype=decode_ab.DTYPES[args.dtype])
    prompts = decode_ab.prompts(args)
    tokens = decode_ab.SMOKE_TOKENS if args.smoke else args.max_new_tokens

    def decode(loop: str, method: str, ids: torch.Tensor, n: int) -> torch.Tensor:
        with python_loop() if loop == "python" else contextlib.nullcontext():
            return model.generate(ids, max_new_tokens=n, **({"kangaroo": None} if method == "ar" else {}))

    rate, identical = decode_ab.alternate(("python", "one_call"), decode, prompts, tokens)
    return decode_ab.report(NAME, args, ("python", "one_call"), ("Python loop", "one call"), "one_call_vs_python",
                            rate, identical, len(prompts), f"isa {_cpu_ext.load().isa()}", {})


if __name__ == "__main__":
    sys.exit(main())
