#!/usr/bin/env python
"""Where one training step's time goes, PEFT vs lorafast: host vs GPU, and which ops and functions.

On the first H200 run the 2-layer Llama-3-8B-width step (B=1, S=1024, r=16, p=0.1) took 19.5 ms
with PEFT and 25.8 ms with lorafast[triton] (25.0 with lorafast[torch]), though its GPU work is a
few ms and lorafast's layer alone is 1.4x faster than PEFT's at M=8192: the step looks
host-bound. This script measures, per provider, on the same model and tokens:

* ``wall_ms``: the step timed by the project harness (``lorafast.benchmark.measure_time``);
* ``host_ms``: how long the step takes to return without synchronizing
  (``lorafast.benchmark.measure_host_time``); host_ms close to wall_ms means launch-bound;
* ``top_ops``: ``torch.profiler`` over a few steps, the ops with the most self CPU time and
  (on CUDA) the most device time, per step;
* ``top_functions``: ``cProfile`` over a few steps, the Python functions with the most own time
  (Triton's launcher and autotuner show up here, not in the op table);
* ``synchronizations`` (CUDA): the calls in one step that made the host wait for the GPU
  (``torch.cuda.set_sync_debug_mode("warn")``), counted per source line: one per layer would
  serialize the host's launch time with the GPU's work;

and ``kernel_choices``: the configs lorafast's kernels were autotuned to and, under "main GEMM",
the path its launches measured per shape (``lorafast.kernels.autotune_choices``).

    python bench/profile_step.py --json OUT.json           # GPU: the 8B-width case, ~1 min warm
    python bench/profile_step.py --dry-run --json OUT.json # CPU: a tiny Llama, lorafast[torch]

Run it after ``lorafast bench --quick`` in bench/gpu_check.sh: the same shapes are then compiled
and autotuned already (Triton's disk cache keeps both); only the main-GEMM paths are measured
again.
"""

from __future__ import annotations

import argparse
import collections
import copy
import cProfile
import io
import json
import pstats
import sys
import warnings
from pathlib import Path

import torch

# The GPU box installs nothing: there lorafast is the source tree (bench/gpu_check.sh links
# lorafast/kernels into it), which a script run as ``python bench/profile_step.py`` does not see
# (sys.path[0] is bench/). Where lorafast is installed this finds the same code.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from lorafast import benchmark  # noqa: E402
from lorafast.benchmark_suite import (  # noqa: E402
    LorafastProvider,
    PeftProvider,
    TrainStepCase,
    build_decoder,
    llama8b_train_step,
    make_train_step,
)

TOP = 25


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (atomically)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny Llama on the CPU (lorafast[torch] vs PEFT)")
    ap.add_argument("--profiled-steps", type=int, default=3, help="steps under torch.profiler and under cProfile")
    return ap.parse_args(argv)


def top_ops(step, device: torch.device, steps: int) -> dict[str, list[dict]]:
    """The ``TOP`` ops by self CPU time and (CUDA) by self device time, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = list(prof.key_averages())

    def device_us(event) -> float:
        total = getattr(event, "self_device_time_total", None)
        return float(total if total is not None else getattr(event, "self_cuda_time_total", 0.0))

    def row(event) -> dict:
        return {
            "name": event.key,
            "calls_per_step": event.count / steps,
            "self_cpu_us_per_step": event.self_cpu_time_total / steps,
            "self_device_us_per_step": device_us(event) / steps,
        }

    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    result = {"by_self_cpu": [row(e) for e in by_cpu]}
    if device.type == "cuda":
        by_device = sorted(events, key=device_us, reverse=True)[:TOP]
        result["by_self_device"] = [row(e) for e in by_device if device_us(e) > 0]
    return result


def top_functions(step, steps: int) -> list[dict]:
    """The ``TOP`` Python functions by own time (cProfile), per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if line else filename
        rows.append(
            {
                "function": f"{where}({name})",
                "calls_per_step": calls / steps,
                "own_us_per_step": own * 1e6 / steps,
                "cumulative_us_per_step": cumulative * 1e6 / steps,
            }
        )
    return sorted(rows, key=lambda r: r["own_us_per_step"], reverse=True)[:TOP]


def synchronizations(step, device: torch.device) -> dict:
    """``{count, where}``: the synchronizing calls of one ``step`` and the source lines they came
    from (most frequent first), from the warnings ``torch.cuda.set_sync_debug_mode("warn")`` gives."""
    if device.type != "cuda":
        return {"not_measured": "host-device synchronization needs CUDA"}
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(lines), "where": dict(collections.Counter(lines).most_common(TOP))}


def profile_provider(provider, base_model, case: TrainStepCase, input_ids, device, budget, steps: int) -> dict:
    with provider.activated():
        model = provider.adapt_model(copy.deepcopy(base_model), case).train()
        step = make_train_step(model, input_ids)
        for _ in range(3):  # compile, autotune, allocator warm-up
            step()
        wall = benchmark.measure_time(step, device, budget)
        host = benchmark.measure_host_time(step, device, calls=3, samples=3, warmup_calls=1)
        result = {
            "wall_ms": wall.median_ms,
            "host_ms": host.median_ms,
            "top_ops": top_ops(step, device, steps),
            "top_functions": top_functions(step, steps),
            "synchronizations": synchronizations(step, device),
        }
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def lorafast_kernels():
    """``lorafast.kernels``, or None without Triton."""
    try:
        from lorafast import kernels
    except ImportError:
        return None
    return kernels


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        case = TrainStepCase(64, 128, 4, 2, layers=2, vocab=128, batch=1, seq=16, rank=8, dropout=0.1)
        providers = [PeftProvider(), LorafastProvider("torch")]
        budget = benchmark.TimingBudget(cpu_seconds=0.2, cpu_warmup_calls=1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run for a CPU smoke test", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        case = llama8b_train_step(batch=1, seq=1024)
        # lorafast[torch] last (a stage timeout keeps the first two): on the first H200 run it was as
        # slow as lorafast[triton], so the cause may sit above the kernels
        providers = [PeftProvider(), LorafastProvider("triton"), LorafastProvider("torch")]
        budget = benchmark.TimingBudget(cuda_warmup_ms=25, cuda_rep_ms=200)
    generator = torch.Generator(device=device).manual_seed(2)
    input_ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=generator, device=device)
    base_model = build_decoder(case, device, dtype)
    kernels = lorafast_kernels()
    results = {
        "environment": benchmark.environment(device),
        "case": case.label,
        # off where gpu_check.sh's compiled-launch check failed
        "compiled_launches": None if kernels is None else kernels.compiled_launches_enabled(),
        "providers": {},
    }
    json_path = None if args.json is None else benchmark.check_output_path(args.json, (".json",))
    for provider in providers:
        row = profile_provider(provider, base_model, case, input_ids, device, budget, args.profiled_steps)
        results["providers"][provider.name] = row
        # the configs autotuned and, under "main GEMM", the path measured per shape in the steps
        results["kernel_choices"] = None if kernels is None else kernels.autotune_choices()
        syncs = row["synchronizations"].get("count", "n/a")
        print(
            f"{provider.name:18} step {row['wall_ms']:8.3f} ms   host {row['host_ms']:8.3f} ms   syncs {syncs}",
            flush=True,
        )
        for fn in row["top_functions"][:8]:
            print(f"    {fn['own_us_per_step']:9.1f} us/step own  {fn['calls_per_step']:7.1f} calls  {fn['function']}")
        if json_path is not None:  # after each provider: a run cut short keeps what it profiled
            with benchmark.atomic_output(json_path) as out:
                json.dump(results, out, indent=2)
    if json_path is not None:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
