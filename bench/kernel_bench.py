#!/usr/bin/env python
"""Quick kernel benchmark: fused LoRA launchers vs the frozen base GEMMs, naive PyTorch LoRA
and PEFT's LoRA Linear (bf16, r=16, dropout 0.1, fp32 LoRA params as PEFT keeps them).

Training (forward + backward; the base is ``x Wᵀ`` then ``dY W``):
    K = N ∈ {4096, 5120, 8192}, M ∈ {2048, 8192}
Decode (no grad, dropout off): M ∈ {1, 4, 16}, K = N = 4096, fused unmerged vs merged base.

For each training shape the fused op is timed with the main GEMM forced to "triton" and to
"cublas", and with the default choice (``choose_main_gemm``); the faster path is reported as
``best_main_gemm`` (what ``lorafast.kernels.MAIN_GEMM_TABLE`` should hold).

    python bench/kernel_bench.py --json bench/results/kernel_bench.json     # GPU, ~2-3 min
    python bench/kernel_bench.py --dry-run                                   # CPU smoke test

``--dry-run`` runs tiny shapes through the Triton interpreter with a wall-clock timer: it only
checks that every code path runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
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


def bench_train_shape(ctx, M, K, N) -> dict:
    """Forward + backward timings of one training shape (ms) and the ratios."""
    import torch

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

    def fused(path=None):
        y, u = kernels.lora_forward(x, w, None, a.detach(), b.detach(), scaling, p, seed, path=path)
        kernels.lora_backward(dy, x, w, a.detach(), b.detach(), u, scaling, p, seed, main_gemm=path)

    row["base_ms"] = bench(base)
    row["naive_ms"] = bench(naive, grad_to_none=[xg, a, b])
    row["fused_ms"] = bench(fused)
    row["fused_triton_ms"] = bench(lambda: fused("triton"))
    row["fused_cublas_ms"] = bench(lambda: fused("cublas"))
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
        row["speedup_vs_peft"] = row["peft_ms"] / row["fused_ms"]
        row["peft_over_base"] = row["peft_ms"] / row["base_ms"]
    row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
    row["naive_over_base"] = row["naive_ms"] / row["base_ms"]
    row["speedup_vs_naive"] = row["naive_ms"] / row["fused_ms"]
    row["main_gemm_chosen"] = {
        "forward": "small_m" if M <= kernels.SMALL_M_MAX else kernels.choose_main_gemm(M, N, K, ctx.dev),
        "backward": kernels.choose_main_gemm(M, K, N, ctx.dev),
    }
    row["best_main_gemm"] = "triton" if row["fused_triton_ms"] <= row["fused_cublas_ms"] else "cublas"
    return row


def bench_decode_shape(ctx, M, K, N) -> dict:
    """No-grad decode: fused unmerged forward vs the merged base layer (ms)."""
    import torch

    kernels, reference, bench, scaling = ctx.kernels, ctx.reference, ctx.bench, ctx.scaling
    with torch.no_grad():
        x, w, a, b, _ = ctx.make(M, K, N, lora_grad=False)
        merged = reference.merged_weight(w, a, b, scaling)
        row = {"M": M, "K": K, "N": N}
        row["merged_ms"] = bench(lambda: torch.nn.functional.linear(x, merged))
        row["fused_unmerged_ms"] = bench(lambda: kernels.lora_forward(x, w, None, a, b, scaling, 0.0, ctx.seed))
        row["naive_unmerged_ms"] = bench(lambda: reference.naive_lora_linear(x, w, None, a, b, scaling, 0.0, False))
    row["fused_over_merged"] = row["fused_unmerged_ms"] / row["merged_ms"]
    row["naive_over_merged"] = row["naive_unmerged_ms"] / row["merged_ms"]
    row["path"] = "small_m" if M <= kernels.SMALL_M_MAX else kernels.choose_main_gemm(M, N, K, ctx.dev)
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
    else:
        sizes = [4096, 5120, 8192]
        train_shapes = [(m, k, k) for k in sizes for m in (256 * 8, 256 * 32)]
        decode_shapes = [(m, 4096, 4096) for m in (1, 4, 16)]
        budget = benchmark.TimingBudget(cuda_warmup_ms=10, cuda_rep_ms=60)

    def bench(fn, grad_to_none=()):
        """Median ms of ``fn()`` by the project's one harness (``do_bench`` on CUDA)."""
        return benchmark.measure_time(fn, torch.device(dev), budget, grad_to_none).median_ms

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
        "config": {"dtype": str(dtype), "r": r, "lora_alpha": 32, "dropout": p, "lora_param_dtype": "float32"},
        "train": [],
        "decode": [],
        "dry_run": args.dry_run,
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
    )
    for M, K, N in train_shapes:
        row = bench_train_shape(ctx, M, K, N)
        results["train"].append(row)
        print(json.dumps(row), flush=True)
    for M, K, N in decode_shapes:
        row = bench_decode_shape(ctx, M, K, N)
        results["decode"].append(row)
        print(json.dumps(row), flush=True)

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
