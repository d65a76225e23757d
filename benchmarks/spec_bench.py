"""Spec-Bench-style end-to-end benchmark (thin script over kangaroo_rt.bench; same as `kangaroo-rt bench`).

Methods, in one process, interleaved on identical prompts and weights: this project's plain decoding,
Kangaroo, transformers `generate` (eager) and transformers assisted generation with an early-exit
assistant. Greedy, batch 1; all methods' tokens are checked against plain decoding.

    PYTHONPATH=. python benchmarks/spec_bench.py                        # embedded model, held-out code prompts
    PYTHONPATH=. python benchmarks/spec_bench.py --questions path/to/spec_bench/question.jsonl \\
        --model TARGET --adapter ADAPTER --device cuda                   # Spec-Bench prompts on a GPU
    PYTHONPATH=. python benchmarks/spec_bench.py --smoke                # seconds, random tiny model
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kangaroo_rt.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="spec_bench.py"))
