"""Ahead-of-time compile check of lorafast's Triton kernels for sm_90 (H100/H200) or another
NVIDIA architecture (``--arch 80``: A100, ``86``/``89``: RTX 30xx/40xx, L4), no GPU needed.

The Triton interpreter (``TRITON_INTERPRET=1``, what the CPU test suite runs) does not enforce the
GPU compiler's rules (dot dims, layouts, shared memory, registers), so this script compiles every
kernel launch for ``GPUTarget("cuda", ARCH, 32)`` down to a cubin with the ptxas bundled in the
triton wheel and checks each against that architecture's per-block shared-memory limit. The
launches are pruned for that architecture too (its config family and shared memory).

How the launches are found: the public launchers (``lora_forward``, ``lora_backward``,
``lora_merge_``, ``dropout_keep_mask``) run on ``meta`` tensors with every kernel's ``run``
replaced by a recorder, over a matrix of dtypes, ranks, shapes and options (:func:`scenarios`).
Each recorded launch is expanded into its autotune configs after the kernel's own
``early_config_prune`` (as the autotuner would), specialized as the JIT would specialize it
(int == 1 -> constexpr, 16-divisible ints and pointers -> ``tt.divisibility``), deduplicated, and
compiled (a process pool, ``--jobs``).

Run WITHOUT ``TRITON_INTERPRET`` (the config lists are chosen at import: one config under the
interpreter, all of them otherwise; ``LORAFAST_AUTOTUNE=0`` keeps only the default)::

    python bench/compile_check.py [--subset full|quick|ci] [--arch 80|86|89|90] [--json OUT] [--jobs N]

``full`` (default, ~1400 compiles, 20 minutes on 2 cores under triton 3.6 with a cold cache):
see :func:`scenarios`. ``quick`` (~80 compiles): every kernel's default config on fp32, bf16, fp16 + fp32 LoRA and bf16 + fp32 LoRA,
and every config of the heaviest 16-bit case (split dots, R_PAD 256). ``ci`` (14 compiles,
tests/test_kernels_compile.py): the default config of every kernel on the split path, the
small-M kernel at R_PAD 256 and in fp32 at M=33, and the B2 dropout variant that once failed to
compile. Exit status: 0 if everything compiled and fits, 1 otherwise, 2 if this triton cannot
target CUDA (no NVIDIA backend or no ptxas).

Caveat: shared memory and registers are what the installed triton allocates. The GPU runs triton
3.6, which allocates up to 17% more shared memory than 3.9 for some configs (B1 with split dots,
128x128: 230,400 B of sm_90's 232,448 in 3.6, 196,608 in 3.9), so keep headroom below the limit
and run this under triton 3.6 too (CONTRIBUTING.md: all of ``full`` fit there on 2026-12-06).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

#: The architectures --arch accepts (their shared-memory limits: lorafast.kernels._common.SMEM_PER_BLOCK).
ARCHES = (80, 86, 89, 90)

_F32, _F16, _BF16 = "float32", "float16", "bfloat16"
#: (x dtype, LoRA parameter dtype) pairs: unsplit, and the SPLIT_LORA path (16-bit x, fp32 LoRA).
DTYPE_PATHS = [(_F32, _F32), (_F16, _F16), (_F16, _F32), (_BF16, _BF16), (_BF16, _F32), (_F32, _BF16)]
#: --quick: (x dtype, LoRA dtype, r) with every kernel's default config; the last one, the
#: heaviest 16-bit case (split dots, R_PAD 256), with every config (its largest-SMEM one included).
QUICK_CASES = [(_F32, _F32, 16), (_BF16, _BF16, 16), (_F16, _F32, 16), (_BF16, _F32, 16), (_BF16, _F32, 256)]


@dataclass(frozen=True)
class Scenario:
    """One call of a public launcher: what it computes and on which shapes/dtypes."""

    op: str  # "forward" | "backward" | "merge" | "keep_mask"
    x_dtype: str
    lora_dtype: str
    M: int
    N: int
    K: int
    r: int
    bias: bool = True
    dropout_p: float = 0.1
    path: str | None = None  # forward: "small_m" | "triton" | "cublas"; backward: main_gemm
    needs_grad_x: bool = True
    needs_grad_lora: bool = True
    reduction: str | None = None  # backward: "atomic" | "ordered" (lora_backward's default if None)
    all_configs: bool = True  # False: only the default (first) config of each autotuned launch


@dataclass
class CompileJob:
    """One kernel specialization x config to compile; ``label`` says where it came from."""

    kernel: str  # module-qualified kernel name, e.g. "lora_linear._lora_dx_kernel"
    signature: dict
    constexprs: dict  # {param index: value} (JSON-safe)
    attrs: dict  # {param index: [["tt.divisibility", 16]]}
    options: dict  # num_warps, num_stages
    config: str
    label: str
    key: str = ""
    arch: int = 90  # compute capability as major * 10 + minor


@dataclass
class CompileResult:
    kernel: str
    config: str
    label: str
    ok: bool
    error: str = ""
    shared: int = 0  # dynamic shared memory the launch requests (metadata.shared)
    static_shared: int = 0  # static shared memory in the cubin
    n_regs: int = 0
    local_bytes: int = 0  # per-thread local memory: register spills + stack
    seconds: float = 0.0
    fits: bool = field(default=False)


# ----------------------------------------------------------------------------- scenarios


SUBSETS = ("full", "quick", "ci")


def scenarios(subset: str) -> list[Scenario]:
    """The launcher calls to record. Full: every dtype path x R_PAD {16, 64, 256} with all features
    on, and every feature-off / grad / main-GEMM variant at R_PAD 16, all with every config.
    Quick: :data:`QUICK_CASES`. CI: see the module docstring."""
    if subset == "ci":
        return [
            *_all_features(_BF16, _F32, 16, all_configs=False)[1:],
            Scenario("forward", _BF16, _F32, 64, 4096, 4096, 256, path="small_m", all_configs=False),
            # fp32 at BLOCK_M 64: the first H200 run's failure (an unpruned default over the SMEM limit)
            Scenario("forward", _F32, _F32, 33, 4096, 4096, 16, path="small_m", all_configs=False),
            Scenario("backward", _BF16, _BF16, 4096, 4096, 4096, 16, path="triton", all_configs=False),
            # (tensor seeds launch the int-seed variants: tests/test_kernels_compile.py checks that)
            Scenario("keep_mask", _F32, _F32, 4096, 0, 4096, 0),
        ]
    if subset == "quick":
        last = len(QUICK_CASES) - 1
        return [
            sc for i, (xd, ld, r) in enumerate(QUICK_CASES) for sc in _all_features(xd, ld, r, all_configs=i == last)
        ] + [Scenario("keep_mask", _F32, _F32, 4096, 0, 4096, 0)]
    out: list[Scenario] = []
    big = dict(M=4096, N=4096, K=4096)
    for xd, ld in DTYPE_PATHS:
        for r in (16, 64, 256):
            out += _all_features(xd, ld, r, all_configs=True)
        out += [
            Scenario("forward", xd, ld, 64, 4096, 4096, 16, bias=False, dropout_p=0.0, path="small_m"),
            Scenario("forward", xd, ld, **big, r=16, bias=False, dropout_p=0.0, path="triton"),
            Scenario("forward", xd, ld, **big, r=16, path="cublas"),
            Scenario("backward", xd, ld, **big, r=16, dropout_p=0.0, path="triton"),
            Scenario("backward", xd, ld, **big, r=16, path="cublas"),
            Scenario("backward", xd, ld, **big, r=16, path="triton", needs_grad_lora=False),
            Scenario("backward", xd, ld, **big, r=16, path="cublas", needs_grad_lora=False),
            Scenario("backward", xd, ld, **big, r=16, path="triton", needs_grad_x=False),
            # unaligned sizes: no tt.divisibility on strides, odd rank
            Scenario("forward", xd, ld, 4095, 1000, 1000, 8, path="triton"),
            Scenario("forward", xd, ld, 33, 1000, 1000, 8, path="small_m"),
            Scenario("backward", xd, ld, 4095, 1000, 1000, 8, path="triton"),
            Scenario("backward", xd, ld, 4095, 1000, 1000, 8, path="cublas", reduction="ordered"),
        ]
    out.append(Scenario("keep_mask", _F32, _F32, 4096, 0, 4096, 0))
    return out


def _all_features(xd: str, ld: str, r: int, all_configs: bool) -> list[Scenario]:
    """Bias and dropout on, both grads: small-M (M = 1 and 64), F1 + F2, B1 + B2 and the merge."""
    big = dict(M=4096, N=4096, K=4096, r=r, all_configs=all_configs)
    return [
        Scenario("forward", xd, ld, 1, 4096, 4096, r, path="small_m", all_configs=all_configs),
        Scenario("forward", xd, ld, 64, 4096, 4096, r, path="small_m", all_configs=all_configs),
        Scenario("forward", xd, ld, **big, path="triton"),
        Scenario("backward", xd, ld, **big, path="triton"),
        Scenario("backward", xd, ld, **big, path="cublas", reduction="ordered"),
        Scenario("merge", xd, ld, 0, 4096, 4096, r),
    ]


def run_scenario(sc: Scenario) -> None:
    """Call the public launcher for ``sc`` on meta tensors (kernel launches are recorded)."""
    import torch

    from lorafast import kernels

    dev = "meta"
    xd, ld = getattr(torch, sc.x_dtype), getattr(torch, sc.lora_dtype)
    seed = 2**40
    weight = torch.empty(sc.N, sc.K, dtype=xd, device=dev)
    lora_A = torch.empty(sc.r, sc.K, dtype=ld, device=dev)
    lora_B = torch.empty(sc.N, sc.r, dtype=ld, device=dev)
    if sc.op == "merge":
        kernels.lora_merge_(weight, lora_A, lora_B, 2.0)
    elif sc.op == "keep_mask":
        kernels.dropout_keep_mask(2**40, sc.M, sc.K, 0.1, dev)
    elif sc.op == "forward":
        x = torch.empty(sc.M, sc.K, dtype=xd, device=dev)
        bias = torch.empty(sc.N, dtype=xd, device=dev) if sc.bias else None
        kernels.lora_forward(x, weight, bias, lora_A, lora_B, 2.0, sc.dropout_p, seed, path=sc.path)
    elif sc.op == "backward":
        x = torch.empty(sc.M, sc.K, dtype=xd, device=dev)
        grad_y = torch.empty(sc.M, sc.N, dtype=xd, device=dev)
        u = torch.empty(sc.M, sc.r, dtype=torch.float32, device=dev)
        kernels.lora_backward(
            grad_y, x, weight, lora_A, lora_B, u, 2.0, sc.dropout_p, seed,
            needs_grad_x=sc.needs_grad_x, needs_grad_lora=sc.needs_grad_lora, main_gemm=sc.path,
            reduction=sc.reduction,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown scenario op {sc.op!r}")


# ----------------------------------------------------------------------------- recording launches


def _kernel_objects() -> dict[str, object]:
    """Every Triton kernel object (Autotuner or JITFunction) of lorafast.kernels, by qualified name."""
    from lorafast.kernels import lora_linear, merge
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    found = {}
    for module in (lora_linear, merge):
        short = module.__name__.rsplit(".", 1)[-1]
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner | JITFunction) and name.endswith("_kernel"):
                found[f"{short}.{name}"] = obj
    return found


@contextlib.contextmanager
def recording(launches: list) -> Iterator[None]:
    """Replace each kernel's ``run`` by a recorder of ``(name, args, constexpr kwargs)``."""
    objs = _kernel_objects()

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            launches.append((name, args, kwargs))

        return run

    for name, obj in objs.items():
        obj.run = recorder(name)
    try:
        yield
    finally:
        for obj in objs.values():
            del obj.run


