#!/usr/bin/env python
"""Issue 3's performance targets, judged from a GPU check's results: one line per target with the
measured value, the limit and whether it is met.

Reads ``kernel_bench.json`` (bench/kernel_bench.py) and ``bench.json`` (``lorafast bench --quick``)
from the folder bench/gpu_check.sh wrote, or the files named. The targets (bf16, r = 16, dropout
0.1, fp32 LoRA weights, the shapes kernel_bench times: K = N ∈ {4096, 5120, 8192}, M ∈ {2048,
8192}, i.e. LoRAFusion's in = out with 8 or 32 sequences of 256 tokens):

* ``fwd+bwd / base``: the fused forward + backward launchers over the frozen base alone (cuBLAS
  ``x Wᵀ`` then ``dY W``), at most 1.15 on every shape (``fused_over_base``, CUDA-event time,
  GPU idle time waiting for the host included; the CUDA-graph ratio, GPU time alone, beside it);
* ``speed-up over PEFT``: PEFT's LoRA layer over lorafast's (each with its autograd), at least 1.4
  on every shape;
* ``decode / merged``: the unmerged fused forward over the merged layer at M = 1, 4, 16, at most
  1.1; judged on GPU time (CUDA-graph replays) where measured, since an eager call's host time is
  the same Python for any GPU (the eager ratio is shown beside it);
* ``saved activations``: what lorafast's layer keeps for backward in ``lorafast bench``'s
  forward + backward rows, at most ``bytes(x) + M·r·4``.

and, for information (no target in the issue), the 8B-width training step, PEFT's time over
lorafast's. A target with no measurement is "not measured", never met.

    python bench/targets.py DIR                       # DIR/kernel_bench.json, DIR/bench.json
    python bench/targets.py --kernel-bench K.json --bench B.json [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_OVER_BASE_MAX = 1.15
SPEEDUP_OVER_PEFT_MIN = 1.4
DECODE_OVER_MERGED_MAX = 1.1


def _load(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"cannot read {path}: {error}", file=sys.stderr)
        return None


def _verdict(values: list[float], limit: float, at_most: bool) -> str:
    if not values:
        return "not measured"
    worst = max(values) if at_most else min(values)
    return "met" if (worst <= limit if at_most else worst >= limit) else "NOT met"


def _shape(row: dict) -> str:
    return f"M={row['M']} K={row['K']} N={row['N']}"


def _ratios(rows: list[dict], key: str) -> list[tuple[str, float]]:
    return [(_shape(row), row[key]) for row in rows if isinstance(row.get(key), (int, float))]


def _listed(pairs: list[tuple[str, float]]) -> str:
    return ", ".join(f"{shape}: {value:.2f}x" for shape, value in pairs) or "-"


def train_targets(kernel_bench: dict | None) -> list[dict]:
    """The fwd+bwd / base and speed-up-over-PEFT targets from kernel_bench's training rows."""
    rows = (kernel_bench or {}).get("train", [])
    over_base = _ratios(rows, "fused_over_base")
    over_base_graph = _ratios(rows, "fused_over_base_graph")
    over_peft = _ratios(rows, "speedup_vs_peft")
    return [
        {
            "target": "fwd+bwd / frozen base",
            "limit": f"<= {TRAIN_OVER_BASE_MAX}",
            "verdict": _verdict([v for _, v in over_base], TRAIN_OVER_BASE_MAX, at_most=True),
            "measured": _listed(over_base),
            "also": f"GPU time alone (CUDA graphs): {_listed(over_base_graph)}",
        },
        {
            "target": "speed-up over PEFT's layer",
            "limit": f">= {SPEEDUP_OVER_PEFT_MIN}",
            "verdict": _verdict([v for _, v in over_peft], SPEEDUP_OVER_PEFT_MIN, at_most=False),
            "measured": _listed(over_peft),
            "also": "",
        },
    ]


