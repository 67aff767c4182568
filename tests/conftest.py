"""Test-session set-up: without CUDA, Triton kernels run through Triton's CPU interpreter.

Sharding: ``LORAFAST_TEST_SHARD="i/n"`` (0 <= i < n) keeps only the i-th of n interleaved shards
of the selected tests (item index modulo n == i, counted after ``-m``/``-k``/``--deselect``),
so n pytest processes started with i = 0 … n-1 run every test exactly once between them
(``bench/gpu_check.sh`` runs the GPU tests this way). The other items are reported as
deselected, so pytest's counts stay honest. Unset or empty: no sharding.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARD_VARIABLE = "LORAFAST_TEST_SHARD"
_shard_key = pytest.StashKey[tuple[int, int]]()


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with integers 0 <= i < n; anything else is a ``pytest.UsageError`` naming the variable."""
    index, slash, count = value.strip().partition("/")
    try:
        shard = (int(index), int(count)) if slash else None
    except ValueError:
        shard = None
    if shard is None or not 0 <= shard[0] < shard[1]:
        raise pytest.UsageError(f"{SHARD_VARIABLE}={value!r}: expected 'i/n' with integers 0 <= i < n, e.g. '0/4'")
    return shard


def pytest_configure(config):
    value = os.environ.get(SHARD_VARIABLE)
    if value:
        config.stash[_shard_key] = parse_shard(value)  # fail before collection, not after it


@pytest.hookimpl(trylast=True)  # after -m / -k / --deselect, so the shards split the selected tests evenly
def pytest_collection_modifyitems(config, items):
    if _shard_key not in config.stash:
        return
    index, count = config.stash[_shard_key]
    kept = [item for position, item in enumerate(items) if position % count == index]
    deselected = [item for position, item in enumerate(items) if position % count != index]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = kept
