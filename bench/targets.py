#!/usr/bin/env python
"""Issue 3's performance targets, judged from a GPU check's results: per target the measured
value on every shape, the limit, and met / NOT met / not measured.

Reads ``kernel_bench.json`` (bench/kernel_bench.py) and ``bench.json`` (``lorafast bench --quick``)
from the folder bench/gpu_check.sh wrote, or the files named. The targets (bf16, r = 16, dropout
0.1, fp32 LoRA weights, the shapes kernel_bench times: K = N ∈ {4096, 5120, 8192}, M ∈ {2048,
8192}, i.e. LoRAFusion's in = out with 8 or 32 sequences of 256 tokens):

* ``fwd+bwd / base``: the fused forward + backward launchers over the frozen base alone (cuBLAS
  ``x Wᵀ`` then ``dY W``), at most 1.15 on every shape;
* ``speed-up over PEFT``: PEFT's LoRA layer over lorafast's (each with its autograd), at least 1.4
  on every shape;
* ``decode / merged``: the unmerged fused forward over the merged layer at M = 1, 4, 16, at most
  1.1;
* ``saved activations``: what lorafast's layer keeps for backward in ``lorafast bench``'s
  forward + backward rows, at most ``bytes(x) + M·r·4``.

The two timed ratios are judged twice: on eager calls (``do_bench``'s CUDA events: where the GPU
work is shorter than the launchers' Python, the GPU waits and that counts) and on GPU time alone
(the call replayed from a CUDA graph, as a captured training step or decode loop runs it); a
basis some shape lacks is "not measured", never met. For information (no target in the issue):
the 8B-width training step, PEFT's time over lorafast's.

    python bench/targets.py DIR                       # DIR/kernel_bench.json, DIR/bench.json
    python bench/targets.py --kernel-bench K.json --bench B.json [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# lorafast from the source tree where it is not installed (run as a script, sys.path[0] is bench/)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

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


def _judged(rows: list[dict], key: str, limit: float, at_most: bool) -> tuple[str, str]:
    """(verdict, listing) of ``row[key]`` over every row: "not measured" unless every row has it."""
    pairs = [(_shape(row), row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    listing = ", ".join(f"{shape}: {value:.2f}x" for shape, value in pairs) or "-"
    if not rows or len(pairs) < len(rows):
        return "not measured", listing
    return _verdict([value for _, value in pairs], limit, at_most), listing


EAGER, GRAPH = "eager calls", "GPU time (CUDA graphs)"


def _target(name: str, limit: float, at_most: bool, rows: list[dict], keys: dict[str, str]) -> dict:
    """One target judged on each basis in ``keys`` (basis -> the rows' ratio field)."""
    judged = {basis: _judged(rows, key, limit, at_most) for basis, key in keys.items()}
    return {
        "target": name,
        "limit": f"{'<=' if at_most else '>='} {limit}",
        "verdicts": {basis: verdict for basis, (verdict, _) in judged.items()},
        "measured": {basis: listing for basis, (_, listing) in judged.items()},
    }


def train_targets(kernel_bench: dict | None) -> list[dict]:
    """The fwd+bwd / base and speed-up-over-PEFT targets from kernel_bench's training rows: the
    first on eager calls and on GPU time alone; PEFT's layer is timed eagerly only."""
    rows = (kernel_bench or {}).get("train", [])
    keys = {EAGER: "fused_over_base", GRAPH: "fused_over_base_graph"}
    return [
        _target("fwd+bwd / frozen base", TRAIN_OVER_BASE_MAX, True, rows, keys),
        _target("speed-up over PEFT's layer", SPEEDUP_OVER_PEFT_MIN, False, rows, {EAGER: "speedup_vs_peft"}),
    ]


def decode_target(kernel_bench: dict | None) -> dict:
    """Decode, unmerged fused over merged, eagerly and on GPU time alone."""
    rows = (kernel_bench or {}).get("decode", [])
    keys = {EAGER: "fused_over_merged", GRAPH: "fused_over_merged_graph"}
    return _target("decode (M = 1...16) / merged", DECODE_OVER_MERGED_MAX, True, rows, keys)


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
        element = getattr(torch, row["dtype"]).itemsize
        allowed = row["tokens"] * row["in_features"] * element + row["tokens"] * row["rank"] * 4
        excess.append((saved - allowed, f"{row['provider']} {row['case']}: {saved} B, limit {allowed} B"))
    worst = max(excess, default=None)
    return {
        "target": "saved activations per layer",
        "limit": "<= bytes(x) + M*r*4",
        "verdicts": {"bytes": _verdict([bytes_over for bytes_over, _ in excess], 0, at_most=True)},
        "measured": {"bytes": f"{len(excess)} rows, the largest excess {worst[0]:+d} B ({worst[1]})" if worst else "-"},
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
    return {"target": "training step, speed-up over PEFT", "limit": "(none)", "verdicts": {EAGER: "info"}, "measured": {EAGER: measured}}


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
        lines.append(f"  {item['target']} ({item['limit']}):")
        for basis, verdict in item["verdicts"].items():
            lines.append(f"    [{verdict}] {basis}: {item['measured'][basis]}")
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
        from lorafast.benchmark import atomic_output, check_output_path

        with atomic_output(check_output_path(args.json, (".json",))) as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
