"""The Triton kernels compile for sm_90 (H100/H200) and fit its shared memory, checked without a GPU.

The CPU suite runs the kernels through Triton's interpreter, which enforces none of the GPU
compiler's rules; this test compiles bench/compile_check.py's ``ci`` subset (every kernel's
default config on the split-dot path, the small-M kernel at R_PAD 256, the B2 dropout variant that
once failed) ahead of time for ``cuda:90`` down to a cubin. It runs in a subprocess because
conftest.py sets ``TRITON_INTERPRET=1`` and the kernels pick their configs at import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "compile_check.py"
#: bench/compile_check.py's exit status when this triton cannot target CUDA here.
NO_CUDA_TARGET = 2
EXPECTED_KERNELS = {
    "lora_linear._lora_down_kernel",
    "lora_linear._lora_fwd_main_kernel",
    "lora_linear._lora_fwd_small_m_kernel",
    "lora_linear._lora_dy_kernel",
    "lora_linear._lora_dx_kernel",
    "lora_linear._keep_mask_kernel",
    "merge._lora_merge_kernel",
}


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORAFAST_AUTOTUNE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--subset", "ci", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode == NO_CUDA_TARGET:
        pytest.skip(f"triton cannot compile for CUDA on this machine: {proc.stderr.strip()}")
    if not out.exists():
        pytest.fail(
            f"compile_check.py wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report = json.loads(out.read_text())
    report["returncode"] = proc.returncode
    report["stdout"] = proc.stdout
    return report


def test_every_kernel_compiles_for_sm90(compile_report):
    results = compile_report["results"]
    assert {r["kernel"] for r in results} == EXPECTED_KERNELS
    failed = [f"{r['kernel']} [{r['label']}] {r['config']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_every_kernel_fits_sm90_shared_memory(compile_report):
    limit = compile_report["smem_limit"]
    assert limit == 232448
    over = [
        f"{r['kernel']} [{r['label']}] {r['config']}: {r['shared'] + r['static_shared']} B"
        for r in compile_report["results"]
        if r["ok"] and r["shared"] + r["static_shared"] > limit
    ]
    assert not over, f"over the sm_90 limit of {limit} B:\n" + "\n".join(over)
    assert compile_report["returncode"] == 0, compile_report["stdout"][-3000:]


def test_ci_subset_covers_split_rank_256_and_dropout_paths(compile_report):
    labels = [(r["kernel"], r["label"]) for r in compile_report["results"]]
    assert any(k.endswith("_lora_fwd_small_m_kernel") and "R_PAD=256" in lab for k, lab in labels)
    assert any(k.endswith("_lora_dx_kernel") and "HAS_DROPOUT" in lab and "!SPLIT_LORA" in lab for k, lab in labels)
    split = {k for k, lab in labels if " SPLIT_LORA" in lab}
    assert split >= {k for k in EXPECTED_KERNELS if k.startswith("lora_linear.") and "keep_mask" not in k}
