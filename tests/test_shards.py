"""LORAFAST_TEST_SHARD (tests/conftest.py): n shards are disjoint, cover every selected test, split
after marker selection, and report the rest as deselected; bad values are a usage error.

Runs ``pytest --collect-only`` in subprocesses on a small test folder that uses a copy of the
real conftest (``bench/gpu_check.sh`` relies on this to split the GPU tests across processes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARD_VARIABLE, parse_shard

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
SHARDS = 3
# ten tests; -m "not other" deselects those marked `other` (0, 4, 8) and keeps seven
SAMPLE_TESTS = """
import pytest

@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.other) if i % 4 == 0 else i for i in range(10)])
def test_case(i):
    pass
"""
SELECTED = [f"test_sample.py::test_case[{i}]" for i in range(10) if i % 4 != 0]


def _sample_folder(folder: Path) -> Path:
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    other: deselected by -m\n")
    (folder / "test_sample.py").write_text(SAMPLE_TESTS)
    return folder


def _collect(folder: Path, shards: list[str | None]) -> list[subprocess.CompletedProcess]:
    """``pytest --collect-only -q -m "not other"`` in ``folder`` once per shard value (None: unset), in parallel."""
    environment = {key: value for key, value in os.environ.items() if key not in (SHARD_VARIABLE, "PYTEST_ADDOPTS")}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "not other"]
    runs = [
        subprocess.Popen(
            command,
            cwd=folder,
            env=environment if shard is None else {**environment, SHARD_VARIABLE: shard},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for shard in shards
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    return [
        subprocess.CompletedProcess(run.args, run.returncode, output) for run, output in zip(runs, outputs, strict=True)
    ]


def _collected_ids(run: subprocess.CompletedProcess) -> list[str]:
    assert run.returncode == 0, run.stdout
    return [line for line in run.stdout.splitlines() if "::" in line]


def test_shards_are_disjoint_cover_every_selected_test_and_count_the_rest_as_deselected(tmp_path):
    folder = _sample_folder(tmp_path)
    unsharded, *sharded = _collect(folder, [None, *(f"{index}/{SHARDS}" for index in range(SHARDS))])
    assert _collected_ids(unsharded) == SELECTED
    shard_ids = [_collected_ids(run) for run in sharded]
    for index, ids in enumerate(shard_ids):
        # interleaved over the tests -m selected (sharding before -m would give shard 0 cases 3, 6, 9)
        assert ids == SELECTED[index::SHARDS]
        summary = re.search(r"(\d+)/10 tests collected \((\d+) deselected\)", sharded[index].stdout)
        assert summary is not None, sharded[index].stdout
        assert (int(summary[1]), int(summary[2])) == (len(ids), 10 - len(ids))
    every = [test for ids in shard_ids for test in ids]
    assert len(every) == len(set(every)), "shards overlap"
    assert set(every) == set(SELECTED), "shards miss tests"


@pytest.mark.parametrize("value", ["1", "a/b", "3/3", "-1/2", "1/0", "0/2/3", "0 / two"])
def test_parse_shard_rejects_bad_values_naming_the_variable(value):
    with pytest.raises(pytest.UsageError, match=f"{SHARD_VARIABLE}='{re.escape(value)}'"):
        parse_shard(value)


def test_parse_shard_accepts_i_of_n():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 5/6 ") == (5, 6)


def test_bad_shard_value_stops_pytest_before_collection(tmp_path):
    (run,) = _collect(_sample_folder(tmp_path), ["2/2"])
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert f"{SHARD_VARIABLE}='2/2': expected 'i/n'" in run.stdout
    assert "test_case" not in run.stdout
