#!/usr/bin/env python
"""Quick kernel benchmark: fused LoRA launchers vs the frozen base GEMMs, naive PyTorch LoRA
and PEFT's LoRA Linear (bf16, r=16, dropout 0.1, fp32 LoRA params as PEFT keeps them).

Training (forward + backward; the base is ``x Wᵀ`` then ``dY W``):
    K = N ∈ {4096, 5120, 8192}, M ∈ {2048, 8192}
Decode (no grad, dropout off): M ∈ {1, 4, 16}, K = N = 4096, fused unmerged vs merged base; the
fused op by its default path (``fused_unmerged``: the one its first call measured fastest,
``path`` names it), by the small-M kernel (``fused_small_m_unmerged``) and by F1 + F2 + cuBLAS
(``fused_cublas_unmerged``: the small-M kernel re-reads all of A in every program, the other
path reads A once but launches three kernels).

Levels: ``fused_ms`` (and ``fused_over_base``) times the kernel launchers alone, as ``base_ms``
times the bare GEMMs; ``layer_ms`` times lorafast as naive and PEFT are timed, ``ops.lora_linear``
with its autograd and ``.backward``, and ``speedup_vs_peft`` / ``speedup_vs_naive`` compare that.

For each training shape the fused op is timed with the main GEMM forced to "triton" and to
"cublas", and by default, where its first call measures both and keeps the faster
(``lorafast.kernels.main_gemm``; ``main_gemm_chosen`` says what it kept, ``autotune_choices``
under "main GEMM" its two times); ``best_main_gemm`` is the faster by this script's own,
longer timings, a check on that choice. It is timed again
with the backward's "ordered" reduction of dA / dB (no atomics, deterministic:
``choose_reduction``) as ``fused_ordered_ms``; ``best_reduction`` says which was faster.

Host overhead vs GPU time, for the fused op and its comparison (training: ``base`` and
``fused``; decode: ``merged`` and ``fused_unmerged``): ``*_ms`` is ``do_bench`` (CUDA events, so
GPU idle time waiting for the host counts), ``*_host_ms`` the time a call takes to return
(``measure_host_time``: launches queued, not waited for) and ``*_graph_ms`` the GPU time alone
(``measure_graph_time``: the call replayed from a CUDA graph; a failed capture leaves None and
``*_graph_error``); ``fused_jit_host_ms`` / ``fused_unmerged_jit_host_ms`` are the fused op's host
time with every launch through ``JITFunction.run`` (compiled launches off). Host time at or above graph time means launch-bound: the one-line summary
per shape says which. ``kernel_breakdown`` (training 8192×4096×4096 and decode M=1): device
time per kernel of one fused call, from torch.profiler (training: also
``kernel_breakdown_ordered``, the same call with the ordered reduction). Each row has ``elapsed_s``, the wall
time it took (compiles and autotuning included). ``autotune_choices``: per kernel, the config
autotuning chose for each key (e.g. whether a split-K small-M config won at decode).

    python bench/kernel_bench.py --json bench/results/kernel_bench.json     # GPU, ~2-3 min
    python bench/kernel_bench.py --dry-run                                   # CPU smoke test

The JSON is rewritten after every shape, so a run cut short keeps what it measured;
``--deadline-s`` stops starting shapes after that many seconds (they are listed under
``skipped_shapes`` and the exit status is 3). ``--dry-run`` runs tiny shapes through the Triton
interpreter with a wall-clock timer: it only checks that every code path runs (no CUDA graphs
or profiles there: ``not_measured`` says so).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write results here (default: print only)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU through TRITON_INTERPRET=1")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT even if importable")
    ap.add_argument(
        "--deadline-s", type=float, default=None, help="start no shape after this many seconds (exit status 3)"
    )
    return ap.parse_args(argv)


def import_lorafast():
    """``lorafast.kernels``, ``lorafast.reference`` and ``lorafast.benchmark`` (the one timing
    harness); when the package is not installed (the GPU box installs nothing) load them from the
    source tree without running ``lorafast/__init__.py`` (which imports transformers)."""
    try:
        from lorafast import benchmark, kernels, reference

        return kernels, reference, benchmark
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "lorafast" or m.startswith("lorafast.")]:
        del sys.modules[name]
    pkg = types.ModuleType("lorafast")
    pkg.__path__ = [str(ROOT / "lorafast")]
    sys.modules["lorafast"] = pkg

    def load(name, path, is_pkg=False):
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[str(path.parent)] if is_pkg else None
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    reference = load("lorafast.reference", ROOT / "lorafast" / "reference.py")
    kernels = load("lorafast.kernels", ROOT / "kernels" / "__init__.py", is_pkg=True)
    benchmark = load("lorafast.benchmark", ROOT / "lorafast" / "benchmark.py")
    pkg.reference, pkg.kernels, pkg.benchmark = reference, kernels, benchmark
    return kernels, reference, benchmark


def make_peft_layer(peft_linear, base_layer, r, p):
    """PEFT's LoRA Linear around ``base_layer`` (peft >= 0.18 wants a LoraConfig, older ones kwargs)."""
    try:
        from peft import LoraConfig

        config = LoraConfig(r=r, lora_alpha=32, lora_dropout=p)
        return peft_linear(base_layer, "default", config=config, r=r, lora_alpha=32, lora_dropout=p)
    except TypeError:
        return peft_linear(base_layer, "default", r=r, lora_alpha=32, lora_dropout=p)


