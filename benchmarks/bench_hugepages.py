"""What 2 MB pages for the weights buy on CPU decoding (kangaroo_rt/hugepages.py), measured in one process.

The same model is loaded twice, once with ``KANGAROO_RT_HUGEPAGES=0`` (torch's allocations: 4 KB pages under the
usual ``madvise`` policy) and once placed in a mapping advised for huge pages. Each prompt is decoded by both, plain
and Kangaroo, the order alternating prompt by prompt and over two passes, so that the host's bandwidth drift hits
both alike (benchmarks/decode_ab.py). Reports tokens/s per (pages, method), the 2 MB / 4 KB ratios, and whether
every output is identical (it must be: the bytes are the same).

    PYTHONPATH=. python benchmarks/bench_hugepages.py [--kv-cache] [--model smollm2] [--prompts 8]
        [--max-new-tokens 400] [--dtype bfloat16] [--threads 2] [--out DIR] [--smoke]

With ``--kv-cache``, one model (its weights in 2 MB pages) decodes every prompt with two target KV caches of the
same size in turn (:class:`kangaroo_rt.StaticKVCache`): one in torch's 4 KB pages, one in the mapping advised for
huge pages that the cache takes on the CPU. (The adapter's one-layer cache is the same for both.)

Prints a table and writes ``<out>/bench_hugepages.json`` (``bench_hugepages-kv.json`` with --kv-cache;
``...-smoke.json`` with --smoke: a random tiny model placed with no size threshold, a few tokens; the numbers only
show that the script works).
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import functools
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_ab  # noqa: E402
from kangaroo_rt import KangarooModel, StaticKVCache, hugepages, models  # noqa: E402

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


def _kv_model(args, positions: int) -> Tuple[KangarooModel, Dict[str, StaticKVCache]]:
    """The model of --kv-cache, its cache length fixed to hold ``positions`` (+ a round's drafts), and its target
    caches of the decoder's size: {"4k": one in 4 KB pages, "2m": one in 2 MB pages}."""
    if args.smoke:
        model = decode_ab.smoke_model(place=functools.partial(hugepages.place, min_bytes=0))
    else:
        model = models.load_named(args.model, dtype=decode_ab.DTYPES[args.dtype])
    model.max_len = positions + model.kangaroo.gamma + 2
    model.decoder.ensure_caches(1, model.max_len)
    batch, length = model.decoder.cache.max_batch, model.decoder.cache.max_len
    model.decoder.cache = None  # (freed before the two are made)
    return model, {pages: model.target.new_cache(batch, length, huge_pages=pages == "2m") for pages in ("4k", "2m")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = decode_ab.parse_args(__doc__, argv, extra=lambda p: p.add_argument(
        "--kv-cache", action="store_true", help="weights in 2 MB pages on both sides; compare the KV cache's pages"))
    torch.set_num_threads(args.threads)
    if not hugepages.available():
        print(f"{NAME}: no transparent huge pages to advise here (or KANGAROO_RT_HUGEPAGES=0); nothing to compare")
        return 0
    prompts = decode_ab.prompts(args)
    tokens = decode_ab.SMOKE_TOKENS if args.smoke else args.max_new_tokens
    caches: Optional[Dict[str, StaticKVCache]] = None
    if args.kv_cache:
        model, caches = _kv_model(args, max(p.shape[1] for p in prompts) + tokens)
        built = {"4k": model, "2m": model}
    else:
        built = _models(args)

    def decode(pages: str, method: str, ids: torch.Tensor, n: int) -> torch.Tensor:
        if caches is not None:
            built[pages].decoder.cache = caches[pages]
        return built[pages].generate(ids, max_new_tokens=n, **({"kangaroo": None} if method == "ar" else {}))

    rate, identical = decode_ab.alternate(("4k", "2m"), decode, prompts, tokens)
    what = f"huge pages now {hugepages.huge_page_bytes() / 2**20:.0f} MB of this process"
    if args.kv_cache:
        return decode_ab.report(NAME + "-kv", args, ("4k", "2m"), ("KV 4 KB", "KV 2 MB"), "two_mb_vs_four_kb", rate,
                                identical, len(prompts), "weights in 2 MB pages on both sides; " + what,
                                {"compared": "kv_cache"})
    return decode_ab.report(NAME, args, ("4k", "2m"), ("4 KB", "2 MB"), "two_mb_vs_four_kb", rate, identical,
                            len(prompts), what, {"compared": "weights"})


if __name__ == "__main__":
    sys.exit(main())