def _jit_fn(obj):
    from triton.runtime.autotuner import Autotuner

    return obj.fn if isinstance(obj, Autotuner) else obj


def _configs_for(obj, nargs: dict, kwargs: dict):
    """The configs the autotuner would try for this launch (after its early prune); a plain JIT
    launch has one, with the launch's own (or default) num_warps / num_stages."""
    import triton
    from triton.runtime.autotuner import Autotuner

    if not isinstance(obj, Autotuner):
        return [triton.Config({}, num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))]
    if obj.early_config_prune is None:
        return list(obj.configs)
    return list(obj.early_config_prune(obj.configs, nargs, **kwargs))


def _specialize(jit_fn, bound: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as the JIT binder would build them for ``bound``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jit_fn.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[i] = value
            continue
        ty, spec = native_specialize_impl(
            BaseBackend, value, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[i] = spec
        elif isinstance(spec, str):
            attrs[i] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _describe(config) -> str:
    blocks = ",".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    split = f" split{config.kwargs['SPLIT_K']}" if config.kwargs.get("SPLIT_K", 1) > 1 else ""
    return f"{blocks}{split} w{config.num_warps} s{config.num_stages}".strip()


def _label(jit_fn, constexprs: dict, signature: dict) -> str:
    """Short human description: x dtype and the constexpr flags that select code paths."""
    x_ty = next(ty for ty in signature.values() if ty.startswith("*"))
    flags = []
    for i, p in enumerate(jit_fn.params):
        if i not in constexprs or p.name.startswith("BLOCK_") or p.name == "GROUP_M":
            continue
        value = constexprs[i]
        if p.name in ("R_PAD", "DOT_PREC"):
            flags.append(f"{p.name}={value}")
        elif isinstance(value, bool):
            flags.append(p.name if value else f"!{p.name}")
    return f"{x_ty[1:]} " + " ".join(flags)


def smem_limit(arch: int) -> int:
    """Opt-in shared memory per block of ``sm_{arch}`` in bytes."""
    from lorafast.kernels._common import SMEM_PER_BLOCK

    return SMEM_PER_BLOCK[divmod(arch, 10)]


@contextlib.contextmanager
def _target_arch(arch: int) -> Iterator[None]:
    """``LORAFAST_TARGET_ARCH`` set to ``arch`` inside the block (restored after)."""
    previous = os.environ.get("LORAFAST_TARGET_ARCH")
    os.environ["LORAFAST_TARGET_ARCH"] = str(arch)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["LORAFAST_TARGET_ARCH"]
        else:
            os.environ["LORAFAST_TARGET_ARCH"] = previous


def collect_jobs(subset: str, arch: int = 90) -> list[CompileJob]:
    """Record every scenario's launches and expand them into deduplicated compile jobs for
    ``sm_{arch}``: the prunes pick that architecture's configs and shared-memory budget (the
    recorded launches are on ``meta`` tensors, which the kernels prune for ``LORAFAST_TARGET_ARCH``)."""
    launches: list = []
    with recording(launches), _target_arch(arch):
        for sc in scenarios(subset):
            first = len(launches)
            run_scenario(sc)
            launches[first:] = [(launch, sc.all_configs) for launch in launches[first:]]
        expanded = _expand(launches, arch)
    return expanded


def _expand(launches: list, arch: int) -> list[CompileJob]:
    objs = _kernel_objects()
    jobs: dict[str, CompileJob] = {}
    for (name, args, kwargs), all_configs in launches:
        obj = objs[name]
        jit_fn = _jit_fn(obj)
        nargs = dict(zip(jit_fn.arg_names, args, strict=False))
        configs = _configs_for(obj, nargs, kwargs)
        for config in configs if all_configs else configs[:1]:
            bound = {**nargs, **kwargs, **config.kwargs}
            signature, constexprs, attrs = _specialize(jit_fn, bound)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            job = CompileJob(
                name,
                signature,
                constexprs,
                attrs,
                options,
                _describe(config),
                _label(jit_fn, constexprs, signature),
                arch=arch,
            )
            job.key = json.dumps([name, signature, sorted(constexprs.items()), sorted(attrs.items()), options])
            jobs.setdefault(job.key, job)
    return list(jobs.values())


# ----------------------------------------------------------------------------- compiling


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + local bytes per thread (spills), static shared bytes) from ``cuobjdump -res-usage``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}
    return fields.get("REG", 0), fields.get("STACK", 0) + fields.get("LOCAL", 0), fields.get("SHARED", 0)


