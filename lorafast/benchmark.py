"""The one benchmark harness: timing, memory, environment and reporting.

Every benchmark in the project (``lorafast bench``, ``bench/test_bench_cpu.py``,
``bench/kernel_bench.py``) times with :func:`measure_time`, counts memory with
:func:`peak_memory_bytes` and :func:`saved_activation_bytes`, and reports through
:class:`BenchRow` and the writers here, so numbers from different scripts mean the same thing.

Timing: on CUDA ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events); on the CPU
a ``time.perf_counter`` loop with warmup and a time budget, round-robin over the callables being
compared (:func:`compare_times`). Both give the median and the 20th / 80th percentiles in
milliseconds. To tell launch overhead from GPU work: :func:`measure_host_time` (how long a call
takes to return) and :func:`measure_graph_time` (the call replayed from a CUDA graph: GPU time only).

Files are written atomically: to a temporary file in the target's directory, then
``os.replace``, so a crash or a full disk never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

VERSIONED_PACKAGES = ("torch", "triton", "peft", "transformers", "lorafast")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
class TimingBudget:
    """How long to time one callable.

    CPU: ``cpu_warmup_calls`` untimed calls, then timed calls until ``cpu_seconds`` have passed
    (per callable, when several are compared), at least ``cpu_min_calls`` and at most
    ``cpu_max_calls`` of them.
    CUDA: ``do_bench(warmup=cuda_warmup_ms, rep=cuda_rep_ms)``, timed again with a longer ``rep``
    when that gave fewer than ``cuda_min_samples`` calls (do_bench times ``rep`` ms' worth of
    calls: 100 ms is 3-5 calls of a 20-30 ms training step, whose median and p20/p80 would
    mean little).
    """

    cpu_seconds: float = 1.0
    cpu_warmup_calls: int = 2
    cpu_min_calls: int = 5
    cpu_max_calls: int = 100
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    cuda_min_samples: int = 20

    def __post_init__(self) -> None:
        if self.cpu_seconds <= 0 or self.cuda_warmup_ms < 0 or self.cuda_rep_ms <= 0:
            raise ValueError(f"timing budgets must be positive, got {self}")
        if self.cpu_warmup_calls < 0 or not 3 <= self.cpu_min_calls <= self.cpu_max_calls:
            raise ValueError(f"need 0 <= cpu_warmup_calls and 3 <= cpu_min_calls <= cpu_max_calls, got {self}")
        if self.cuda_min_samples < 3:
            raise ValueError(f"need cuda_min_samples >= 3, got {self}")


@dataclass(frozen=True)
class Timing:
    """Median and 20th / 80th percentile of one call, in milliseconds, over ``samples`` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int | None = None


@dataclass(frozen=True)
class Step:
    """One thing to time: ``run()``, the tensors whose ``.grad`` is cleared before each call, and a
    context each call runs in (e.g. a lorafast backend), entered and left outside the timing."""

    run: Callable[[], object]
    grads_to_reset: tuple[torch.Tensor, ...] = ()
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    """Set ``.grad`` to None (what ``do_bench(grad_to_none=...)`` does between calls)."""
    for tensor in tensors:
        tensor.grad = None


def measure_time(
    fn: Callable[[], object],
    device: torch.device,
    budget: TimingBudget,
    grads_to_reset: Sequence[torch.Tensor] = (),
) -> Timing:
    """Time ``fn()``; the ``.grad`` of ``grads_to_reset`` is set to None before each call, outside the timing."""
    return compare_times({"step": Step(fn, tuple(grads_to_reset))}, device, budget)["step"]


def compare_times(steps: Mapping[str, Step], device: torch.device, budget: TimingBudget) -> dict[str, Timing]:
    """Time several steps that are to be compared with each other.

    CUDA: each with ``triton.testing.do_bench`` in turn. CPU: round-robin, one call of every step
    per round (after ``cpu_warmup_calls`` rounds), for ``cpu_seconds`` per step, so a change in
    the machine's load hits every step alike instead of whichever happened to run then.
    """
    if device.type == "cuda":
        return {name: _do_bench(step, budget) for name, step in steps.items()}
    if device.type != "cpu":
        raise ValueError(f"the benchmark harness times cpu and cuda devices, got {device.type!r}")
    for _ in range(budget.cpu_warmup_calls):
        for step in steps.values():
            _timed_call(step)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    deadline = time.perf_counter() + budget.cpu_seconds * len(steps)
    rounds = 0
    while rounds < budget.cpu_min_calls or (rounds < budget.cpu_max_calls and time.perf_counter() < deadline):
        for name, step in steps.items():
            samples[name].append(_timed_call(step))
        rounds += 1
    return {name: _summary(times) for name, times in samples.items()}


