"""Import a script of benchmarks/ (not a package) as a module, for the tests of the benchmark scripts."""
import importlib.util
import os
from types import ModuleType
from typing import List

import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py, executed as a fresh module named ``name``."""
    path = os.path.join(BENCH_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no benchmark script {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, argv: List[str]) -> int:
    """benchmarks/<name>.py's main(argv) -> its exit status, torch's thread count as it was before (the scripts set
    their own)."""
    module = load_benchmark(name)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)