def compile_job(job: CompileJob) -> CompileResult:
    """Compile one job for sm_{job.arch} (to a cubin) and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = _jit_fn(_kernel_objects()[job.kernel])
    result = CompileResult(job.kernel, job.config, job.label, ok=False)
    start = time.perf_counter()
    try:
        src = ASTSource(
            jit_fn,
            job.signature,
            {(int(i),): v for i, v in job.constexprs.items()},
            {(int(i),): v for i, v in job.attrs.items()},
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        result.shared = int(compiled.metadata.shared)
        result.n_regs, result.local_bytes, result.static_shared = _resource_usage(compiled.asm["cubin"])
        result.ok = True
    except Exception as exc:  # every compiler failure is a result to report, not a crash
        result.error = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    result.seconds = round(time.perf_counter() - start, 2)
    result.fits = result.ok and result.shared + result.static_shared <= smem_limit(job.arch)
    return result


def compile_all(jobs: list[CompileJob], n_jobs: int, progress: Callable[[int], None] | None = None):
    with ProcessPoolExecutor(max_workers=n_jobs) as pool:
        results = []
        for i, res in enumerate(pool.map(compile_job, jobs, chunksize=1)):
            results.append(res)
            if progress:
                progress(i + 1)
    return results


def cuda_target_available() -> str:
    """'' if this triton can compile for CUDA here, else the reason it cannot."""
    try:
        from triton import knobs
        from triton.backends import backends

        if "nvidia" not in backends:
            return "the installed triton has no NVIDIA backend"
        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # a missing binary raises from the knob lookup
        return f"the installed triton cannot find ptxas ({exc})"
    if not ptxas or not os.path.exists(ptxas):
        return "the installed triton ships no ptxas"
    return ""


# ----------------------------------------------------------------------------- report


def format_table(results: list[CompileResult]) -> str:
    header = f"{'kernel':<34} {'variant':<58} {'config':<26} {'status':<8} {'smem':>7} {'regs':>5} {'local':>6}"
    lines = [header, "-" * len(header)]
    for r in sorted(results, key=lambda r: (r.kernel, r.label, r.config)):
        status = "OK" if r.fits else ("SMEM!" if r.ok else "FAIL")
        lines.append(
            f"{r.kernel:<34} {r.label[:58]:<58} {r.config[:26]:<26} {status:<8} "
            f"{r.shared + r.static_shared:>7} {r.n_regs:>5} {r.local_bytes:>6}"
        )
        if not r.ok:
            lines.append("    " + r.error.splitlines()[0][:200])
    return "\n".join(lines)


def summary(results: list[CompileResult]) -> dict:
    per_kernel = {}
    for r in results:
        k = per_kernel.setdefault(
            r.kernel, {"compiled": 0, "failed": 0, "over_smem": 0, "max_smem": 0, "max_regs": 0, "spilling": 0}
        )
        k["compiled"] += r.ok
        k["failed"] += not r.ok
        k["over_smem"] += r.ok and not r.fits
        k["max_smem"] = max(k["max_smem"], r.shared + r.static_shared)
        k["max_regs"] = max(k["max_regs"], r.n_regs)
        k["spilling"] += r.local_bytes > 0
    return per_kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=SUBSETS, default="full", help="which launches (see module docstring)")
    parser.add_argument("--json", metavar="OUT", help="write every result as JSON to OUT")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    parser.add_argument("--arch", type=int, choices=ARCHES, default=90, help="target sm_ARCH (default 90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: under the interpreter the kernels carry only one config each")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    reason = cuda_target_available()
    if reason:
        print(f"cannot compile for CUDA: {reason}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.6's default, silences 3.9's warning
    jobs = collect_jobs(args.subset, args.arch)
    limit = smem_limit(args.arch)
    print(f"compiling {len(jobs)} kernel specializations for sm_{args.arch} with {args.jobs} processes ...")
    start = time.perf_counter()
    results = compile_all(jobs, args.jobs)
    print(format_table(results))
    per_kernel = summary(results)
    print()
    for kernel, s in sorted(per_kernel.items()):
        print(
            f"{kernel:<34} compiled {s['compiled']:>4}  failed {s['failed']:>3}  over SMEM {s['over_smem']:>3}  "
            f"max smem {s['max_smem']:>7} B  max regs {s['max_regs']:>3}  spilling {s['spilling']:>3}"
        )
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s; SMEM limit {limit} B (sm_{args.arch})")
    if args.json:
        payload = {"target": f"sm_{args.arch}", "smem_limit": limit, "summary": per_kernel,
                   "results": [asdict(r) for r in results]}  # fmt: skip
        out_dir = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as f:
            json.dump(payload, f, indent=1)
        os.replace(f.name, args.json)
    return 0 if all(r.fits for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
