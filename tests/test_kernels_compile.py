"""The Triton kernels compile for sm_90 (H100/H200) and sm_86 (RTX 30xx, A10: 99 KiB of shared
memory, the least of the architectures lorafast tunes for) and fit their shared memory, checked
without a GPU.

The CPU suite runs the kernels through Triton's interpreter, which enforces none of the GPU
compiler's rules; this test compiles bench/compile_check.py's ``ci`` subset (every kernel's
default config on the split-dot path, the small-M kernel at R_PAD 256, the B2 dropout variant that
once failed), pruned for each architecture, ahead of time down to a cubin. It runs in a
subprocess because conftest.py sets ``TRITON_INTERPRET=1`` and the kernels pick their configs at
import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "compile_check.py"
#: bench/compile_check.py's exit status when this triton cannot target CUDA here.
NO_CUDA_TARGET = 2
EXPECTED_KERNELS = {
    "lora_linear._lora_down_kernel",
    "lora_linear._lora_fwd_main_kernel",
    "lora_linear._lora_fwd_small_m_kernel",
    "lora_linear._lora_dy_kernel",
    "lora_linear._lora_dx_kernel",
    "lora_linear._lora_ordered_grads_kernel",
    "lora_linear._keep_mask_kernel",
    "merge._lora_merge_kernel",
}


#: Opt-in shared memory per block of the architectures checked (the CUDA programming guide's).
SMEM_LIMITS = {90: 232448, 86: 101376}


@pytest.fixture(scope="module", params=sorted(SMEM_LIMITS, reverse=True), ids=lambda arch: f"sm_{arch}")
def compile_report(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORAFAST_AUTOTUNE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--subset", "ci", "--arch", str(request.param), "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode == NO_CUDA_TARGET:
        pytest.skip(f"triton cannot compile for CUDA on this machine: {proc.stderr.strip()}")
    if not out.exists():
        pytest.fail(
            f"compile_check.py wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report = json.loads(out.read_text())
    report["returncode"] = proc.returncode
    report["arch"] = request.param
    report["stdout"] = proc.stdout
    return report


def test_every_kernel_compiles(compile_report):
    results = compile_report["results"]
    assert {r["kernel"] for r in results} == EXPECTED_KERNELS
    failed = [f"{r['kernel']} [{r['label']}] {r['config']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_every_kernel_fits_shared_memory(compile_report):
    limit = compile_report["smem_limit"]
    assert compile_report["target"] == f"sm_{compile_report['arch']}" and limit == SMEM_LIMITS[compile_report["arch"]]
    over = [
        f"{r['kernel']} [{r['label']}] {r['config']}: {r['shared'] + r['static_shared']} B"
        for r in compile_report["results"]
        if r["ok"] and r["shared"] + r["static_shared"] > limit
    ]
    assert not over, f"over the {compile_report['target']} limit of {limit} B:\n" + "\n".join(over)
    assert compile_report["returncode"] == 0, compile_report["stdout"][-3000:]


def test_ci_subset_covers_split_rank_256_and_dropout_paths(compile_report):
    labels = [(r["kernel"], r["label"]) for r in compile_report["results"]]
    assert any(k.endswith("_lora_fwd_small_m_kernel") and "R_PAD=256" in lab for k, lab in labels)
    assert any(k.endswith("_lora_dx_kernel") and "HAS_DROPOUT" in lab and "!SPLIT_LORA" in lab for k, lab in labels)
    split = {k for k, lab in labels if " SPLIT_LORA" in lab}
    assert split >= {k for k in EXPECTED_KERNELS if k.startswith("lora_linear.") and "keep_mask" not in k}


#: Run in a subprocess with LORAFAST_AUTOTUNE=0 and no interpreter: records, for every launch of
#: compile_check's scenarios, the config the launchers hand to the JIT (through the autotuner or
#: its memo, kernels._common.TunedLauncher) and the configs the kernel's early prune keeps when
#: autotuning is on. The launches are on meta tensors: they are pruned for LORAFAST_TARGET_ARCH.
_UNTUNED_CHOICES = r"""
import json, os, sys
sys.path.insert(0, "bench")
import compile_check as cc
from triton.runtime.autotuner import Autotuner

objs = cc._kernel_objects()
launches = []
for name, obj in objs.items():
    if not isinstance(obj, Autotuner):
        obj.run = lambda *args, **kwargs: None  # plain kernels: no config to choose
        continue
    def run(*args, grid, warmup, _name=name, **kwargs):
        launches.append((_name, args, kwargs))
    obj.fn.run = run
scenarios = cc.scenarios("quick") + [
    cc.Scenario("forward", "float32", "float32", 33, 24, 72, 16, bias=False, path="small_m"),
    cc.Scenario("forward", "float32", "float32", 33, 4096, 4096, 256, path="small_m"),
    cc.Scenario("forward", "bfloat16", "float32", 33, 4096, 4096, 130, path="triton"),
]
for sc in scenarios * 2:  # twice: the second time every launch key is memoized
    cc.run_scenario(sc)
