"""Launch helpers of kernels._common: TunedLauncher (the autotuner once per key, then the JIT
function with its choice), BoundLaunch (a launch with its fixed arguments bound), launch_device (the tensors' GPU made current) and the architecture
lookups the prunes use.

TunedLauncher is checked with a stand-in autotuner that records calls (the real one is exercised
by every interpreter test and, with its real prune, by tests/test_kernels_compile.py).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from lorafast.kernels._common import (
    SMEM_PER_BLOCK,
    BoundLaunch,
    TunedLauncher,
    arch_family,
    device_arch,
    launch_device,
    smem_limit,
)


def _config(block):
    return SimpleNamespace(all_kwargs=lambda: {"BLOCK": block, "num_warps": 4})


class FakeAutotuner:
    """What TunedLauncher uses of ``triton.runtime.autotuner.Autotuner``: ``arg_names``, ``keys``,
    ``configs``, ``early_config_prune``, ``fn[grid](...)``, ``self[grid](...)`` and
    ``best_config`` set by ``run``. The prune keeps both configs, except the first alone for
    M_BUCKET <= 16 (as a small problem keeps few tiles); ``run`` picks by FLAG."""

    def __init__(self):
        self.arg_names = ["x_ptr", "y_ptr", "M", "K", "M_BUCKET", "FLAG", "BLOCK"]
        self.keys = ["M_BUCKET", "K", "FLAG"]
        self.configs = [_config(32), _config(64)]
        self.pruned, self.cache = [], {}
        self.tuned, self.direct = [], []
        self.best_config = None
        outer = self

        class Jit:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: outer.direct.append((grid, args, kwargs))

        self.fn = Jit()

    def early_config_prune(self, configs, named_args, **kwargs):
        self.pruned.append({**named_args, **kwargs})
        return configs[:1] if named_args["M_BUCKET"] <= 16 else configs

    def run(self, *args, grid, warmup, **kwargs):
        self.best_config = self.configs[0 if kwargs["FLAG"] else 1]
        self.tuned.append((grid, args, kwargs))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def _call(launcher, M, dtype=torch.float32, flag=True, grid=(1,)):
    x, y = torch.empty(2, dtype=dtype), torch.empty(2, dtype=torch.float32)
    launcher.launch(grid, (x, y, M, 8, 1 << (M - 1).bit_length()), {"FLAG": flag})


def test_memoized_launches_get_the_autotuners_config_for_their_key():
    fake = FakeAutotuner()
    launcher = TunedLauncher(fake)
    _call(launcher, 100)
    _call(launcher, 120, grid=(2,))  # same key (M_BUCKET 128, K, FLAG, dtypes): memoized
    assert len(fake.tuned) == 1 and len(fake.direct) == 1
    grid, args, kwargs = fake.direct[0]
    assert grid == (2,) and args[2] == 120 and kwargs == {"FLAG": True, "BLOCK": 32, "num_warps": 4}
    _call(launcher, 200)  # another M bucket
    _call(launcher, 100, flag=False)  # another constexpr key value
    _call(launcher, 100, dtype=torch.float16)  # another tensor dtype (the autotuner keys on dtypes)
    assert len(fake.tuned) == 4 and len(fake.direct) == 1
    _call(launcher, 100, flag=False)
    assert fake.direct[-1][2] == {"FLAG": False, "BLOCK": 64, "num_warps": 4}


def test_a_key_whose_prune_keeps_one_config_launches_it_without_the_autotuner():
    """triton 3.6's autotuner benchmarks even a lone pruned config (LORAFAST_AUTOTUNE=0 on the GPU
    machine: ~100 launches and a sync per key; an error while a CUDA graph is captured): the
    launcher runs the prune's one survivor itself, once per key, and memoizes it."""
    fake = FakeAutotuner()
    launcher = TunedLauncher(fake)
    _call(launcher, 9, flag=False)  # M_BUCKET 16: the prune keeps BLOCK 32 only
    _call(launcher, 10, flag=False)  # same key: memoized, not pruned again
    assert fake.tuned == [] and len(fake.pruned) == 1 and fake.pruned[0]["M"] == 9 and not fake.pruned[0]["FLAG"]
    assert [kwargs for _, _, kwargs in fake.direct] == [{"FLAG": False, "BLOCK": 32, "num_warps": 4}] * 2
    assert launcher.memoized((torch.empty(2), torch.empty(2), 10, 8, 16), {"FLAG": False}) == {"BLOCK": 32, "num_warps": 4}
    fake.configs = fake.configs[:1]  # an autotuner with one config neither prunes nor benchmarks it
    launcher.forget()
    _call(launcher, 100, flag=False)
    assert fake.tuned == [] and len(fake.pruned) == 1 and fake.direct[-1][2]["BLOCK"] == 32


