"""bench/host_overhead.py, run as a subprocess on the CPU: its stand-in CUDA driver takes the
kernels compiled for sm_90, so the compiled-launch path (kernels/_common.py ``CompiledLaunches``,
which the interpreter never takes) runs here; the check asserts that it hands the driver the same
kernels, grids and arguments as ``JITFunction.run`` does, for decode and both training paths.
A subprocess because conftest.py sets ``TRITON_INTERPRET=1`` and kernels are compiled or
interpreted by what was set when they were imported. On a GPU, bench/compiled_launch_check.py
compares the two launch paths' results (bench/gpu_check.sh runs it first).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "host_overhead.py"
NO_CUDA_TARGET = 2  # the script's exit status when this triton cannot compile for CUDA


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode == NO_CUDA_TARGET:
        pytest.skip(f"triton cannot compile for CUDA on this machine: {proc.stderr.strip()}")
    return proc


def test_compiled_launches_hand_the_driver_what_jit_run_does():
    proc = _run("--check-launches")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the same launches as JITFunction.run" in proc.stdout


def test_an_autotuning_choice_is_read_back_from_triton_s_disk_cache():
    """lorafast's kernels autotune with ``cache_results=True``: a new process (in-memory choices
    forgotten) reads a key's choice back instead of timing every config again."""
    proc = _run("--check-autotune-cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "read back from the disk cache" in proc.stdout


def test_the_timing_report(tmp_path):
    out = tmp_path / "host.json"
    proc = _run("--rounds", "3", "--calls", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"decode", "forward+backward", "training step"}
    for case, launches in [("decode", 1), ("forward+backward", 4), ("training step", 14 * 4)]:
        host = report["cases"][case]["host"]
        providers = {"peft", "lorafast"} | ({"base", "triton launch"} if case != "training step" else set())
        assert set(host) == providers
        assert all(timing["min_us"] > 0 for timing in host.values())
        # small-M; F1, F2 seed, B1, B2 seed; that in each of the 2 x 7 projections
        assert host["lorafast"]["triton_launches"] == launches


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check runs (bench/gpu_check.sh)")
def test_the_gpu_compiled_launch_check_says_it_needs_cuda():
    """Without CUDA, bench/compiled_launch_check.py imports, says so and exits 2, which
    bench/gpu_check.sh does not take for a failed check (1: compiled launches turned off)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = REPO / "bench" / "compiled_launch_check.py"
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.interpreter
def test_the_gpu_compiled_launch_check_cases_run_and_compare(monkeypatch):
    """bench/compiled_launch_check.py's cases, small, through the interpreter (which launches
    through JITFunction.run alike both times): they run, give the outputs the check compares,
    and ``differences`` finds none between two runs and the one changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels here are compiled ones: the check itself runs on a GPU")
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import compiled_launch_check as check

    from lorafast import kernels

    first = check.run_cases(kernels, "cpu", features=40, tokens=70)
    second = check.run_cases(kernels, "cpu", features=40, tokens=70)
    assert [tuple(t.shape) for t in first] == [(1, 40), (1, 16), (70, 40), (70, 16), (70, 40), (16, 40), (40, 16)]
    assert check.differences(second, first) == []
    second[2] = second[2].clone()
    second[2][0, 0] = -second[2][0, 0] - 1  # a bf16 y element: made unlike itself at any size
    assert check.differences(second, first) == [2]
