"""bench/profile_step.py (the GPU check's train-step profile) runs end to end on the CPU (--dry-run).

Its timings on a tiny CPU model mean nothing and are not checked; the test keeps the script from
failing on the rarely lent GPU machine for a reason the CPU could have shown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "profile_step.py"


def test_dry_run_profiles_both_providers(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--profiled-steps", "1", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["providers"]) == {"peft", "lorafast[torch]"}
    assert results["compiled_launches"] is True
    assert results["kernel_choices"]["main GEMM"] == []  # the "torch" backend launches no kernel
    for name, row in results["providers"].items():
        assert row["wall_ms"] > 0 and row["host_ms"] > 0, name
        ops = row["top_ops"]["by_self_cpu"]
        assert ops and all(op["calls_per_step"] > 0 for op in ops), name
        assert any("mm" in op["name"] or "linear" in op["name"] for op in ops), name
        functions = row["top_functions"]
        assert functions and functions[0]["own_us_per_step"] >= functions[-1]["own_us_per_step"], name
        assert "not_measured" in row["synchronizations"], name  # the CPU has no CUDA to wait for
    lorafast_ops = {op["name"] for op in results["providers"]["lorafast[torch]"]["top_ops"]["by_self_cpu"]}
    assert any("EagerLoraFunction" in name for name in lorafast_ops), "lorafast's layers do not show in its profile"


def test_synchronizations_are_counted_per_source_line(monkeypatch):
    """The sync count reads the warnings ``set_sync_debug_mode("warn")`` raises (faked here: the
    CPU has no CUDA), counts only those, and puts the debug mode back even when the step fails."""
    profile_step = load_bench_script("profile_step")
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # one line, 3 times
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    found = profile_step.synchronizations(step, torch.device("cuda"))
    assert found["count"] == 4
    assert sorted(found["where"].values()) == [1, 3]
    assert all(where.startswith("test_profile_step.py:") for where in found["where"])
    assert modes == ["warn", "default"]

    def failing_step():
        raise RuntimeError("boom")

    modes.clear()
    with pytest.raises(RuntimeError, match="boom"):
        profile_step.synchronizations(failing_step, torch.device("cuda"))
    assert modes == ["warn", "default"]
    assert profile_step.synchronizations(step, torch.device("cpu")) == {
        "not_measured": "host-device synchronization needs CUDA"
    }


def test_runs_where_lorafast_is_not_installed():
    """The GPU box installs nothing: run as a script, with the installed package's import hook
    removed, the script must still import lorafast (from the source tree) and parse its options."""
    uninstalled = (
        "import runpy, sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        "sys.modules.pop('lorafast', None); "
        f"sys.path[0] = {str(SCRIPT.parent)!r}; sys.argv = [{str(SCRIPT)!r}, '--help']; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", uninstalled], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "host vs GPU" in done.stdout