def test_a_new_key_while_a_cuda_graph_is_captured_launches_the_default_unmemoized(monkeypatch):
    """Autotuning benchmarks and synchronizes, which a CUDA-graph capture forbids: a key first
    seen while capturing launches the prune's first config without the autotuner, and its next
    launch outside the capture is autotuned as usual."""
    from lorafast.kernels import _common

    fake = FakeAutotuner()
    launcher = TunedLauncher(fake)
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    _call(launcher, 100, flag=False)  # the prune keeps both configs; the autotuner would take BLOCK 64
    assert fake.tuned == [] and [kwargs["BLOCK"] for _, _, kwargs in fake.direct] == [32]
    assert launcher.choices() == []
    monkeypatch.setattr(_common, "capturing", lambda device: False)
    _call(launcher, 100, flag=False)
    assert len(fake.tuned) == 1 and launcher.choices()[0]["config"]["BLOCK"] == 64


def test_choices_list_each_memoized_key_and_forget_clears_them():
    fake = FakeAutotuner()
    fake.cache = {"stale": None}
    launcher = TunedLauncher(fake)
    _call(launcher, 100)
    _call(launcher, 100, flag=False, dtype=torch.float16)
    assert launcher.choices() == [
        {"key": ["128", "8", "True", "torch.float32", "torch.float32"], "config": {"BLOCK": 32, "num_warps": 4}},
        {"key": ["128", "8", "False", "torch.float16", "torch.float32"], "config": {"BLOCK": 64, "num_warps": 4}},
    ]
    launcher.forget()
    assert launcher.choices() == [] and fake.cache == {}
    _call(launcher, 100)
    assert len(fake.tuned) == 3  # through the autotuner again


def test_an_argument_that_is_a_tensor_in_one_call_and_an_int_in_another():
    """A slot that holds an int in one call and a tensor in another (as the kernels' seed did
    before it became an int word beside a pointer): the memo key follows the autotuner's, which
    counts a tensor argument's dtype, and neither call layout breaks the other."""
    fake = FakeAutotuner()
    launcher = TunedLauncher(fake)
    x = torch.empty(2)
    launcher.launch((1,), (x, 7, 100, 8, 128), {"FLAG": True})  # y_ptr slot an int
    launcher.launch((1,), (x, torch.empty(1, dtype=torch.int64), 100, 8, 128), {"FLAG": True})  # a tensor there
    launcher.launch((1,), (x, 9, 100, 8, 128), {"FLAG": True})
    launcher.launch((1,), (x, torch.empty(1, dtype=torch.int64), 100, 8, 128), {"FLAG": True})
    assert len(fake.tuned) == 2 and len(fake.direct) == 2
    assert fake.direct[0][1][1] == 9 and isinstance(fake.direct[1][1][1], torch.Tensor)


def test_nothing_is_memoized_when_a_tool_replaces_run():
    fake = FakeAutotuner()
    launcher = TunedLauncher(fake)
    _call(launcher, 100)  # the real run chose a config: memoized for this key only
    recorded = []
    fake.run = lambda *args, **kwargs: recorded.append(args)  # as bench/compile_check.py records launches
    _call(launcher, 300)
    _call(launcher, 300)
    assert len(recorded) == 2 and len(fake.direct) == 0


