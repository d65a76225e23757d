"""What 2 MB pages for the weights buy on CPU decoding (kangaroo_rt/hugepages.py), measured in one process.

The same model is loaded twice, once with ``KANGAROO_RT_HUGEPAGES=0`` (torch's allocations: 4 KB pages under the
usual ``madvise`` policy) and once placed in a mapping advised for huge pages. Each prompt is decoded by both, plain
and Kangaroo, the order alternating prompt by prompt and over two passes, so that the host's bandwidth drift hits
both alike (benchmarks/decode_ab.py). Reports tokens/s per (pages, method), the 2 MB / 4 KB ratios, and whether
every output is identical (it must be: the bytes are the same).

    PYTHONPATH=. python benchmarks/bench_hugepages.py [--model smollm2] [--prompts 8] [--max-new-tokens 400]
        [--dtype bfloat16] [--threads 2] [--out DIR] [--smoke]

Prints a table and writes ``<out>/bench_hugepages.json`` (``bench_hugepages-smoke.json`` with --smoke: a random
tiny model placed with no size threshold, a few tokens; the numbers only show that the script works).
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import os
import sys
from typing import Dict, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_ab  # noqa: E402
from kangaroo_rt import KangarooModel, hugepages, models  # noqa: E402

NAME = "bench_hugepages"


def _models(args) -> Dict[str, KangarooModel]:
    """{"4k": model, "2m": the same model placed}."""
    if args.smoke:
        return {"4k": decode_ab.smoke_model(),
                "2m": decode_ab.smoke_model(place=lambda target: hugepages.place(target, min_bytes=0))}
    dtype = decode_ab.DTYPES[args.dtype]
    saved = os.environ.get("KANGAROO_RT_HUGEPAGES")
    try:
        os.environ["KANGAROO_RT_HUGEPAGES"] = "0"
        small = models.load_named(args.model, dtype=dtype)
        os.environ["KANGAROO_RT_HUGEPAGES"] = "1"
        huge = models.load_named(args.model, dtype=dtype)
    finally:
        if saved is None:
            os.environ.pop("KANGAROO_RT_HUGEPAGES", None)
        else:
            os.environ["KANGAROO_RT_HUGEPAGES"] = saved
    return {"4k": small, "2m": huge}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = decode_ab.parse_args(__doc__, argv)
    torch.set_num_threads(args.threads)
    if not hugepages.available():
        print(f"{NAME}: no transparent huge pages to advise here (or KANGAROO_RT_HUGEPAGES=0); nothing to compare")
        return 0
    built = _models(args)
    prompts = decode_ab.prompts(args)
    tokens = decode_ab.SMOKE_TOKENS if args.smoke else args.max_new_tokens

    def decode(pages: str, method: str, ids: torch.Tensor, n: int) -> torch.Tensor:
        return built[pages].generate(ids, max_new_tokens=n, **({"kangaroo": None} if method == "ar" else {}))

    rate, identical = decode_ab.alternate(("4k", "2m"), decode, prompts, tokens)
    return decode_ab.report(NAME, args, ("4k", "2m"), ("4 KB", "2 MB"), "two_mb_vs_four_kb", rate, identical,
                            len(prompts), f"huge pages now {hugepages.huge_page_bytes() / 2**20:.0f} MB of this process",
                            {})


if __name__ == "__main__":
    sys.exit(main())
