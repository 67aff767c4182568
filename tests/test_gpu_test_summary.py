"""bench/gpu_test_summary.py, which merges bench/gpu_check.sh's test shards, on synthetic shard files.

A GPU is lent rarely and briefly: a broken summary would lose a run's failure messages (the
first H200 run lost its one failure's message that way).
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench_scripts import load_bench_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_test_summary.py"

_SHARD0_XML = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4" time="21.5"><testcase classname="tests.test_kernels" name="test_gpu_a" time="7"/></testsuite>
</testsuites>"""
_SHARD0_LOG = """..F.s
=================================== FAILURES ===================================
_____________ test_gpu_small_odd_shapes[default-M33-K72-N24-r16] ______________
tests/test_kernels.py:120: in run_case
    y, u = lora_forward(x, w, b, a, bb, s, p, seed, path=path)
E   triton.runtime.errors.OutOfResources: out of resources: shared memory, Required: 253952
E   Hardware limit: 232448
=========================== short test summary info ============================
FAILED tests/test_kernels.py::test_gpu_small_odd_shapes[default-M33-K72-N24-r16] - triton.runtime.errors.OutOf...
1 failed, 2 passed, 1 skipped in 21.50s
"""


def _load_script():
    return load_bench_script("gpu_test_summary")


def test_summary_keeps_failure_messages_and_counts_a_timed_out_shard(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    out.mkdir()
    (shards / "shard0.xml").write_text(_SHARD0_XML)
    (shards / "shard0.log").write_text(_SHARD0_LOG)
    (shards / "shard1.log").write_text("...\n")  # interrupted before pytest wrote its XML
    lines = _load_script().summarise(shards, out, ["1", "124"])
    assert lines[0] == "===== summary: 2 shards ====="
    assert lines[1] == "shard 0: tests failed; 2 passed, 1 failed, 0 errors, 1 skipped in 22 s"
    assert lines[2] == "shard 1: TIMED OUT (interrupted); no JUnit XML (FileNotFoundError)"
    assert lines[3].startswith("FAILED tests/test_kernels.py::test_gpu_small_odd_shapes[default-M33")
    assert lines[4] == (
        "test_gpu_small_odd_shapes[default-M33-K72-N24-r16]: triton.runtime.errors.OutOfResources: out of "
        "resources: shared memory, Required: 253952 | Hardware limit: 232448"
    )
    assert lines[5] == (
        "gpu tests: 2 passed, 1 failed, 0 errors, 1 skipped; 1 shard(s) ran out of time (their remaining tests did not run)"
    )
    log = (out / "gpu_tests.log").read_text()
    assert log.startswith("===== shard 0/2 (exit status 1) =====\n..F.s\n")
    assert "===== shard 1/2 (exit status 124) =====\n...\n" in log and log.endswith(lines[-1] + "\n")
    suites = ET.parse(out / "gpu_tests.xml").getroot()
    assert suites.tag == "testsuites" and [s.get("name") for s in suites] == ["gpu_tests_shard0"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_tests.log", "gpu_tests.xml"]


def test_usage_error_without_arguments():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and "SHARD_DIR OUT_DIR RC0" in done.stderr


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_fits_in_six_minutes():
    """The stages' timeouts plus their SIGKILL grace add up to at most 345 s, leaving the start-up
    (two imports) inside the 6 minutes a GPU check may take."""
    text = (REPO / "bench" / "gpu_check.sh").read_text()
    stages = [int(seconds) for seconds in re.findall(r'^stage "[^"]+" (\d+) ', text, re.MULTILINE)]
    tests = int(re.search(r"GPU_TESTS_TIMEOUT:-(\d+)", text).group(1))
    kill_after = int(re.search(r"^KILL_AFTER=(\d+)", text, re.MULTILINE).group(1))
    assert len(stages) == 4, stages  # compiled launch check, kernel bench, lorafast bench, train-step profile
    assert tests + sum(stages) + kill_after * (1 + len(stages)) <= 345