report = []
for name, args, kwargs in launches:
    obj = objs[name]
    config_names = {k for c in obj.configs for k in c.all_kwargs()}
    meta = {k: v for k, v in kwargs.items() if k not in config_names}
    ran = type("C", (), {"kwargs": {k: v for k, v in kwargs.items() if k in config_names and k.startswith("BLOCK_")},
                         "num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]})
    os.environ["LORAFAST_AUTOTUNE"] = "1"
    kept = [cc._describe(c) for c in cc._configs_for(obj, dict(zip(obj.fn.arg_names, args)), meta)]
    os.environ["LORAFAST_AUTOTUNE"] = "0"
    report.append({"kernel": name, "ran": cc._describe(ran), "kept": kept})
print(json.dumps(report))
"""


#: The main GEMMs' (F2, B2) documented defaults per architecture family (kernels/lora_linear.py's
#: _GEMM_TILES): what the 4096-wide launches of the quick scenarios must run.
GEMM_DEFAULTS = {
    90: {"M=128,N=128,K=64 w8 s3", "M=128,K=128,N=64 w8 s3"},
    86: {"M=64,N=128,K=32 w4 s4", "M=64,K=128,N=32 w4 s4"},
}


@pytest.mark.parametrize("arch", sorted(GEMM_DEFAULTS, reverse=True))
def test_untuned_launches_run_a_config_the_prune_keeps(arch):
    """``LORAFAST_AUTOTUNE=0`` (the GPU test runs) must launch the first config the kernel's prune
    keeps, never a config it drops: the autotuner skips the prune when it holds a single config,
    and the small-M kernel's unpruned fp32 default needs 248 KiB of shared memory at BLOCK_M 64,
    the likely cause of the first H200 run's one failure. The three extra launches are that case,
    R_PAD 256 and r=130. Pruned for sm_90 the main GEMMs run the Hopper family's defaults, for
    sm_86 the Ampere family's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORAFAST_AUTOTUNE"] = "0"
    env["LORAFAST_TARGET_ARCH"] = str(arch)
    proc = subprocess.run(
        [sys.executable, "-c", _UNTUNED_CHOICES], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    half = len(report) // 2  # the scenarios ran twice: the memoized launches match the autotuner's
    assert half > 0 and report[:half] == report[half:]
    assert {row["kernel"] for row in report} == {
        k for k in EXPECTED_KERNELS if "keep_mask" not in k and "merge" not in k
    }
    wrong = [
        f"{row['kernel']}: ran {row['ran']}, prune keeps {row['kept']}"
        for row in report
        if row["ran"] != row["kept"][0]
    ]
    gemm_ran = {row["ran"] for row in report if row["kernel"].endswith(("_fwd_main_kernel", "_dx_kernel"))}
    assert GEMM_DEFAULTS[arch] <= gemm_ran, f"sm_{arch}: the main GEMMs ran {sorted(gemm_ran)}"
    assert not wrong, "\n".join(wrong)


_SEED_SPECIALIZATIONS = r"""
import json, sys, torch
sys.path.insert(0, "bench")
import compile_check as cc
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from lorafast import kernels


def specializations(seed):
    meta, bf16, f32 = "meta", torch.bfloat16, torch.float32
    x, w = torch.empty(70, 256, dtype=bf16, device=meta), torch.empty(384, 256, dtype=bf16, device=meta)
    a, b = torch.empty(16, 256, dtype=f32, device=meta), torch.empty(384, 16, dtype=f32, device=meta)
    dy, u = torch.empty(70, 384, dtype=bf16, device=meta), torch.empty(70, 16, dtype=f32, device=meta)
    launches = []
    with cc.recording(launches), cc._target_arch(90):
        for path in ("small_m", "triton", "cublas"):
            kernels.lora_forward(x, w, None, a, b, 2.0, 0.1, seed, path=path)
        for reduction in ("atomic", "ordered"):
            kernels.lora_backward(dy, x, w, a, b, u, 2.0, 0.1, seed, reduction=reduction)
        kernels.dropout_keep_mask(seed, 70, 256, 0.1, meta)
    objects, rows = cc._kernel_objects(), []
    for name, args, _ in launches:
        fn = cc._jit_fn(objects[name])
        rows.append([name] + [
            list(native_specialize_impl(
                BaseBackend, value, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
            ))
            for p, value in zip([p for p in fn.params if not p.is_constexpr], args)
        ])
    return rows


seeds = torch.empty(4, dtype=torch.int64, device="meta")
print(json.dumps({
    "int": specializations(2**40 + 17),
    "small int": specializations(5),
    "tensor": specializations(seeds[0]),
    "unaligned tensor view": specializations(seeds[1]),
}))
"""


def test_int_and_tensor_seeds_specialize_every_kernel_alike():
    """What Triton's JIT binder (this triton) makes of each launch's arguments, with an int seed,
    a small int seed, a tensor seed and a tensor seed 8 bytes off 16-byte alignment: the same
    signature and specialization for every kernel, so a CUDA graph captured after eager warm-up
    (int seeds) with tensor seeds compiles nothing. (Recorded on meta tensors; views of them
    carry their byte offsets.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SEED_SPECIALIZATIONS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    by_int = report.pop("int")
    assert {row[0] for row in by_int} >= {k for k in EXPECTED_KERNELS if "merge" not in k}
    for kind, rows in report.items():
        assert rows == by_int, kind
