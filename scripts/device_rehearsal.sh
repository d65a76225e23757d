#!/usr/bin/env bash
# Rehearse the GPU machine's software on a CPU machine before spending device time (run from anywhere):
#   bash scripts/device_rehearsal.sh              # venv (first time: 5.1 GB here), clone, build, checks
#   bash scripts/device_rehearsal.sh --quick      # the same without the full CPU test suite
# The lent GPU machine runs Python 3.12, torch 2.11 + CUDA 13.0, triton 3.6 and transformers 5.17, with no
# fastapi/uvicorn/openai and no installs allowed; this project's CI runs newer torch/triton. This script:
#   1. makes (once) a venv with those versions (REHEARSAL_VENV, default ~/.cache/kangaroo_rt/device-venv);
#   2. clones the committed HEAD of this checkout into a temporary folder;
#   3. builds kangaroo_rt._C there against that CUDA torch (needs nvcc: CUDA_HOME or /usr/local/cuda),
#      imports it and checks that its ops reject CPU tensors with a clear error;
#   4. runs benchmarks/gpu_suite.sh --dry-run and (unless --quick) pytest -m "not gpu" under
#      TRITON_INTERPRET=1 with PYTHONPATH=. only, as on the device.
# Environment: DEVICE_PYTHON (default: python3.12 on PATH or under ~/.pyenv, else python3), DEVICE_TORCH (2.11.0),
# DEVICE_TRITON (3.6.0), DEVICE_TRANSFORMERS (5.17.0), REHEARSAL_VENV, MAX_JOBS. Exit status 1 if a check failed.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "device_rehearsal.sh: unknown argument $arg (expected --quick)"; exit 2 ;;
    esac
done
DEVICE_TORCH="${DEVICE_TORCH:-2.11.0}"
DEVICE_TRITON="${DEVICE_TRITON:-3.6.0}"
DEVICE_TRANSFORMERS="${DEVICE_TRANSFORMERS:-5.17.0}"
if [ -z "${DEVICE_PYTHON:-}" ]; then
    # the first that runs: a pyenv shim is on PATH even when its version is not selected (and then fails)
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
        if "$candidate" -c "" > /dev/null 2>&1; then
            DEVICE_PYTHON="$candidate"
            break
        fi
    done
fi
venv="${REHEARSAL_VENV:-$HOME/.cache/kangaroo_rt/device-venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "device_rehearsal.sh: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME): the extension build is the point"
    exit 1
fi
specs="torch==$DEVICE_TORCH triton==$DEVICE_TRITON transformers==$DEVICE_TRANSFORMERS"
if [ "$(cat "$venv/.rehearsal_specs" 2>/dev/null)" != "$specs" ]; then
    echo "== venv $venv ($("$DEVICE_PYTHON" --version 2>&1); $specs)"
    rm -rf "$venv"
    "$DEVICE_PYTHON" -m venv "$venv" || exit 1
    # the device image's packages this project uses; fastapi, uvicorn and openai are not there
    "$venv/bin/pip" install -q "torch==$DEVICE_TORCH" "triton==$DEVICE_TRITON" \
        "transformers==$DEVICE_TRANSFORMERS" numpy safetensors tokenizers scipy matplotlib tqdm httpx \
        pytest ninja pybind11 setuptools || exit 1
    echo "$specs" > "$venv/.rehearsal_specs"
fi
py="$venv/bin/python"
work=$(mktemp -d -t kangaroo_rehearsal.XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo" || exit 1
cd "$work/repo" || exit 1
echo "== $(git log -1 --format='%h %s' | cut -c1-100)"
"$py" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
      '| cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
failed=()
check() {  # check NAME COMMAND...: runs it, prints the tail of its log on failure
    local name="$1" log="$work/$1.log" start
    shift
    start=$(date +%s)
    if "$@" > "$log" 2>&1; then
        echo "== $name: ok ($(( $(date +%s) - start ))s)"
    else
        echo "== $name: FAILED ($(( $(date +%s) - start ))s)"
        tail -n 40 "$log"
        failed+=("$name")
    fi
}
check build_extension env KANGAROO_RT_BUILD_CUDA=1 "$py" setup.py build_ext --inplace
check extension_import env PYTHONPATH=. "$py" - <<'PY'
import torch
from kangaroo_rt import _ext, ops

assert _ext.is_built(), "kangaroo_rt._C was not built"
ext = _ext.load()
print("ops:", sorted(_ext.OPS), "| CUDA runtime", ext.cuda_runtime_version())
assert {op for op, impls in ops._REGISTRY.items() if "cuda" in impls} == set(_ext.OPS)
x, w = torch.randn(2, 8), torch.randn(8)
try:
    ext.rms_norm(x, w, 1e-6)
except RuntimeError as exc:
    assert "must be a CUDA tensor" in str(exc), exc
else:
    raise SystemExit("kangaroo_rt._C.rms_norm took a CPU tensor")
PY
check gpu_suite_dry_run env OUT="$work/suite" PYTHON="$py" OMP_NUM_THREADS=1 bash benchmarks/gpu_suite.sh --dry-run
if [ "$quick" -eq 0 ]; then
    check pytest_cpu env TRITON_INTERPRET=1 PYTHONPATH=. "$py" -m pytest -m "not gpu" -q -p no:cacheprovider tests
    grep -E "passed|failed" "$work/pytest_cpu.log" | tail -n 1
fi
if [ "${#failed[@]}" -gt 0 ]; then
    echo "device_rehearsal.sh: failed: ${failed[*]}"
    exit 1
fi
echo "device_rehearsal.sh: every check passed"