def _do_bench(step: Step, budget: TimingBudget) -> Timing:
    import triton.testing

    rep_ms = budget.cuda_rep_ms
    with step.context():
        for _ in range(2):
            samples = triton.testing.do_bench(
                step.run,
                warmup=budget.cuda_warmup_ms,
                rep=rep_ms,
                grad_to_none=list(step.grads_to_reset) or None,
                return_mode="all",
            )
            if len(samples) >= budget.cuda_min_samples:
                break
            rep_ms = rep_ms * 1.25 * budget.cuda_min_samples / len(samples)  # do_bench counts from 5 calls' mean
    return _summary(samples)


def _timed_call(step: Step) -> float:
    """Milliseconds of one ``step.run()`` (grads cleared and context entered before the clock starts)."""
    reset_grads(step.grads_to_reset)
    with step.context():
        started = time.perf_counter()
        step.run()
        return (time.perf_counter() - started) * 1e3


def _summary(samples_ms: Sequence[float]) -> Timing:
    deciles = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return Timing(
        median_ms=statistics.median(samples_ms), p20_ms=deciles[1], p80_ms=deciles[7], samples=len(samples_ms)
    )


def measure_host_time(
    fn: Callable[[], object], device: torch.device, calls: int = 20, samples: int = 5, warmup_calls: int = 2
) -> Timing:
    """Host time of one ``fn()``: how long the call takes to return, not how long its work takes.

    After ``warmup_calls`` calls the device is synchronized; each of ``samples`` samples is
    ``time.perf_counter`` around ``calls`` back-to-back calls with no synchronize between them,
    divided by ``calls``, and the device is synchronized after each sample, outside the timing.
    On CUDA this is the Python and launch cost per call: kernels are queued, not waited for, as
    long as the launch queue (about a thousand launches) never fills, so keep ``calls`` small
    (the default 20 suits an op of up to a few dozen launches). Host time at or above the GPU
    time (:func:`measure_graph_time`) means the op is launch-bound: the GPU waits for the host.
    On the CPU the host time is the whole time.
    """
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the benchmark harness times cpu and cuda devices, got {device.type!r}")
    if calls < 1 or samples < 3 or warmup_calls < 0:
        raise ValueError(f"need calls >= 1, samples >= 3, warmup_calls >= 0, got {calls}, {samples}, {warmup_calls}")

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup_calls):
        fn()
    per_call_ms = []
    for _ in range(samples):
        synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call_ms.append((time.perf_counter() - started) * 1e3 / calls)
        synchronize()
    return _summary(per_call_ms)


def measure_graph_time(
    fn: Callable[[], object], device: torch.device, budget: TimingBudget, warmup_calls: int = 3
) -> Timing:
    """GPU time of one ``fn()`` without the host's share: ``fn`` captured once in a CUDA graph,
    then ``graph.replay`` (one launch) timed by :func:`measure_time`.

    ``fn`` must be warm (compiled, autotuned): capture records launches, it cannot benchmark
    configs, synchronize or copy to the host; what it cannot capture raises, as does a device
    other than CUDA. The warmup calls run on a side stream, as PyTorch's CUDA-graph docs ask
    before a capture. The graph and its memory pool are released before returning.
    """
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device.type!r}")
    side_stream = torch.cuda.Stream(device)
    side_stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side_stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return measure_time(graph.replay, device, budget)
    finally:
        graph.reset()


def peak_memory_bytes(step: Step, device: torch.device) -> int | None:
    """Bytes one ``step.run()`` allocates at its peak beyond what was allocated before it (CUDA); None on the CPU."""
    if device.type != "cuda":
        return None
    reset_grads(step.grads_to_reset)
    with step.context():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        step.run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - resident


