"""bench/kernel_bench.py, the GPU check's kernel benchmark, runs every code path on the CPU (--dry-run).

A GPU is lent rarely and briefly: this keeps the script from failing there for a reason the
CPU could have shown. Its timings under the interpreter mean nothing and are not checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "kernel_bench.py"


def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "kernel_bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert len(results["train"]) == 2 and len(results["decode"]) == 2
    for row in results["train"]:
        for key in ("base_ms", "naive_ms", "fused_ms", "fused_triton_ms", "fused_cublas_ms", "peft_ms"):
            assert row[key] > 0, key
        assert row["best_main_gemm"] in ("triton", "cublas")
    for row in results["decode"]:
        assert row["fused_unmerged_ms"] > 0 and row["merged_ms"] > 0