def test_a_bound_launch_goes_through_the_launcher_until_its_config_is_memoized():
    """BoundLaunch: each call fills the ``None`` slots in order; the first goes through the
    autotuner, later ones launch the JIT function with the memoized config and the grid it gives,
    a ``forget`` sends the next call through the autotuner again."""
    fake = FakeAutotuner()
    launcher = TunedLauncher(fake)
    grid = lambda meta: (meta["BLOCK"] // 8,)  # noqa: E731
    bound = launcher.bind(grid, [None, None, 100, 8, 128], {"FLAG": True})
    assert isinstance(bound, BoundLaunch) and bound.config is None
    x, y = torch.empty(2), torch.empty(2)
    bound(x, y)
    assert len(fake.tuned) == 1 and fake.tuned[0][1][:2] == (x, y) and bound.config == {"BLOCK": 32, "num_warps": 4}
    other = torch.empty(3)
    bound(other, y)
    grid_used, args, kwargs = fake.direct[-1]
    assert grid_used == (4,) and args == (other, y, 100, 8, 128)
    assert kwargs == {"FLAG": True, "BLOCK": 32, "num_warps": 4}
    launcher.forget()
    assert bound.config is None
    bound(x, y)
    assert len(fake.tuned) == 2 and len(fake.direct) == 1 and bound.config is not None


def test_a_bound_launch_takes_exactly_its_slots():
    bound = TunedLauncher(FakeAutotuner()).bind(lambda meta: (1,), [None, None, 100, 8, 128], {"FLAG": True})
    for values in [(torch.empty(2),), (torch.empty(2), torch.empty(2), 3)]:  # two slots: x_ptr, y_ptr
        with pytest.raises(ValueError):
            bound(*values)


def test_architecture_families_and_shared_memory(monkeypatch):
    assert [arch_family(a) for a in [(9, 0), (10, 0)]] == ["hopper", "hopper"]
    assert [arch_family(a) for a in [(8, 0), (8, 6), (8, 9), (12, 0)]] == ["ampere"] * 4
    meta = torch.device("meta")  # not a CUDA device: pruned for LORAFAST_TARGET_ARCH, sm_90 unless set
    monkeypatch.delenv("LORAFAST_TARGET_ARCH", raising=False)
    assert device_arch(meta) == (9, 0) and smem_limit(meta) == 232448
    monkeypatch.setenv("LORAFAST_TARGET_ARCH", "86")
    assert device_arch(meta) == (8, 6) and smem_limit(meta) == 101376
    monkeypatch.setenv("LORAFAST_TARGET_ARCH", "75")  # not in the table: sm_80's
    assert smem_limit(meta) == SMEM_PER_BLOCK[(8, 0)] == 166912


def test_launch_device_makes_the_tensors_gpu_current_when_another_is(monkeypatch):
    """Triton launches on the current CUDA device: a layer on cuda:1 while cuda:0 is current
    (``device_map="auto"``) must switch to cuda:1 for its launches, and nothing else may pay for
    a switch. Checked with stand-ins for torch.cuda's current device and device context."""
    entered = []

    class DeviceContext:  # stands in for torch.cuda.device
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    with launch_device(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    for current in (torch.device("cuda", 0), torch.device("cpu"), torch.device("meta")):
        context = launch_device(current)
        assert isinstance(context, contextlib.nullcontext), current


def test_every_autotuned_kernel_times_its_configs_with_the_short_timer(monkeypatch):
    """The autotuners time each config with ``autotune_timer`` (5 ms of warm-up, 20 of repeats),
    not Triton's default ``do_bench`` (25 + 100 ms per config, paid for every config at every
    new key on first use), and the main-GEMM choice with the same budget."""
    import triton.testing
    from lorafast.kernels import _common, lora_linear, main_gemm

    for name, launcher in lora_linear._LAUNCHERS.items():
        assert launcher.autotuner.do_bench is _common.autotune_timer, name
    calls = []

    def do_bench(fn, **options):
        calls.append(options)
        return [1.0, 0.9, 1.1] if "quantiles" in options else 1.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert _common.autotune_timer(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [1.0, 0.9, 1.1]
    assert main_gemm.time_ms(lambda: None) == 1.0
    assert calls == [
        {"warmup": 5, "rep": 20, "quantiles": (0.5, 0.2, 0.8)},
        {"warmup": 5, "rep": 20, "return_mode": "median"},
    ]
