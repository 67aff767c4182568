"""bench/kernel_bench.py, the GPU check's kernel benchmark, runs every code path on the CPU (--dry-run).

A GPU is lent rarely and briefly: this keeps the script from failing there for a reason the
CPU could have shown. Its timings under the interpreter mean nothing and are not checked. The
CUDA-only parts (CUDA-graph times, the profiler's kernel breakdown) are absent from a dry run;
their bookkeeping is checked here with fake profiler events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from bench_scripts import load_bench_script
from torch.autograd import DeviceType

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "kernel_bench.py"


def _load_script():
    return load_bench_script("kernel_bench")


def test_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "kernel_bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert len(results["train"]) == 2 and len(results["decode"]) == 2 and results["skipped_shapes"] == []
    assert set(results["not_measured"]) == {"*_graph_ms", "kernel_breakdown"}
    assert results["config"]["compiled_launches"] is True  # on unless turned off (gpu_check's launch check)
    choices = results["autotune_choices"]  # the interpreter's one config per kernel, as chosen
    assert {"small-M forward", "F1 down", "B2 dX"} <= set(choices)
    assert all(choice["config"]["SPLIT_K"] == 1 for choice in choices["small-M forward"])
    assert choices["small-M forward"] and choices["B2 dX"]
    for row in results["train"]:
        for key in (
            "base_ms",
            "naive_ms",
            "fused_ms",
            "fused_triton_ms",
            "fused_cublas_ms",
            "fused_ordered_ms",
            "layer_ms",
            "peft_ms",
        ):
            assert row[key] > 0, key
        assert row["speedup_vs_peft"] == row["peft_ms"] / row["layer_ms"]  # lorafast timed as PEFT is
        assert row["best_main_gemm"] in ("triton", "cublas")
        assert row["reduction_chosen"] == "atomic" and row["best_reduction"] in ("atomic", "ordered")
        assert row["base_host_ms"] > 0 and row["fused_host_ms"] > 0 and row["fused_jit_host_ms"] > 0
        assert row["elapsed_s"] > 0
        assert row["base_graph_ms"] is row["fused_graph_ms"] is row["fused_over_base_graph"] is None
    for row in results["decode"]:
        assert row["fused_unmerged_ms"] > 0 and row["merged_ms"] > 0 and row["fused_cublas_unmerged_ms"] > 0
        assert row["fused_small_m_unmerged_ms"] > 0 and row["fused_small_m_over_merged_graph"] is None
        assert row["path"] == "small_m"  # nothing measured on the CPU: the small-M kernel, the default
        assert row["fused_unmerged_host_ms"] > 0 and row["merged_host_ms"] > 0 and row["elapsed_s"] > 0
        assert row["fused_unmerged_jit_host_ms"] > 0
        assert row["merged_graph_ms"] is row["fused_unmerged_graph_ms"] is row["fused_over_merged_graph"] is None
    # the profiled shapes (stand-ins for 8192x4096x4096 and M=1) carry the field, empty on the CPU
    assert [("kernel_breakdown" in row) for row in results["train"]] == [False, True]
    assert [("kernel_breakdown" in row) for row in results["decode"]] == [True, False]
    assert results["train"][1]["kernel_breakdown"] is results["train"][1]["kernel_breakdown_ordered"] is None
    summaries = done.stdout[done.stdout.index("host vs GPU time per shape") :].splitlines()[1:5]
    assert [line.split()[0] for line in summaries] == ["decode", "decode", "train", "train"]
    assert all("host-bound: unknown (no graph time)" in line for line in summaries)


def test_deadline_skips_shapes_keeps_the_json_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --dry-run sets; restored after the test
    out = tmp_path / "kernel_bench.json"
    assert _load_script().main(["--dry-run", "--no-peft", "--deadline-s", "0", "--json", str(out)]) == 3
    results = json.loads(out.read_text())
    assert results["train"] == [] and results["decode"] == []
    assert [(row["kind"], row["M"]) for row in results["skipped_shapes"]] == [
        ("decode", 1), ("decode", 4), ("train", 70), ("train", 130),
    ]  # fmt: skip
    assert "4 shapes skipped: --deadline-s 0.0 passed" in capsys.readouterr().err


def test_summarise_device_events_keeps_device_time_per_call_largest_first():
    events = [
        SimpleNamespace(key="cudaLaunchKernel", count=30, device_type=DeviceType.CPU, device_time_total=0.0),
        SimpleNamespace(key="_lora_dx_kernel", count=5, device_type=DeviceType.CUDA, device_time_total=50.0),
        SimpleNamespace(key="sm90_gemm" + "x" * 200, count=10, device_type=DeviceType.CUDA, device_time_total=400.0),
        SimpleNamespace(key="Memset (Device)", count=5, device_type=DeviceType.CUDA, device_time_total=0.0),
        SimpleNamespace(key="old_torch_kernel", count=5, cuda_time_total=100.0),  # before device_time_total
    ]
    rows = _load_script().summarise_device_events(events, calls=5)
    assert [row["name"][:9] for row in rows] == ["sm90_gemm", "old_torch", "_lora_dx_"]
    assert len(rows[0]["name"]) == 120
    assert [(row["calls"], row["device_us_per_call"]) for row in rows] == [(2.0, 80.0), (1.0, 20.0), (1.0, 10.0)]


def test_describe_error_names_the_error_that_broke_a_capture():
    script = _load_script()
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from None
    except RuntimeError as error:
        assert (
            script.describe_error(error)
            == "RuntimeError: CUDA error: operation failed due to a previous error during capture"
        )
    try:
        try:
            raise ValueError("bad")
        except ValueError:
            raise RuntimeError("capture invalidated")  # noqa: B904 - the implicit context is what is tested
    except RuntimeError as error:
        assert script.describe_error(error) == "RuntimeError: capture invalidated (while handling ValueError: bad)"
    assert script.describe_error(KeyError()) == "KeyError: "


@pytest.mark.parametrize(
    ("row", "expected"), [({"a": 2.0, "b": 4.0}, 0.5), ({"a": 2.0, "b": None}, None), ({"b": 1.0}, None)]
)
def test_ratio_is_none_when_a_time_is_missing(row, expected):
    assert _load_script().ratio(row, "a", "b") == expected
