#!/usr/bin/env bash
# All GPU validation in one command, on a machine with a CUDA GPU (no installs; run from anywhere):
#   bash benchmarks/gpu_suite.sh                    # real run when CUDA is available, else the dry run below
#   bash benchmarks/gpu_suite.sh --dry-run          # CPU: skips the GPU parts (says which), collects the GPU tests,
#                                                   # smoke-runs every benchmark
#   bash benchmarks/gpu_suite.sh --only a,b         # only these steps (names as in gpu_suite.json), e.g. a rerun
# Steps, most wanted first: build the CUDA extension in place, pytest -m gpu, compute-sanitizer memcheck over the
# kernel tests (when the image has it), bench_graphs, bench_steps, the end-to-end harness (benchmarks/spec_bench.py)
# on the embedded model (a random tiny model when it is absent), then every other benchmarks/bench_*.py. A step is
# skipped, with the reason, when its time would overrun SUITE_BUDGET or a benchmark's "# gpu_suite: needs MODULE..."
# line names a module this Python lacks.
# Writes every script's JSON/text/PNG plus one summary, gpu_suite.json, to $OUT if set, else to
# benchmarks/results/gpu-<date>/ (dry run: a fresh temporary folder). Exit status 1 if any step failed.
# Environment: PYTHON (default python, else python3), SUITE_BUDGET seconds for the whole suite (default 540: one device
# call may run 600 s), BENCH_TIMEOUT seconds per benchmark script (default 240).
# A benchmark script may carry, after its docstring, "# gpu_suite: needs MOD..." and "# gpu_suite: gpu-args ARG...".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step stopped at its time limit still leaves everything it printed in its log
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
SUITE_BUDGET="${SUITE_BUDGET:-540}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
MIN_STEP_S=20  # a step is not started with less than this left of the budget
suite_start=$(date +%s)

usage() { sed -n '2,16p' "$0"; }
dry_run=0
only=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --only) [ "$#" -ge 2 ] || { echo "gpu_suite.sh: --only needs a comma list of step names"; exit 2; }
                only=",$2,"; shift ;;
        --only=*) only=",${1#--only=}," ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (expected --dry-run, --only NAMES)"; exit 2 ;;
    esac
    shift
done
for value in "$SUITE_BUDGET" "$BENCH_TIMEOUT"; do
    if ! [[ "$value" =~ ^[0-9]+$ ]]; then
        echo "gpu_suite.sh: SUITE_BUDGET and BENCH_TIMEOUT must be whole seconds, got $value"
        exit 2
    fi
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

wanted() {  # wanted NAME: false (and nothing recorded) when --only leaves NAME out
    [ -z "$only" ] || [[ "$only" == *",$1,"* ]]
}

step_limit() {  # step_limit CAP_S: seconds a step starting now may run, min(cap, budget left)
    local left=$(( SUITE_BUDGET - ($(date +%s) - suite_start) ))
    echo $(( $1 < left ? $1 : left ))
}

run_step() {  # run_step NAME LOGFILE CAP_S COMMAND...: runs it with min(cap, budget left), records the outcome
    local name="$1" log="$2" cap="$3" start rc left limit
    shift 3
    left=$(( SUITE_BUDGET - ($(date +%s) - suite_start) ))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        record "$name" skipped 0 "over budget: ${left}s of SUITE_BUDGET=${SUITE_BUDGET}s left"
        return
    fi
    limit=$(step_limit "$cap")
    start=$(date +%s)
    timeout "$limit" "$@" > "$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    if [ "$rc" -eq 0 ]; then
        record "$name" ok "$(( $(date +%s) - start ))" ""
    elif [ "$rc" -eq 124 ]; then
        record "$name" failed "$(( $(date +%s) - start ))" "timed out after ${limit}s, see $(basename "$log")"
    else
        record "$name" failed "$(( $(date +%s) - start ))" "exit $rc, see $(basename "$log")"
    fi
}

"$PYTHON" - > "$dest/device.txt" 2>&1 <<'PY'
import platform, torch
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
else:
    print("cpu:", platform.processor() or platform.machine(), "| torch", torch.__version__)
PY
echo "gpu_suite.sh ($mode): $(cat "$dest/device.txt"); budget ${SUITE_BUDGET}s; results in $dest"

# 1. the CUDA extension, built in place
if ! wanted build_extension; then
    :
elif [ "$dry_run" -eq 1 ]; then
    record build_extension skipped 0 "dry run: no CUDA build"
elif [ ! -f csrc/bindings.cpp ]; then
    record build_extension skipped 0 "csrc/bindings.cpp not present"
else
    run_step build_extension "$dest/build.log" 300 \
        env KANGAROO_RT_BUILD_CUDA=1 KANGAROO_RT_BUILD_CPU=0 "$PYTHON" setup.py build_ext --inplace  # _C only
fi

# 2. the GPU tests
if ! wanted pytest_gpu; then
    :
elif [ "$dry_run" -eq 1 ]; then  # the GPU tests cannot run here, but they must import and collect
    run_step pytest_gpu "$dest/pytest-gpu.txt" 120 "$PYTHON" -m pytest -m gpu --collect-only -q tests
else
    run_step pytest_gpu "$dest/pytest-gpu.txt" 300 \
        "$PYTHON" -m pytest -m gpu -v tests --durations=15 --junitxml="$dest/pytest-gpu.xml"  # -v: a line per test
fi

# 2b. compute-sanitizer memcheck over the GPU kernel tests (the extension's ops, the Triton kernels), without
# torch's caching allocator so that an access past a tensor's end lands outside any allocation
sanitizer=$(command -v compute-sanitizer || { [ -x /usr/local/cuda/bin/compute-sanitizer ] \
    && echo /usr/local/cuda/bin/compute-sanitizer; })
