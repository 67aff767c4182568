#!/usr/bin/env bash
# GPU check (DESIGN.md §6): the CUDA tests, the quick kernel benchmark, then `lorafast bench --quick`.
# Installs nothing, never sets TRITON_INTERPRET; about 6 minutes on an H200 (each stage has a timeout).
# Usage: bench/gpu_check.sh [OUT_DIR]
#   OUT_DIR (default bench/results/) receives gpu_tests.xml (JUnit), gpu_tests.log,
#   kernel_bench.json/.log and bench.json/.csv/.log (all providers side by side).
set -uo pipefail

OUT="${1:-bench/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
unset TRITON_INTERPRET
PY="${PYTHON:-python}"

# lorafast.kernels is the kernels/ folder mapped by pyproject.toml; when the package is not
# installed, link it into the source tree for this run (installs nothing; removed on exit).
# (A PYTHONPATH shim loses to the working directory, which `python -m` puts first.)
if ! "$PY" -c "import lorafast.kernels" >/dev/null 2>&1; then
    ln -s ../kernels lorafast/kernels
    trap 'rm -f lorafast/kernels' EXIT
    echo "lorafast not installed: linked lorafast/kernels -> kernels/ for this run"
fi

"$PY" - <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY

# LORAFAST_AUTOTUNE=0: one default config per kernel, so the tests spend no time autotuning
# the GPU-marked kernel tests, and the triton-backend wiring tests (which use CUDA when present)
# SIGINT on timeout: pytest stops and still prints its failure summary (the first H200 run lost it).
LORAFAST_AUTOTUNE=0 timeout -s INT 200 "$PY" -m pytest tests -m "gpu or triton_backend" -q -rf -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 170 "$PY" bench/kernel_bench.py --json "$OUT/kernel_bench.json" 2>&1 | tee "$OUT/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}

timeout 100 "$PY" -m lorafast.cli bench --quick --device cuda --no-progress \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" 2>&1 | tee "$OUT/bench.log"
suite_rc=${PIPESTATUS[0]}

echo "gpu tests rc=$tests_rc, kernel bench rc=$bench_rc, lorafast bench rc=$suite_rc; results in $OUT"
for rc in "$tests_rc" "$bench_rc" "$suite_rc"; do
    if [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