PROFILED_CALLS = 5  # fused calls per kernel_breakdown profile
KERNEL_NAME_CHARS = 120  # cuBLAS kernel names run to ~150 characters


def describe_error(exc: BaseException) -> str:
    """``Type: first line``, and the exception it happened while handling (a failed CUDA-graph
    capture raises at capture end, hiding the call that broke it)."""

    def first_line(error: BaseException) -> str:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"

    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return first_line(exc) if cause is None else f"{first_line(exc)} (while handling {first_line(cause)})"


def add_host_and_graph_times(ctx, row: dict, name: str, fn) -> None:
    """``{name}_host_ms`` and ``{name}_graph_ms`` of the warm ``fn`` (module docstring); the graph
    time is None on the CPU, and None with ``{name}_graph_error`` when the capture fails."""
    row[f"{name}_host_ms"] = ctx.host_ms(fn)
    row[f"{name}_graph_ms"] = None
    if ctx.dev != "cuda":
        return
    try:
        row[f"{name}_graph_ms"] = ctx.graph_ms(fn)
    except Exception as exc:  # noqa: BLE001 - record why, keep benchmarking
        row[f"{name}_graph_error"] = describe_error(exc)


def add_jit_host_time(ctx, row: dict, name: str, fn) -> None:
    """``{name}_jit_host_ms``: ``{name}_host_ms`` with every launch through ``JITFunction.run``
    (``set_compiled_launches(False)``), to show what the compiled launches save per call."""
    previous = ctx.kernels.set_compiled_launches(False)
    try:
        row[f"{name}_jit_host_ms"] = ctx.host_ms(fn)
    finally:
        ctx.kernels.set_compiled_launches(previous)


def add_kernel_breakdown(ctx, row: dict, fn, key: str = "kernel_breakdown") -> None:
    """``row[key]``: the kernel breakdown of the warm ``fn`` (None on the CPU; None with
    ``{key}_error`` on failure)."""
    row[key] = None
    if ctx.dev != "cuda":
        return
    try:
        row[key] = kernel_breakdown(fn)
    except Exception as exc:  # noqa: BLE001 - record why, keep benchmarking
        row[f"{key}_error"] = describe_error(exc)


