#!/usr/bin/env bash
# GPU check (DESIGN.md §6): the compiled-launch check, the CUDA tests (in parallel shards), the
# kernel benchmark, `lorafast bench --quick`, then the train-step profile. Installs nothing, never
# sets TRITON_INTERPRET; at most about 5.7 minutes on an H200: each stage has a timeout (check
# 30 s, tests 80 s, kernel bench 90 s, lorafast bench 60 s, profile 55 s), after which it is sent
# SIGINT, so pytest and the benchmarks still print and write what they have, and SIGKILL 5 s
# later (worst case 340 s of stages). If the compiled launches (kernels/_common.py
# CompiledLaunches, never run on a GPU before this check's first run) give other results than
# JITFunction.run or fail, the later stages run with LORAFAST_COMPILED_LAUNCH=0.
# Usage: bench/gpu_check.sh [OUT_DIR]
#   OUT_DIR (default bench/results/) receives seven files (the device tool brings back at most
#   eight): gpu_check.log (everything the stages printed), gpu_tests.log (every shard's pytest
#   log, then the summary), gpu_tests.xml (the shards' JUnit suites in one file),
#   kernel_bench.json, bench.json, bench.csv and profile_step.json.
# Environment: PYTHON (default python), GPU_TEST_SHARDS (default 16), GPU_TESTS_TIMEOUT (seconds,
# default 80). Exit status: 0 when every stage passed, else the first failing stage's status
# (124: a stage or a test shard ran out of time).
set -uo pipefail

OUT="${1:-bench/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
unset TRITON_INTERPRET
PY="${PYTHON:-python}"
SHARDS="${GPU_TEST_SHARDS:-16}"
TESTS_TIMEOUT="${GPU_TESTS_TIMEOUT:-80}"
KILL_AFTER=5
LOG="$OUT/gpu_check.log"
for value in "$SHARDS" "$TESTS_TIMEOUT"; do
    case "$value" in
    '' | *[!0-9]* | 0)
        echo "GPU_TEST_SHARDS and GPU_TESTS_TIMEOUT must be positive integers, got '$SHARDS' and '$TESTS_TIMEOUT'" >&2
        exit 2
        ;;
    esac
done
SCRATCH="$(mktemp -d)"
cleanup() { rm -rf "$SCRATCH"; }
trap cleanup EXIT
: >"$LOG"

# lorafast.kernels is the kernels/ folder mapped by pyproject.toml; when the package is not
# installed, link it into the source tree for this run (installs nothing; removed on exit).
# (A PYTHONPATH shim loses to the working directory, which `python -m` puts first.)
if ! "$PY" -c "import lorafast.kernels" >/dev/null 2>&1; then
    ln -s ../kernels lorafast/kernels
    cleanup() { rm -rf "$SCRATCH"; rm -f lorafast/kernels; }
    echo "lorafast not installed: linked lorafast/kernels -> kernels/ for this run" | tee -a "$LOG"
fi

"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY

# stage NAME SECONDS COMMAND...: run COMMAND under its timeout, its output appended to the log;
# sets stage_rc.
stage() {
    local name=$1 seconds=$2
    shift 2
    echo "---- $name (${seconds} s)" | tee -a "$LOG"
    timeout -s INT -k "$KILL_AFTER" "$seconds" "$@" 2>&1 | tee -a "$LOG"
    stage_rc=${PIPESTATUS[0]}
}

# ---- compiled launches vs JITFunction.run, the same bits (bench/compiled_launch_check.py): if
# they differ or the check fails (exit 1), every later stage launches through JITFunction.run
stage "compiled launch check" 30 "$PY" bench/compiled_launch_check.py
check_rc=$stage_rc
if [ "$check_rc" -eq 1 ]; then
    export LORAFAST_COMPILED_LAUNCH=0
    echo "compiled launches OFF for the rest of this check (LORAFAST_COMPILED_LAUNCH=0)" | tee -a "$LOG"
fi

# ---- GPU tests: SHARDS pytest processes at once (tests/conftest.py's LORAFAST_TEST_SHARD=i/n),
# since each test spends ~7 s compiling Triton kernels on the CPU (16 cores there; one GPU is
# enough for several processes). LORAFAST_AUTOTUNE=0: each launch takes the first config its
# prune keeps, no autotuning. Selected: the GPU-marked kernel tests and the triton-backend wiring
# tests (which use CUDA when present). --tb=short -rfE keep each failure's message;
# COLUMNS=250 keeps pytest from cutting the FAILED lines at 80 characters.
# Each shard has its own `timeout`, all started together, so they share one deadline: a single
# `timeout` around background jobs would not do, because a non-interactive shell starts
# background jobs with SIGINT ignored and Python then never raises KeyboardInterrupt; `timeout`
# as pytest's parent restores SIGINT, so pytest stops and still prints its summary and XML.
echo "gpu tests: $SHARDS shards, ${TESTS_TIMEOUT} s" | tee -a "$LOG"
shard_pids=()
for ((i = 0; i < SHARDS; i++)); do
    LORAFAST_TEST_SHARD="$i/$SHARDS" LORAFAST_AUTOTUNE=0 COLUMNS=250 \
        timeout -s INT -k "$KILL_AFTER" "$TESTS_TIMEOUT" "$PY" -m pytest tests -m "gpu or triton_backend" \
        -q --tb=short -rfE -p no:cacheprovider --junitxml="$SCRATCH/shard$i.xml" \
        >"$SCRATCH/shard$i.log" 2>&1 &
    shard_pids+=("$!")
done
shard_rcs=()
tests_rc=0
for i in "${!shard_pids[@]}"; do
    wait "${shard_pids[$i]}"
    rc=$?
    shard_rcs+=("$rc")
    if [ "$rc" -ne 0 ] && { [ "$tests_rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; }; then
        tests_rc=$rc # a timeout wins: it means tests were not run
    fi
done
"$PY" bench/gpu_test_summary.py "$SCRATCH" "$OUT" "${shard_rcs[@]}" 2>&1 | tee -a "$LOG"

# kernel benchmark: starts no shape after 60 s (exit status 3 then), rewrites its JSON after each.
stage "kernel bench" 90 "$PY" bench/kernel_bench.py --deadline-s 60 --json "$OUT/kernel_bench.json"
bench_rc=$stage_rc
stage "lorafast bench --quick" 60 "$PY" -m lorafast.cli bench --quick --device cuda --no-progress \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv"
suite_rc=$stage_rc
# after lorafast bench: the same shapes are compiled and autotuned in Triton's disk cache already
stage "train-step profile" 55 "$PY" bench/profile_step.py --json "$OUT/profile_step.json"
profile_rc=$stage_rc

echo "compiled launch check rc=$check_rc, gpu tests rc=$tests_rc (shards: ${shard_rcs[*]}), kernel bench rc=$bench_rc," \
    "lorafast bench rc=$suite_rc, profile rc=$profile_rc; results in $OUT" | tee -a "$LOG"
for rc in "$check_rc" "$tests_rc" "$bench_rc" "$suite_rc" "$profile_rc"; do
    if [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