def decode_target(kernel_bench: dict | None) -> dict:
    """Decode, unmerged fused over merged: judged on the CUDA-graph ratio where every row has one."""
    rows = (kernel_bench or {}).get("decode", [])
    graph = _ratios(rows, "fused_over_merged_graph")
    eager = _ratios(rows, "fused_over_merged")
    judged, basis = (graph, "GPU time (CUDA graphs)") if rows and len(graph) == len(rows) else (eager, "eager calls")
    return {
        "target": "decode (M = 1...16) / merged",
        "limit": f"<= {DECODE_OVER_MERGED_MAX}",
        "verdict": _verdict([v for _, v in judged], DECODE_OVER_MERGED_MAX, at_most=True),
        "measured": f"{basis}: {_listed(judged)}",
        "also": f"eager calls: {_listed(eager)}" if judged is graph else "",
    }


def saved_activation_target(bench: dict | None) -> dict:
    """lorafast's saved bytes in ``lorafast bench``'s forward + backward rows vs bytes(x) + M·r·4."""
    import torch  # dtype sizes only

    excess: list[tuple[int, str]] = []  # (saved - allowed bytes, which row)
    for row in (bench or {}).get("rows", []):
        if row.get("mode") != "forward+backward" or not str(row.get("provider", "")).startswith("lorafast"):
            continue
        saved = row.get("saved_activation_bytes")
        if not isinstance(saved, int):
            continue
        element = torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
        allowed = row["tokens"] * row["in_features"] * element + row["tokens"] * row["rank"] * 4
        excess.append((saved - allowed, f"{row['provider']} {row['case']}: {saved} B, limit {allowed} B"))
    worst = max(excess, default=None)
    return {
        "target": "saved activations per layer",
        "limit": "<= bytes(x) + M*r*4",
        "verdict": _verdict([bytes_over for bytes_over, _ in excess], 0, at_most=True),
        "measured": f"{len(excess)} rows, the largest excess {worst[0]:+d} B ({worst[1]})" if worst else "-",
        "also": "",
    }


def train_step_info(bench: dict | None) -> dict:
    """PEFT's training-step time over lorafast[triton]'s (information: not one of the issue's targets)."""
    times = {
        row.get("provider"): row.get("median_ms")
        for row in (bench or {}).get("rows", [])
        if row.get("suite") == "train-step" and row.get("status") == "ok"
    }
    peft, fused = times.get("peft"), times.get("lorafast[triton]")
    measured = f"{peft / fused:.2f}x (PEFT {peft:.2f} ms, lorafast {fused:.2f} ms)" if peft and fused else "-"
    return {"target": "training step, speed-up over PEFT", "limit": "(none)", "verdict": "info", "measured": measured, "also": ""}


def judge(kernel_bench: dict | None, bench: dict | None) -> dict:
    """Every target's verdict, with the device the files name."""
    device = (kernel_bench or {}).get("device") or next(
        (row.get("device") for row in (bench or {}).get("rows", []) if row.get("device")), None
    )
    targets = [*train_targets(kernel_bench), decode_target(kernel_bench), saved_activation_target(bench)]
    return {"device": device, "targets": targets, "info": [train_step_info(bench)]}


def format_report(report: dict) -> str:
    lines = [f"issue 3 targets on {report['device'] or 'an unnamed device'}:"]
    for item in [*report["targets"], *report["info"]]:
        lines.append(f"  [{item['verdict']}] {item['target']} ({item['limit']}): {item['measured']}")
        if item["also"]:
            lines.append(f"      {item['also']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, help="where gpu_check.sh wrote kernel_bench.json and bench.json")
    ap.add_argument("--kernel-bench", type=Path, help="bench/kernel_bench.py's JSON (default: FOLDER/kernel_bench.json)")
    ap.add_argument("--bench", type=Path, help="lorafast bench's JSON (default: FOLDER/bench.json)")
    ap.add_argument("--json", type=Path, help="also write the verdicts here")
    args = ap.parse_args(argv)
    if args.folder is None and args.kernel_bench is None and args.bench is None:
        ap.error("give a results folder or --kernel-bench / --bench")
    kernel_bench_path = args.kernel_bench or (args.folder / "kernel_bench.json" if args.folder else None)
    bench_path = args.bench or (args.folder / "bench.json" if args.folder else None)
    report = judge(_load(kernel_bench_path), _load(bench_path))
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