def kernel_breakdown(fn, calls: int = PROFILED_CALLS) -> list[dict]:
    """Device time per kernel of one call of the warm ``fn``: torch.profiler, CUDA activity, over ``calls`` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return summarise_device_events(prof.key_averages(), calls)


def summarise_device_events(events, calls: int) -> list[dict]:
    """``{name, calls, device_us_per_call}`` for each device event (kernel, memset, copy) of a
    profile over ``calls`` calls, largest first: ``calls`` is launches per call and
    ``device_us_per_call`` the device µs per call summed over them. Host events (CUDA runtime
    calls) are left out. Reads ``device_time_total``, else ``cuda_time_total`` (older torch)."""
    from torch.autograd import DeviceType

    rows = []
    for event in events:
        if getattr(event, "device_type", None) == DeviceType.CPU:
            continue
        total_us = getattr(event, "device_time_total", None)
        if total_us is None:
            total_us = event.cuda_time_total
        if total_us > 0:
            name = event.key[:KERNEL_NAME_CHARS]
            rows.append({"name": name, "calls": event.count / calls, "device_us_per_call": total_us / calls})
    return sorted(rows, key=lambda row: row["device_us_per_call"], reverse=True)


def ratio(row: dict, numerator: str, denominator: str) -> float | None:
    """``row[numerator] / row[denominator]``, None when either is missing."""
    top, bottom = row.get(numerator), row.get(denominator)
    return top / bottom if top and bottom else None


def launch_summary(row: dict, kind: str, fused: str, reference: str) -> str:
    """One line: is the fused op host-bound (host time per call >= its GPU time from the graph)?"""

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    host, graph = row.get(f"{fused}_host_ms"), row.get(f"{fused}_graph_ms")
    if graph is None:
        verdict = "host-bound: unknown (no graph time)"
    else:
        verdict = f"{'HOST-BOUND' if host >= graph else 'GPU-bound'} (host / graph {host / graph:.2f})"
    ref_ratio = ratio(row, f"{fused}_graph_ms", f"{reference}_graph_ms")
    return (
        f"{kind} M={row['M']} K={row['K']} N={row['N']}: {fused} do_bench {fmt(row.get(f'{fused}_ms'))} ms, "
        f"host {fmt(host)} ms/call, graph {fmt(graph)} ms -> {verdict}; {reference} do_bench "
        f"{fmt(row.get(f'{reference}_ms'))}, host {fmt(row.get(f'{reference}_host_ms'))}, graph "
        f"{fmt(row.get(f'{reference}_graph_ms'))}; {fused}/{reference} graph {fmt(ref_ratio)}"
    )


def bench_train_shape(ctx, M, K, N) -> dict:
    """Forward + backward timings of one training shape (ms) and the ratios."""
    import torch

    from lorafast import ops

    kernels, reference, bench = ctx.kernels, ctx.reference, ctx.bench
    scaling, p, r, seed = ctx.scaling, ctx.p, ctx.r, ctx.seed
    x, w, a, b, dy = ctx.make(M, K, N)
    xg = x.detach().clone().requires_grad_(True)
    row = {"M": M, "K": K, "N": N}

    def base():
        torch.mm(x, w.t())
        torch.mm(dy, w)

    def naive():
        reference.naive_lora_linear(xg, w, None, a, b, scaling, p, True).backward(dy)

    def fused(path=None, reduction=None):
        y, u = kernels.lora_forward(x, w, None, a.detach(), b.detach(), scaling, p, seed, path=path)
        kernels.lora_backward(
            dy, x, w, a.detach(), b.detach(), u, scaling, p, seed, main_gemm=path, reduction=reduction
        )

    def fused_ordered():
        fused(reduction="ordered")

    def layer():  # lorafast as PEFT and naive are timed: the op with its autograd, gradients in .grad
        ops.lora_linear(xg, w, None, a, b, scaling, p).backward(dy)

    row["base_ms"] = bench(base)
    row["naive_ms"] = bench(naive, grad_to_none=[xg, a, b])
    row["fused_ms"] = bench(fused)
    row["layer_ms"] = bench(layer, grad_to_none=[xg, a, b])
    row["fused_triton_ms"] = bench(lambda: fused("triton"))
    row["fused_cublas_ms"] = bench(lambda: fused("cublas"))
    row["fused_ordered_ms"] = bench(fused_ordered)
    if ctx.peft_linear is not None:
        base_layer = torch.nn.Linear(K, N, bias=False, device=ctx.dev, dtype=ctx.dtype)
        with torch.no_grad():
            base_layer.weight.copy_(w)
        base_layer.weight.requires_grad_(False)  # frozen, as get_peft_model leaves it
        layer = make_peft_layer(ctx.peft_linear, base_layer, r, p)
        layer.lora_A["default"].float()  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
        layer.lora_B["default"].float()
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(b.detach())
        layer.train()
        params = [prm for prm in layer.parameters() if prm.requires_grad]
        row["peft_ms"] = bench(lambda: layer(xg).backward(dy), grad_to_none=[xg, *params])
        row["speedup_vs_peft"] = row["peft_ms"] / row["layer_ms"]
        row["peft_over_base"] = row["peft_ms"] / row["base_ms"]
    row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
    row["naive_over_base"] = row["naive_ms"] / row["base_ms"]
    row["layer_over_base"] = row["layer_ms"] / row["base_ms"]
    row["speedup_vs_naive"] = row["naive_ms"] / row["layer_ms"]
    row["main_gemm_chosen"] = {  # what the default launches ran: measured per shape when autotuning
        "forward": kernels.choose_main_gemm(M, N, K, ctx.dev, ctx.dtype),
        "backward": kernels.choose_main_gemm(M, K, N, ctx.dev, ctx.dtype, direction="backward"),
    }
    row["best_main_gemm"] = "triton" if row["fused_triton_ms"] <= row["fused_cublas_ms"] else "cublas"
    row["reduction_chosen"] = kernels.choose_reduction()
    if row["reduction_chosen"] == "atomic":
        row["best_reduction"] = "ordered" if row["fused_ordered_ms"] < row["fused_ms"] else "atomic"
    add_host_and_graph_times(ctx, row, "base", base)
    add_host_and_graph_times(ctx, row, "fused", fused)
    add_jit_host_time(ctx, row, "fused", fused)
    row["fused_over_base_graph"] = ratio(row, "fused_graph_ms", "base_graph_ms")
    if (M, K, N) == ctx.profiled_train_shape:
        add_kernel_breakdown(ctx, row, fused)
        add_kernel_breakdown(ctx, row, fused_ordered, "kernel_breakdown_ordered")
    return row


def bench_decode_shape(ctx, M, K, N) -> dict:
    """No-grad decode: fused unmerged forward vs the merged base layer (ms)."""
    import torch

    kernels, reference, bench, scaling = ctx.kernels, ctx.reference, ctx.bench, ctx.scaling
    with torch.no_grad():
        x, w, a, b, _ = ctx.make(M, K, N, lora_grad=False)
        merged = reference.merged_weight(w, a, b, scaling)
        row = {"M": M, "K": K, "N": N}

        def merged_linear():
            return torch.nn.functional.linear(x, merged)

        def fused(path=None):
            return kernels.lora_forward(x, w, None, a, b, scaling, 0.0, ctx.seed, path=path)

        def fused_cublas():
            return fused("cublas")

        def fused_small_m():
            return fused("small_m")

        row["merged_ms"] = bench(merged_linear)
        row["fused_unmerged_ms"] = bench(fused)
        row["fused_small_m_unmerged_ms"] = bench(fused_small_m)
        row["fused_cublas_unmerged_ms"] = bench(fused_cublas)
        row["naive_unmerged_ms"] = bench(lambda: reference.naive_lora_linear(x, w, None, a, b, scaling, 0.0, False))
        add_host_and_graph_times(ctx, row, "merged", merged_linear)
        add_host_and_graph_times(ctx, row, "fused_unmerged", fused)
        add_jit_host_time(ctx, row, "fused_unmerged", fused)
        add_host_and_graph_times(ctx, row, "fused_small_m_unmerged", fused_small_m)
        add_host_and_graph_times(ctx, row, "fused_cublas_unmerged", fused_cublas)
        if (M, K, N) == ctx.profiled_decode_shape:
            add_kernel_breakdown(ctx, row, fused)
    row["fused_over_merged"] = row["fused_unmerged_ms"] / row["merged_ms"]
    row["fused_over_merged_graph"] = ratio(row, "fused_unmerged_graph_ms", "merged_graph_ms")
    row["fused_small_m_over_merged_graph"] = ratio(row, "fused_small_m_unmerged_graph_ms", "merged_graph_ms")
    row["fused_cublas_over_merged_graph"] = ratio(row, "fused_cublas_unmerged_graph_ms", "merged_graph_ms")
    row["naive_over_merged"] = row["naive_unmerged_ms"] / row["merged_ms"]
    row["path"] = kernels.choose_main_gemm(M, N, K, ctx.dev, ctx.dtype)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    kernels, reference, benchmark = import_lorafast()
    dev = "cpu" if args.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run for a CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    r, p, seed = args.rank, args.dropout, 1234
    scaling = 32 / r  # lora_alpha = 32

    if args.dry_run:
        train_shapes = [(70, 48, 48), (130, 40, 72)]  # (M, K, N)
        decode_shapes = [(1, 48, 48), (4, 48, 48)]
        budget = benchmark.TimingBudget(cpu_seconds=0.01, cpu_warmup_calls=1, cpu_min_calls=3, cpu_max_calls=3)
        host_calls = dict(calls=1, samples=3, warmup_calls=0)  # the interpreter: ~0.1-1 s a call
    else:
        sizes = [4096, 5120, 8192]
        # M = 8192 first: K = N = 4096 at M = 8192 is the target shape, kept if --deadline-s cuts the rest
        train_shapes = [(m, k, k) for k in sizes for m in (256 * 32, 256 * 8)]
        decode_shapes = [(m, 4096, 4096) for m in (1, 4, 16)]
        budget = benchmark.TimingBudget(cuda_warmup_ms=10, cuda_rep_ms=60)
        host_calls = dict(calls=20, samples=5, warmup_calls=2)  # 20 calls: well inside the launch queue
    graph_budget = benchmark.TimingBudget(cuda_warmup_ms=5, cuda_rep_ms=25)  # one launch per replay: short
    device = torch.device(dev)

    def bench(fn, grad_to_none=()):
        """Median ms of ``fn()`` by the project's one harness (``do_bench`` on CUDA)."""
        return benchmark.measure_time(fn, device, budget, grad_to_none).median_ms

    peft_linear = None
    if not args.no_peft:
        try:
            from peft.tuners.lora.layer import Linear as peft_linear
        except Exception as exc:  # noqa: BLE001 - any import problem means "no PEFT"
            print(f"PEFT not importable ({exc!r}); skipping it", file=sys.stderr)

    results = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "peft": None,
        },
        "config": {
            "dtype": str(dtype),
            "r": r,
            "lora_alpha": 32,
            "dropout": p,
            "lora_param_dtype": "float32",
            "compiled_launches": kernels.compiled_launches_enabled(),  # off: gpu_check's launch check failed
        },
        "train": [],
        "decode": [],
        "skipped_shapes": [],
        "dry_run": args.dry_run,
    }
    if dev != "cuda":
        results["not_measured"] = {
            "*_graph_ms": "CUDA graphs need a CUDA device",
            "kernel_breakdown": "torch.profiler's CUDA activity needs a CUDA device",
        }
    if peft_linear is not None:
        import peft

        results["versions"]["peft"] = peft.__version__

    def make(M, K, N, lora_grad=True):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
        w = (torch.randn(N, K, device=dev, generator=g) / math.sqrt(K)).to(dtype)
        a = torch.randn(r, K, device=dev, generator=g) / math.sqrt(K)
        b = torch.randn(N, r, device=dev, generator=g) / math.sqrt(r)
        dy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
        a.requires_grad_(lora_grad)
        b.requires_grad_(lora_grad)
        return x, w, a, b, dy

    ctx = types.SimpleNamespace(
        kernels=kernels,
        reference=reference,
        make=make,
        bench=bench,
        dev=dev,
        scaling=scaling,
        p=p,
        r=r,
        seed=seed,
        dtype=dtype,
        peft_linear=peft_linear,
        host_ms=lambda fn: benchmark.measure_host_time(fn, device, **host_calls).median_ms,
        graph_ms=lambda fn: benchmark.measure_graph_time(fn, device, graph_budget).median_ms,
        profiled_train_shape=train_shapes[1] if args.dry_run else (8192, 4096, 4096),
        profiled_decode_shape=decode_shapes[0],
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Rewrite the JSON (atomically) with everything measured so far."""
        results["autotune_choices"] = kernels.autotune_choices()
        if args.json is not None:
            with benchmark.atomic_output(args.json) as handle:
                handle.write(json.dumps(results, indent=2))

    started = time.perf_counter()
    summaries = []
    # decode first: its shapes are quick, and a run cut short should still have them
    work = [("decode", shape, bench_decode_shape, "fused_unmerged", "merged") for shape in decode_shapes]
    work += [("train", shape, bench_train_shape, "fused", "base") for shape in train_shapes]
    for kind, (M, K, N), bench_shape, fused_name, reference_name in work:
        if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
            results["skipped_shapes"].append({"kind": kind, "M": M, "K": K, "N": N, "why": "--deadline-s passed"})
            continue
        shape_started = time.perf_counter()
        row = bench_shape(ctx, M, K, N)
        row["elapsed_s"] = time.perf_counter() - shape_started
        results[kind].append(row)
        summaries.append(launch_summary(row, kind, fused_name, reference_name))
        print(json.dumps(row), flush=True)
        print(summaries[-1], flush=True)
        save()

    save()
    print(f"host vs GPU time per shape (ms; {time.perf_counter() - started:.0f} s in all):")
    print("\n".join(summaries))
    if args.json is not None:
        print(f"wrote {args.json}")
    if results["skipped_shapes"]:
        skipped = len(results["skipped_shapes"])
        print(f"{skipped} shapes skipped: --deadline-s {args.deadline_s} passed", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
