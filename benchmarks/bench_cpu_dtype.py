"""Which dtype should a named model decode in on this machine? Measured, not assumed.

For each dtype, in one run on the same prompts (chat-templated, batch 1, greedy): transformers ``generate``,
this project's plain decoding and Kangaroo with the model's shipped adapter. Every method runs in the dtype it
is compared in; the checks are within a dtype. Kangaroo == plain (losslessness) must hold in every dtype; plain ==
transformers greedy must hold in float32, where both compute in the same precision. In a 16-bit dtype it is
reported, not required: two implementations round bf16/fp16 differently (this project's CPU kernel accumulates
a row in fp32 in one fixed order and rounds once; torch's GEMM blocks by shape), so a near-tie can flip. The
fastest Kangaroo decoding among the dtypes whose checks held is the recommendation: speed alone decides between
them. The registry's ``cpu_dtype`` in the shipped ``kangaroo.json`` records the choice.

    PYTHONPATH=. python benchmarks/bench_cpu_dtype.py --model smollm2 --threads 2 [--smoke]

Prints a table and writes ``benchmarks/results/cpu_dtype-<model>.json`` (or ``--out``). ``--smoke`` runs a random
tiny Llama (written in the HF layout to a temporary folder, so that transformers loads the same weights) with a
random adapter on two random prompts: it shows that the script works, and its numbers mean nothing.
"""
# gpu_suite: gpu-args --smoke
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_embedded import measure  # noqa: E402
from kernel_bench_utils import write_result  # noqa: E402

from kangaroo_rt import models  # noqa: E402
from kangaroo_rt.adapter import Adapter  # noqa: E402
from kangaroo_rt.bench import device_name  # noqa: E402
from kangaroo_rt.loading import load_model  # noqa: E402

# Not Spec-Bench, not training prompts: four everyday chat requests.
PROMPTS = ["What is the capital of France, and what is it known for?",
           "Explain in a few sentences how a refrigerator keeps food cold.",
           "Write a short email asking a colleague to move a meeting to Friday.",
           "List three good habits for a healthy sleep schedule and say why each helps."]
DTYPES = ("float32", "bfloat16", "float16")


def _hf_tokens_per_s(hf, prompts: List[torch.Tensor], new_tokens: int, want: List[torch.Tensor]) -> Dict:
    """transformers greedy decoding of every prompt (stopping at EOS, as ``want`` did): speed and how many
    differ from ``want``."""
    hf.generate(prompts[0], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    seconds, tokens, mismatches = 0.0, 0, 0
    for ids, ours in zip(prompts, want):
        t_start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        seconds += time.perf_counter() - t_start
        tokens += out.shape[1] - ids.shape[1]
        mismatches += int(out.tolist() != ours.tolist())
    return {"hf_tokens_per_s": tokens / seconds, "hf_mismatches": mismatches}


def _plain_sequences(target, prompts: List[torch.Tensor], new_tokens: int) -> List[torch.Tensor]:
    from kangaroo_rt.generate import KangarooModel

    model = KangarooModel(target, None)
    return [model.generate(ids, max_new_tokens=new_tokens, kangaroo=None) for ids in prompts]  # stops at EOS


def _write_smoke_model(folder: str, seed: int = 0) -> Dict:
    """A random tiny Llama in the HF layout at ``folder``, its head scaled up so that greedy choices have clear
    margins (fp32 plain == transformers then does not hinge on round-off) -> the Kangaroo settings to run it with."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)
    hf.save_pretrained(folder)
    return {"exit_layer": 1, "gamma": 3, "eta": 0.3}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=[n for n in models.REGISTRY if n != "embedded"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--smoke", action="store_true",
                        help="a random tiny model, 8 tokens on two random prompts: shows that the script works")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be positive")
    torch.set_num_threads(args.threads)
    if not args.smoke:
        tok = models.load_tokenizer(args.model)
        prompts = [torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"]])
                   for p in PROMPTS]
        return _run(args, models.model_folder(args.model), models.settings(args.model), args.model, prompts)
    args.max_new_tokens = min(args.max_new_tokens, 8)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 211, (1, 6), generator=gen) for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="bench_cpu_dtype-") as folder:
        return _run(args, folder, _write_smoke_model(folder), "smoke", prompts)


def _run(args: argparse.Namespace, folder: str, shipped: Dict, name_in_file: str, prompts: List[torch.Tensor]) -> int:
    """Every dtype on the model at folder (shipped: its Kangaroo settings), the table, the JSON -> exit status."""
    from transformers import AutoModelForCausalLM

    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        target = load_model(folder, dtype=dtype)
        if args.smoke:
            adapter = Adapter.random(target.config, seed=1, dtype=dtype)
        else:
            adapter = Adapter.from_pretrained(models.entry(args.model).adapter_folder, target.config, dtype=dtype)
        r = measure(target, adapter, shipped["exit_layer"], prompts, gamma=shipped["gamma"], eta=shipped["eta"],
                    max_new_tokens=args.max_new_tokens)
        plain = _plain_sequences(target, prompts, args.max_new_tokens)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        r.update(_hf_tokens_per_s(hf, prompts, args.max_new_tokens, plain), dtype=name)
        r["lossless"] = r["greedy_mismatches"] == 0 and (name != "float32" or r["hf_mismatches"] == 0)
        rows.append(r)
        del hf, target, adapter
        print(f"{name}: plain {r['plain_tokens_per_s']:.1f} tok/s, kangaroo {r['kangaroo_tokens_per_s']:.1f}, "
              f"hf {r['hf_tokens_per_s']:.1f}", flush=True)
    base = next(r for r in rows if r["dtype"] == args.dtypes[0])
    print(f"\n| dtype | HF tok/s | plain tok/s | Kangaroo tok/s | plain vs {base['dtype']} plain | Kangaroo/plain "
          "| MAT | Kangaroo==plain | plain==HF |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['hf_tokens_per_s']:.1f} | {r['plain_tokens_per_s']:.1f} | "
              f"{r['kangaroo_tokens_per_s']:.1f} | {r['plain_tokens_per_s'] / base['plain_tokens_per_s']:.2f}x | "
              f"{r['speedup']:.2f}x | {r['mat']:.2f} | {len(prompts) - r['greedy_mismatches']}/{len(prompts)} | "
              f"{len(prompts) - r['hf_mismatches']}/{len(prompts)} |")
    lossless = [r for r in rows if r["lossless"]]
    best = max(lossless, key=lambda r: r["kangaroo_tokens_per_s"])["dtype"] if lossless else None
    print(f"\nrecommended CPU dtype for {name_in_file}: {best} (fastest Kangaroo decoding where Kangaroo == plain, and "
          "plain == transformers in float32)")
    record = {"benchmark": "bench_cpu_dtype", "smoke_run": args.smoke, "model": name_in_file,
              "device": device_name(torch.device("cpu")),
              "threads": args.threads, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "prompts": len(prompts), "new_tokens_per_prompt": args.max_new_tokens, "adapter_settings": shipped,
              "results": rows, "recommended": best}
    write_result(args.out, f"cpu_dtype-{name_in_file}", record)
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
