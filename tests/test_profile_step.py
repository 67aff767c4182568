"""bench/profile_step.py (the GPU check's train-step profile) runs end to end on the CPU (--dry-run).

Its timings on a tiny CPU model mean nothing and are not checked; the test keeps the script from
failing on the rarely lent GPU machine for a reason the CPU could have shown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    for name, row in results["providers"].items():
        assert row["wall_ms"] > 0 and row["host_ms"] > 0, name
        ops = row["top_ops"]["by_self_cpu"]
        assert ops and all(op["calls_per_step"] > 0 for op in ops), name
        assert any("mm" in op["name"] or "linear" in op["name"] for op in ops), name
        functions = row["top_functions"]
        assert functions and functions[0]["own_us_per_step"] >= functions[-1]["own_us_per_step"], name
    lorafast_ops = {op["name"] for op in results["providers"]["lorafast[torch]"]["top_ops"]["by_self_cpu"]}
    assert any("EagerLoraFunction" in name for name in lorafast_ops), "lorafast's layers do not show in its profile"
