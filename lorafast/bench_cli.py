"""``lorafast bench``: lorafast against the base layer, naive PyTorch, torch.compile and PEFT, side by side."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from lorafast.benchmark import (
    PLOT_SUFFIXES,
    check_output_path,
    format_table,
    write_csv,
    write_json,
    write_speedup_plot,
)
from lorafast.benchmark_suite import full_plan, missing_package, quick_plan, run_plan

#: Exit status of a run interrupted by SIGINT (the shell's 128 + 2), after writing the rows it has.
INTERRUPTED = 130
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the LoRA linear: lorafast vs PEFT, naive PyTorch, torch.compile and the bare base layer",
        description=(
            "Time every provider on the same weights in every mode (forward, backward, forward+backward, "
            "merged and unmerged inference, decode) and a whole training step, then print a table. "
            "Without --quick the full matrix runs (Llama-3-8B projections and LoRAFusion's shapes, "
            "r in 8..128, dropout 0 and 0.1): meant for a GPU."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a reduced set (on a CPU: small shapes, under 2 minutes)")
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    parser.add_argument("--csv", metavar="FILE", help="write every row as CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="plot the speed-up over PEFT per shape (png, svg or pdf)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="activation and base-weight dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads PyTorch uses (default: its own); 1 gives steady numbers on a busy machine",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available to this PyTorch build")
    return torch.device(name)


def warn_if_cpu_busy() -> None:
    """CPU timings of multi-threaded ops are meaningless while other processes hold the cores: say so."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(
            f"lorafast bench: warning: the CPU is busy (load average {load:.1f} on {cores} cores); timings will be noisy"
            + (" (--threads 1 steadies them)" if torch.get_num_threads() > 1 else ""),
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    outputs = {
        "json": args.json and check_output_path(args.json, (".json",)),
        "csv": args.csv and check_output_path(args.csv, (".csv",)),
        "plot": args.plot and check_output_path(args.plot, PLOT_SUFFIXES),
    }
    if outputs["plot"] and (reason := missing_package("matplotlib")):
        raise ValueError(f"--plot needs matplotlib: {reason}")
    plan = quick_plan(device) if args.quick else full_plan()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        warn_if_cpu_busy()
        if not args.quick:
            print(
                "lorafast bench: the full matrix at Llama-8B sizes takes hours on a CPU; use --quick", file=sys.stderr
            )
    rows, copy_gbps, interrupted = run_plan(plan, device, dtype, show_progress=not args.no_progress)
    if interrupted:
        print(f"lorafast bench: interrupted; reporting the {len(rows)} rows measured before", file=sys.stderr)
    if interrupted and not rows:
        return INTERRUPTED
    first = rows[0]
    print(
        f"device: {first.device} | dtype: {first.dtype} | copy bandwidth: {copy_gbps:.1f} GB/s | "
        f"torch {first.torch_version}, triton {first.triton_version}, peft {first.peft_version}, "
        f"transformers {first.transformers_version}, lorafast {first.lorafast_version} @ {first.git_commit}"
    )
    print(format_table(rows))
    if outputs["json"]:
        write_json(rows, outputs["json"], copy_gbps, complete=not interrupted)
    if outputs["csv"]:
        write_csv(rows, outputs["csv"])
    if outputs["plot"]:
        write_speedup_plot(rows, outputs["plot"])
    errors = [row for row in rows if row.status.startswith("error")]
    for row in errors:
        print(f"lorafast bench: {row.provider} failed on {row.case} ({row.mode}): {row.status}", file=sys.stderr)
    return INTERRUPTED if interrupted else 1 if errors else 0