def saved_activation_bytes(forward: Callable[[], object], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``forward()`` runs: unique storages, parameters excluded.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's storage is
    counted once (views of one storage, or one tensor saved by several ops, cost once), and
    storages shared with ``parameters`` (frozen weights, LoRA factors: they live anyway) are
    not counted. The output of ``forward()`` is dropped before returning.
    """
    parameter_storages = {parameter.untyped_storage().data_ptr() for parameter in parameters}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


def copy_bandwidth_gbps(device: torch.device, budget: TimingBudget, megabytes: int | None = None) -> float:
    """The device's copy roofline: GB/s (1e9 bytes) read plus written by ``dst.copy_(src)`` of a large tensor.

    ``megabytes`` defaults to 1024 on CUDA (well beyond any L2) and 128 on the CPU.
    """
    size_mb = megabytes or (1024 if device.type == "cuda" else 128)
    source = torch.empty(size_mb * 2**20, dtype=torch.uint8, device=device).fill_(1)
    destination = torch.empty_like(source)
    timing = measure_time(lambda: destination.copy_(source), device, budget)
    return 2 * source.numel() / (timing.median_ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; on the CPU the processor model and the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model} ({torch.get_num_threads()} threads)"


def package_version(name: str) -> str:
    """The installed distribution's version, else an imported module's ``__version__`` (a source checkout)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return getattr(sys.modules.get(name), "__version__", "not installed")


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout lorafast runs from, or ``"unknown"``."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """The fields every row carries: device name, library versions, git commit."""
    return {
        "device": device_name(device),
        **{f"{name}_version": package_version(name) for name in VERSIONED_PACKAGES},
        "git_commit": git_commit(),
    }


@dataclass
class BenchRow:
    """One measurement: a provider running one mode of one case.

    ``status`` is ``"ok"``, ``"skipped: <why>"`` or ``"error: <what>"``; a row that is not ok
    has no timings. ``ratio_to_floor`` is median / the base layer's median (same case and mode),
    ``speedup_over_peft`` is PEFT's median / median. ``roofline_fraction`` is the achieved GB/s
    (minimum bytes the mode must move / time) over the measured copy bandwidth.
    ``peak_memory_bytes`` is the peak beyond the memory resident before the call (CUDA only);
    ``saved_activation_bytes`` is what autograd keeps for backward (training modes only).
    ``kernel_path`` says which kernels a fused provider dispatched to for the row's shape (e.g.
    ``"fwd cublas, bwd cublas, dA/dB atomic"``; None for the others).
    """

    suite: str
    case: str
    mode: str
    provider: str
    dtype: str
    tokens: int
    rank: int
    dropout: float
    in_features: int | None = None
    out_features: int | None = None
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    samples: int | None = None  # timed calls behind median / p20 / p80
    ratio_to_floor: float | None = None
    speedup_over_peft: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    roofline_fraction: float | None = None
    peak_memory_bytes: int | None = None
    saved_activation_bytes: int | None = None
    tokens_per_s: float | None = None
    kernel_path: str | None = None
    device: str = ""
    torch_version: str = ""
    triton_version: str = ""
    peft_version: str = ""
    transformers_version: str = ""
    lorafast_version: str = ""
    git_commit: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


FLOOR_PROVIDER = "base"
PEFT_PROVIDER = "peft"


def fill_relative_metrics(rows: Sequence[BenchRow]) -> None:
    """Set ``ratio_to_floor`` and ``speedup_over_peft`` on every ok row, per (suite, case, mode)."""
    medians = {(row.suite, row.case, row.mode, row.provider): row.median_ms for row in rows if row.ok}
    for row in rows:
        if not row.ok:
            continue
        floor = medians.get((row.suite, row.case, row.mode, FLOOR_PROVIDER))
        peft = medians.get((row.suite, row.case, row.mode, PEFT_PROVIDER))
        row.ratio_to_floor = row.median_ms / floor if floor else None
        row.speedup_over_peft = peft / row.median_ms if peft else None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_output_path(path: str | os.PathLike, suffixes: Sequence[str] | None = None) -> Path:
    """Fail early (before a long run) if ``path`` cannot be written: missing folder, wrong suffix, a folder."""
    target = Path(path)
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise ValueError(f"{target}: expected a file ending in one of {', '.join(suffixes)}")
    if target.is_dir():
        raise ValueError(f"{target} is a directory, expected a file path")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{target}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ValueError(f"{target}: the folder {target.parent} is not writable")
    return target


def rows_as_dicts(rows: Iterable[BenchRow]) -> list[dict]:
    return [dataclasses.asdict(row) for row in rows]


def write_json(
    rows: Sequence[BenchRow], path: str | os.PathLike, copy_gbps: float | None = None, complete: bool = True
) -> None:
    """``{"copy_bandwidth_gbps": ..., "complete": ..., "rows": [...]}``, written atomically;
    ``complete`` is False for the rows of an interrupted run."""
    with atomic_output(path) as handle:
        payload = {"copy_bandwidth_gbps": copy_gbps, "complete": complete, "rows": rows_as_dicts(rows)}
        json.dump(payload, handle, indent=1)
        handle.write("\n")


def write_csv(rows: Sequence[BenchRow], path: str | os.PathLike) -> None:
    """One line per row, every :class:`BenchRow` field a column (empty for None), written atomically."""
    with atomic_output(path, mode="w") as handle:
        writer = csv.DictWriter(handle, fieldnames=[field.name for field in dataclasses.fields(BenchRow)])
        writer.writeheader()
        writer.writerows(rows_as_dicts(rows))


def _format_number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _format_mebibytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


TABLE_COLUMNS = (
    ("case", "<"),
    ("mode", "<"),
    ("provider", "<"),
    ("median ms [p20, p80]", ">"),
    ("x floor", ">"),
    ("x PEFT", ">"),
    ("TFLOP/s", ">"),
    ("% copy BW", ">"),
    ("tok/s", ">"),
    ("peak MiB", ">"),
    ("saved MiB", ">"),
    ("kernels", "<"),
)


def _table_cells(row: BenchRow) -> tuple[str, ...]:
    return (
        row.case,
        row.mode,
        row.provider,
        f"{row.median_ms:.3f} [{row.p20_ms:.3f}, {row.p80_ms:.3f}]",
        _format_number(row.ratio_to_floor, ".2f"),
        _format_number(row.speedup_over_peft, ".2f"),
        _format_number(row.tflops, ".2f"),
        _format_number(None if row.roofline_fraction is None else 100 * row.roofline_fraction, ".0f"),
        _format_number(row.tokens_per_s, ",.0f"),
        _format_mebibytes(row.peak_memory_bytes),
        _format_mebibytes(row.saved_activation_bytes),
        row.kernel_path or "",
    )


def format_table(rows: Sequence[BenchRow]) -> str:
    """A plain-text table, one line per row, a rule between (case, mode) groups; a row that is not ok shows why."""
    header = tuple(name for name, _ in TABLE_COLUMNS)
    labels = [(row.case, row.mode, row.provider) for row in rows]
    cells = [_table_cells(row) if row.ok else (*label, row.status) for row, label in zip(rows, labels, strict=True)]
    measured = [line for line in cells if len(line) == len(header)]
    widths = [max(len(line[i]) for line in [header, *measured, *labels] if i < len(line)) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        if len(line) < len(header):  # a skipped or failed row: its labels, then the reason unpadded
            return "  ".join([*(f"{cell:<{widths[i]}}" for i, cell in enumerate(line[:-1])), line[-1]])
        return "  ".join(
            f"{cell:{align}{widths[i]}}" for i, (cell, (_, align)) in enumerate(zip(line, TABLE_COLUMNS, strict=True))
        )

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [render(header), rule]
    for index, line in enumerate(cells):
        if index and labels[index][:2] != labels[index - 1][:2]:
            out.append(rule)
        out.append(render(line).rstrip())
    return "\n".join(out)


def write_speedup_plot(rows: Sequence[BenchRow], path: str | os.PathLike) -> None:
    """Bar chart of the speed-up over PEFT per case, one panel per mode, one bar per LoRA provider; atomic.

    The dashed line at 1 is PEFT. The base layer (no LoRA) is left out: its ratio to PEFT is in
    the table, and as the tallest bar by far it would flatten the rest. Raises ``ValueError`` if
    no row has a speed-up over PEFT.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    excluded = (PEFT_PROVIDER, FLOOR_PROVIDER)
    plotted = [row for row in rows if row.ok and row.speedup_over_peft is not None and row.provider not in excluded]
    if not plotted:
        raise ValueError("nothing to plot: no LoRA row has a speed-up over PEFT (was PEFT skipped?)")
    modes = list(dict.fromkeys(row.mode for row in plotted))
    providers = list(dict.fromkeys(row.provider for row in plotted))
    most_cases = max(len({row.case for row in plotted if row.mode == mode}) for mode in modes)
    width = min(40.0, max(9.0, 2.0 + 0.3 * len(providers) * most_cases))
    figure, axes = plt.subplots(
        len(modes), 1, figsize=(width, 1.0 + 2.8 * len(modes)), squeeze=False, layout="constrained"
    )
    bar_width = 0.8 / len(providers)
    for axis, mode in zip(axes[:, 0], modes, strict=True):
        mode_rows = [row for row in plotted if row.mode == mode]
        cases = list(dict.fromkeys(row.case for row in mode_rows))
        speedups = {(row.case, row.provider): row.speedup_over_peft for row in mode_rows}
        for index, provider in enumerate(providers):
            positions = [c + (index - (len(providers) - 1) / 2) * bar_width for c in range(len(cases))]
            heights = [speedups.get((case, provider), 0.0) for case in cases]
            bars = axis.bar(positions, heights, bar_width, label=provider, color=f"C{index}")
            axis.bar_label(bars, labels=[f"{h:.2f}" if h else "" for h in heights], fontsize=7, padding=1)
        axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label="peft" if axis is axes[0, 0] else None)
        axis.set_xticks(
            range(len(cases)),
            cases,
            fontsize=8,
            rotation=30 if len(cases) > 4 else 0,
            ha="right" if len(cases) > 4 else "center",
        )
        axis.set_ylabel("speed-up over PEFT")
        axis.set_title(mode, fontsize=10)
        axis.margins(y=0.15)
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    first = plotted[0]
    figure.suptitle(
        f"LoRA speed-up over PEFT: {first.device}, {first.dtype}, lorafast @ {first.git_commit}", fontsize=10
    )
    target = Path(path)
    with atomic_output(target, mode="wb") as handle:
        figure.savefig(handle, format=target.suffix.lstrip(".").lower(), dpi=120)
    plt.close(figure)
