#!/usr/bin/env bash
# All GPU validation in one command, on a machine with a CUDA GPU (no installs; run from anywhere):
#   bash benchmarks/gpu_suite.sh             # real run when CUDA is available, else the dry run below
#   bash benchmarks/gpu_suite.sh --dry-run   # CPU: skips the GPU parts (says which), smoke-runs every benchmark
# Steps: build the CUDA extension in place (when csrc/bindings.cpp exists), pytest -m gpu, every
# benchmarks/bench_*.py (kernel microbenchmarks, bench_steps, ...), then the end-to-end harness
# (benchmarks/spec_bench.py) on the embedded model (on a random tiny model when the embedded one is absent).
# Writes every script's JSON/text/PNG plus one summary, gpu_suite.json, to $OUT if set, else to
# benchmarks/results/gpu-<date>/ (dry run: a fresh temporary folder). Exit status 1 if any step failed.
# Environment: PYTHON (default python), BENCH_TIMEOUT seconds per benchmark script (default 300).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-300}"

dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (expected --dry-run)"; exit 2 ;;
    esac
done
if [ "$dry_run" -eq 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA GPU here: running the dry run (GPU parts skipped, smoke configurations only)"
    dry_run=1
fi
if [ "$dry_run" -eq 1 ]; then
    dest="${OUT:-$(mktemp -d -t kangaroo_gpu_suite.XXXXXX)}"
    mode=dry-run
else
    dest="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
    mode=gpu
fi
mkdir -p "$dest"
steps="$dest/steps.tsv"  # name, status, seconds, note (one line per step; gathered into gpu_suite.json)
: > "$steps"
status=0

record() {  # record NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$steps"
    [ "$2" = failed ] && status=1
    echo "== $1: $2${4:+ ($4)}"
}

run_step() {  # run_step NAME LOGFILE COMMAND...: runs it with the timeout, records ok/failed
    local name="$1" log="$2" start rc
    shift 2
    start=$(date +%s)
    timeout "$BENCH_TIMEOUT" "$@" > "$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    if [ "$rc" -eq 0 ]; then
        record "$name" ok "$(( $(date +%s) - start ))" ""
    else
        record "$name" failed "$(( $(date +%s) - start ))" "exit $rc, see $(basename "$log")"
    fi
}

"$PYTHON" - > "$dest/device.txt" 2>&1 <<'EOF'
import platform, torch
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
else:
    print("cpu:", platform.processor() or platform.machine(), "| torch", torch.__version__)
EOF
echo "gpu_suite.sh ($mode): $(cat "$dest/device.txt"); results in $dest"

# 1. the CUDA extension, built in place
if [ "$dry_run" -eq 1 ]; then
    record build_extension skipped 0 "dry run: no CUDA build"
elif [ ! -f csrc/bindings.cpp ]; then
    record build_extension skipped 0 "csrc/bindings.cpp not present"
else
    BENCH_TIMEOUT=600 run_step build_extension "$dest/build.log" \
        env KANGAROO_RT_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace
fi

# 2. the GPU tests
if [ "$dry_run" -eq 1 ]; then
    record pytest_gpu skipped 0 "dry run: pytest -m gpu needs a CUDA GPU"
else
    BENCH_TIMEOUT=600 run_step pytest_gpu "$dest/pytest-gpu.txt" \
        "$PYTHON" -m pytest -m gpu -q tests --junitxml="$dest/pytest-gpu.xml"
fi

# 3. every benchmark script; the dry run passes each one's smoke flag (--smoke, else --interpret)
embedded_present=0
[ -f kangaroo_rt/assets/embedded/model.safetensors ] && [ -f kangaroo_rt/assets/embedded/adapter/kangaroo.json ] \
    && embedded_present=1
for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    if grep -q "load_default" "$bench" && [ "$embedded_present" -eq 0 ]; then
        record "$name" skipped 0 "needs the embedded model (kangaroo_rt/assets/embedded), which is not present"
        continue
    fi
    flags=(--out "$dest")
    if [ "$dry_run" -eq 1 ]; then
        if grep -q -- '"--smoke"' "$bench"; then
            flags+=(--smoke)
        elif grep -q -- "--interpret\|kernel_bench_utils" "$bench"; then
            flags+=(--interpret)
        else
            record "$name" skipped 0 "dry run: the script has no --smoke or --interpret mode"
            continue
        fi
    fi
    run_step "$name" "$dest/$name.txt" "$PYTHON" "$bench" "${flags[@]}"
done

# 4. the end-to-end harness
if [ "$dry_run" -eq 1 ]; then  # transformers baselines skipped here for time; tests/test_benchmarks.py runs them
    run_step spec_bench "$dest/spec_bench.txt" "$PYTHON" benchmarks/spec_bench.py --smoke --prompts 2 \
        --max-new-tokens 8 --no-hf --no-progress --out "$dest"
elif [ "$embedded_present" -eq 1 ]; then
    run_step spec_bench "$dest/spec_bench.txt" "$PYTHON" benchmarks/spec_bench.py --device cuda --prompts 24 \
        --no-progress --out "$dest"
else
    echo "the embedded model is not present: spec_bench runs on the random tiny model on the GPU instead"
    run_step spec_bench "$dest/spec_bench.txt" "$PYTHON" benchmarks/spec_bench.py --smoke --device cuda \
        --no-progress --out "$dest"
fi

# 5. one summary JSON: the steps and every result JSON written above
"$PYTHON" - "$dest" "$mode" "$status" <<'EOF'
import datetime, glob, json, os, subprocess, sys

dest, mode, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []
with open(os.path.join(dest, "steps.tsv")) as f:
    for line in f:
        name, state, seconds, note = line.rstrip("\n").split("\t")
        steps.append({"name": name, "status": state, "seconds": int(seconds), "note": note or None})
results = {}
for path in sorted(glob.glob(os.path.join(dest, "*.json"))):
    if os.path.basename(path) != "gpu_suite.json":
        with open(path) as f:
            results[os.path.basename(path)[:-5]] = json.load(f)
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    commit = None
with open(os.path.join(dest, "device.txt")) as f:
    device = f.read().strip()
summary = {"benchmark": "gpu_suite", "mode": mode, "smoke_run": mode != "gpu", "device": device,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": commit,
           "status": "failed" if status else "ok", "steps": steps, "results": results,
           "plots": sorted(os.path.basename(p) for p in glob.glob(os.path.join(dest, "*.png")))}
with open(os.path.join(dest, "gpu_suite.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"wrote {os.path.join(dest, 'gpu_suite.json')}: " + ", ".join(f"{s['name']} {s['status']}" for s in steps))
EOF
echo "gpu_suite.sh ($mode): results in $dest (status $status)"
exit $status
