"""Every Triton kernel compiles for sm_80 and sm_90 as its launcher calls it at LLM shapes (tests/triton_aot.py).

The compile runs in subprocesses without TRITON_INTERPRET (which CI sets for the other kernel tests), one per
architecture at the same time, each with an empty Triton cache so that nothing is reused from an earlier run.
"""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "triton_aot.py")


def _env(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, TRITON_CACHE_DIR=str(tmp_path / f"cache-{arch}"), OMP_NUM_THREADS="1")
    return env


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    procs = {arch: subprocess.Popen([sys.executable, SCRIPT, "--arch", arch], env=_env(tmp_path, arch),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ("80", "90")}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch}:\n{out[-3000:]}\n{err[-6000:]}"
        lines = [line for line in out.splitlines() if line.startswith(f"sm_{arch} ")]
        for kernel in ("_rms_norm_kernel", "_rope_cache_append_kernel", "_attention_kernel",
                       "_attention_merge_kernel", "_accept_greedy_commit_kernel", "_commit_kernel",
                       "_accept_sampling_kernel", "_greedy_with_confidence_kernel"):
            assert any(f" {kernel}[" in line for line in lines), f"sm_{arch}: {kernel} was not compiled"
        assert out.rstrip().endswith("all compiled")


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    """A compile error is an exception of compile_launch (here: int64 queries, which tl.dot does not take)."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import triton_aot as aot\n"
        "from kangaroo_rt import ops\n"
        "mod = ops.load_kernel_module('attention')\n"
        "with aot.recording(mod) as log:\n"
        "    q = aot._long(1, 1, 4, 64).transpose(1, 2)\n"
        "    mod.attention(q, aot._meta(1, 4, 64, 64), aot._meta(1, 4, 64, 64), aot._long(1, 1), split_size=0)\n"
        "launch = log[0]\n"
        "assert launch.signature['q_ptr'] == '*i64' and launch.signature['k_ptr'] == '*fp16', launch.signature\n"
        "try:\n"
        "    aot.compile_launch(launch, 90)\n"
        "except Exception as exc:\n"
        "    print('rejected:', type(exc).__name__)\n"
        "else:\n"
        "    raise SystemExit('an int64 tl.dot compiled')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path, "bad"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "rejected: CompilationError" in res.stdout, res.stdout + res.stderr[-4000:]


def test_launch_signature_follows_triton_specialization():
    """Ints equal to 1 and None become constants, as Triton's launcher specializes them; others are typed."""
    pytest.importorskip("triton")
    import triton_aot as aot

    class Param:
        def __init__(self, name, is_constexpr=False):
            self.name, self.is_constexpr = name, is_constexpr

    class Fn:
        __name__ = "fake_kernel"
        arg_names = ["x_ptr", "n", "one", "scale", "flag", "big", "BLOCK"]
        params = [Param(n, n == "BLOCK") for n in arg_names]

    launch = aot.Launch(Fn(), (torch.empty(2, dtype=torch.bfloat16, device="meta"), 7, 1, 0.5, True, 2**40),
                        {"BLOCK": 64, "num_warps": 2})
    assert launch.signature == {"x_ptr": "*bf16", "n": "i32", "one": "constexpr", "scale": "fp32", "flag": "i1",
                                "big": "i64", "BLOCK": "constexpr"}
    assert launch.constexprs == {"one": 1, "BLOCK": 64} and launch.options == {"num_warps": 2}
    with pytest.raises(TypeError, match="misses"):
        aot.Launch(Fn(), (torch.empty(1, device="meta"),), {})