if ! wanted memcheck; then
    :
elif [ "$dry_run" -eq 1 ]; then
    record memcheck skipped 0 "dry run: compute-sanitizer needs a CUDA GPU"
elif [ -z "$sanitizer" ]; then
    record memcheck skipped 0 "compute-sanitizer is not in this image"
else
    run_step memcheck "$dest/memcheck.txt" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
        --error-exitcode 1 "$PYTHON" -m pytest -m gpu -q -x tests/test_gpu_graphs.py tests/test_kernels_rms_norm.py \
        tests/test_kernels_rope_cache_append.py tests/test_kernels_sampling.py tests/test_gpu_realistic.py \
        -k "extension or tolerance_rule or outside_the_cache or greedy_with_confidence or split_k"
fi

# 3. the benchmarks, most wanted first; the dry run passes each one's smoke flag (--smoke, else --interpret)
embedded_present=0
[ -f kangaroo_rt/assets/embedded/model.safetensors ] && [ -f kangaroo_rt/assets/embedded/adapter/kangaroo.json ] \
    && embedded_present=1

directive() {  # directive FILE KEY: the words after "# gpu_suite: KEY " in FILE, if any
    sed -n "s/^# gpu_suite: $2 //p" "$1" | head -n 1
}

run_bench() {  # run_bench benchmarks/bench_NAME.py
    local bench="$1" name needs missing gpu_args
    name=$(basename "$bench" .py)
    if grep -q "load_default" "$bench" && [ "$embedded_present" -eq 0 ]; then
        record "$name" skipped 0 "needs the embedded model (kangaroo_rt/assets/embedded), which is not present"
        return
    fi
    needs=$(directive "$bench" needs)
    if [ -n "$needs" ]; then
        # shellcheck disable=SC2086
        missing=$("$PYTHON" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' $needs)
        if [ -n "$missing" ]; then
            record "$name" skipped 0 "needs Python modules not installed here: $missing"
            return
        fi
    fi
    local flags=(--out "$dest")
    if [ "$dry_run" -eq 1 ]; then
        if grep -q -- '"--smoke"' "$bench"; then
            flags+=(--smoke)
        elif grep -q -- "--interpret\|kernel_bench_utils" "$bench"; then
            flags+=(--interpret)
        else
            record "$name" skipped 0 "dry run: the script has no --smoke or --interpret mode"
            return
        fi
    else
        gpu_args=$(directive "$bench" gpu-args)
        # shellcheck disable=SC2206
        [ -n "$gpu_args" ] && flags+=($gpu_args)
    fi
    run_step "$name" "$dest/$name.txt" "$BENCH_TIMEOUT" "$PYTHON" "$bench" "${flags[@]}"
}

run_spec_bench() {  # the end-to-end harness
    if [ "$dry_run" -eq 1 ]; then  # transformers baselines skipped here for time; tests/test_benchmarks.py runs them
        run_step spec_bench "$dest/spec_bench.txt" "$BENCH_TIMEOUT" "$PYTHON" benchmarks/spec_bench.py --smoke \
            --prompts 2 --max-new-tokens 8 --no-hf --no-progress --out "$dest"
    elif [ "$embedded_present" -eq 1 ]; then
        # Prompts stop at 2/3 of the step's time, leaving the rest for loading, the table, JSON and plots.
        run_step spec_bench "$dest/spec_bench.txt" "$BENCH_TIMEOUT" "$PYTHON" benchmarks/spec_bench.py --device cuda \
            --prompts 24 --no-progress --time-limit $(( $(step_limit "$BENCH_TIMEOUT") * 2 / 3 )) --out "$dest"
    else
        echo "the embedded model is not present: spec_bench runs on the random tiny model on the GPU instead"
        run_step spec_bench "$dest/spec_bench.txt" "$BENCH_TIMEOUT" "$PYTHON" benchmarks/spec_bench.py --smoke \
            --device cuda --no-progress --out "$dest"
    fi
}

order=(bench_graphs bench_steps spec_bench)
for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    [[ " ${order[*]} " == *" $name "* ]] || order+=("$name")
done
for name in "${order[@]}"; do
    wanted "$name" || continue
    if [ "$name" = spec_bench ]; then
        run_spec_bench
    elif [ -f "benchmarks/$name.py" ]; then
        run_bench "benchmarks/$name.py"
    fi
done

# 4. one summary JSON: the steps and every result JSON written above
"$PYTHON" - "$dest" "$mode" "$status" "$SUITE_BUDGET" "$(( $(date +%s) - suite_start ))" <<'PY'
import datetime, glob, json, os, subprocess, sys

dest, mode, status, budget, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
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
over_budget = [s["name"] for s in steps if s["status"] == "skipped" and (s["note"] or "").startswith("over budget")]
summary = {"benchmark": "gpu_suite", "mode": mode, "smoke_run": mode != "gpu", "device": device,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": commit,
           "status": "failed" if status else "ok", "budget_s": budget, "elapsed_s": elapsed,
           "skipped_over_budget": over_budget, "steps": steps, "results": results,
           "plots": sorted(os.path.basename(p) for p in glob.glob(os.path.join(dest, "*.png")))}
with open(os.path.join(dest, "gpu_suite.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"wrote {os.path.join(dest, 'gpu_suite.json')}: " + ", ".join(f"{s['name']} {s['status']}" for s in steps))
if over_budget:
    print("over budget, not run: " + ",".join(over_budget) + " (rerun them with --only)")
PY
echo "gpu_suite.sh ($mode): results in $dest (status $status, $(( $(date +%s) - suite_start ))s)"
exit $status
