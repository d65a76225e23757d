#!/usr/bin/env bash
# All GPU validation in one command, on a machine with a CUDA GPU (no installs; run from the repo root):
#   bash benchmarks/gpu_suite.sh
# Builds the CUDA extension in place when csrc/ exists, runs the GPU tests and every benchmark script,
# and writes everything under $OUT (if set) or benchmarks/results/gpu-<date>/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dest="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$dest"
status=0
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee "$dest/device.txt" || exit 1

if [ -f csrc/bindings.cpp ]; then
    KANGAROO_RT_BUILD_CUDA=1 python setup.py build_ext --inplace > "$dest/build.log" 2>&1 \
        || { echo "extension build failed (see $dest/build.log)"; status=1; }
fi

python -m pytest -m gpu -q tests --junitxml="$dest/pytest-gpu.xml" 2>&1 | tee "$dest/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    echo "== $name"
    python "$bench" --out "$dest" > "$dest/$name.txt" 2>&1 || { echo "$name failed"; status=1; }
    tail -n 12 "$dest/$name.txt"
done
echo "results in $dest (status $status)"
exit $status
