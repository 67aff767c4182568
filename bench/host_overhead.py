"""Host time per call of a LoRA layer on lorafast's GPU code path, measured without a GPU.

Why: an eager decode step (M = 1) and the layers of a small training batch are launch-bound:
the GPU finishes each kernel before the host has queued the next, so the Python and launch work
per call *is* the layer's time (on the first H200 run the merged layer decoded in 0.018 ms and
lorafast's unmerged one in 0.094 ms, mostly host time). That work can be measured on the CPU:
this script runs the real path, lorafast's module, op, launchers and Triton's launch of the
compiled kernels (``CompiledKernel[grid]``; the first call of a signature goes through
``JITFunction.run``), on kernels compiled for sm_90, with a stand-in CUDA driver whose launch
does nothing. Left out: the C launch itself
(``cuLaunchKernelEx``, a few µs per kernel) and what PyTorch spends on CUDA bookkeeping (the
caching allocator, stream queries) over its CPU equivalents.

The comparison runs on the same small fp32 CPU tensors (decode: 1 token; training: 72 tokens,
past the small-M path; K = N = 64, r = 16, dropout 0.1 in training), small enough that the real
CPU kernels PEFT and the plain ``nn.Linear`` run cost about what their CUDA launches would (fp32:
the CPU's 16-bit matmuls are slow enough to count):

* ``base``: the frozen ``nn.Linear`` alone (the floor);
* ``peft``: PEFT's LoRA layer;
* ``lorafast``: lorafast's layer, "triton" backend, cuBLAS main GEMM (the CUDA default), the
  stand-in driver; ``triton_launches`` counts its kernels per call;
* ``triton launch``: one of those launches alone, through ``JITFunction.run`` (what each launch
  cost before lorafast's compiled launches, kernels/_common.py ``CompiledLaunches``).

and a whole training step of a tiny 2-layer Llama (``STEP_CASE``: lorafast bench's training
step, LoRA on all 14 projections, AdamW), PEFT's against lorafast's: the model's other work runs
on the CPU alike for both, so the difference is the LoRA layers' host time.

``--check-launches`` checks instead that the compiled launches hand the driver exactly what
``JITFunction.run`` does (:func:`check_launches`), ``--check-autotune-cache`` that an autotuning
choice is read back from Triton's disk cache (:func:`check_autotune_cache`); CPU tests run both.

Each figure is the median (and p20, minimum) over interleaved rounds (every provider once per
round) of the mean over back-to-back calls (:func:`lorafast.benchmark.measure_host_time`), the
garbage collector off. On a shared machine the minimum is the steadiest; absolute µs belong to
the machine that measured them, the ratios carry over roughly (a faster CPU shrinks every share).

Usage (without ``TRITON_INTERPRET``; the first run compiles five kernels for sm_90, ~1 minute)::

    python bench/host_overhead.py [--rounds 15] [--calls 50] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run bench/host_overhead.py without TRITON_INTERPRET: it measures the compiled kernels' launch path")
os.environ["LORAFAST_AUTOTUNE"] = "0"  # each kernel's default config: no timing runs (there is no GPU)
os.environ["LORAFAST_MAIN_GEMM"] = "cublas"  # the CUDA default (off CUDA the Triton GEMM is)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.6's default, silences 3.9's warning

import torch  # noqa: E402
from torch import nn  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

if __package__ in (None, ""):  # run as a script: lorafast from the source tree when not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_ARCH = 90  # what the kernels are compiled for (H100 / H200)
TRAINING_TOKENS = 72  # just past the small-M path (M <= 64): F1, F2 + cuBLAS, B1, B2 + cuBLAS
SMEM_PER_BLOCK = 232448  # sm_90's opt-in shared memory per block


#: What the stand-in driver was asked to launch, while a list: (kernel name, grid, arguments).
LAUNCHES: list[tuple] | None = None


class _StandInLauncher:
    """The Python half of Triton's ``CudaLauncher.__call__`` (scratch allocation checks, the
    argument forwarding); its C launch does nothing, or notes the launch in :data:`LAUNCHES`."""

    def __init__(self, src, metadata) -> None:
        self.name = f"{metadata.name} {metadata.hash[:12]}"  # the hash: which specialization it is
        self.global_scratch_size = metadata.global_scratch_size
        self.profile_scratch_size = metadata.profile_scratch_size
        self.launch_cooperative_grid = metadata.launch_cooperative_grid
        self.launch_pdl = metadata.launch_pdl

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args) -> None:
        scratch = [None if size == 0 else size for size in (self.global_scratch_size, self.profile_scratch_size)]
        self._launch(
            grid_x, grid_y, grid_z, stream, function, self.launch_cooperative_grid, self.launch_pdl, *scratch, *args
        )
        if LAUNCHES is not None:
            # args: the packed metadata, launch metadata and the two hooks, then the kernel's arguments
            LAUNCHES.append((self.name, (grid_x, grid_y, grid_z), args[4:]))

    @staticmethod
    def _launch(*args) -> None:
        pass


class _StandInUtils:
    @staticmethod
    def get_device_properties(device) -> dict:
        return {"max_shared_mem": SMEM_PER_BLOCK, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    @staticmethod
    def load_binary(name, kernel, shared, device) -> tuple:
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads per block


class StandInCudaDriver:
    """What ``JITFunction.run`` asks of the active driver: device 0, stream 0, an sm_90 target;
    binaries "load" to nothing and launches do nothing."""

    utils = _StandInUtils()
    launcher_cls = _StandInLauncher

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", TARGET_ARCH, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[tuple]]:
    """The launches the stand-in driver receives inside the block: (kernel name, grid, arguments)."""
    global LAUNCHES
    LAUNCHES = []
    try:
        yield LAUNCHES
    finally:
        LAUNCHES = None


@contextlib.contextmanager
def jit_runs() -> Iterator[list[tuple]]:
    """The ``JITFunction.run`` calls inside the block: (JIT function, arguments, keywords)."""
    from triton.runtime.jit import JITFunction

    runs: list[tuple] = []
    original = JITFunction.run

    def run(jit_function, *args, **kwargs):
        runs.append((jit_function, args, kwargs))
        return original(jit_function, *args, **kwargs)

    JITFunction.run = run
    try:
        yield runs
    finally:
        JITFunction.run = original


def install_stand_ins() -> None:
    """The stand-in driver active, CPU tensors accepted, lorafast on its "triton" backend."""
    from lorafast import ops

    driver.set_active(StandInCudaDriver())
    accept_cpu_tensors()
    ops.set_backend("triton")


def accept_cpu_tensors() -> None:
    """Let the "triton" backend and the launchers' device checks take CPU tensors, as they do
    under ``TRITON_INTERPRET=1``, while the kernels stay compiled ones: the two checks ask
    whether the interpreter runs (setting the variable itself would switch triton >= 3.7 to
    the interpreter at launch)."""
    from lorafast.kernels import _common

    from lorafast import ops

    _common.interpreting = ops._interpreting = lambda: True


class _Projection(nn.Module):
    def __init__(self, features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_layers(features: int, rank: int, dropout: float, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The same frozen weight as a plain ``nn.Linear``, under PEFT's LoRA and under lorafast's."""
    import peft

    import lorafast

    torch.manual_seed(0)
    base = _Projection(features, dtype).requires_grad_(False)
    layers = {"base": base.proj}
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"])
    )
    layers["peft"] = peft_model.base_model.model.proj
    lorafast_model = copy.deepcopy(base)
    lorafast.apply_lora(
        lorafast_model, lorafast.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"])
    )
    layers["lorafast"] = lorafast_model.proj
    for layer in layers.values():
        for name, parameter in layer.named_parameters():
            if "lora_B" in name:  # PEFT and lorafast start B at zero; any values will do here
                nn.init.normal_(parameter, std=0.02)
    return layers


def decode_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    layer.eval()

    def call():
        with torch.no_grad():
            return layer(x)

    return call


def training_call(layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], None]:
    """Forward and backward, then every gradient set to None (as ``zero_grad`` does each step)."""
    layer.train()
    tensors = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def call() -> None:
        layer(x).backward(grad_y)
        for tensor in tensors:
            tensor.grad = None

    return call


def interleaved_host_us(calls_by_name: dict[str, Callable], rounds: int, calls: int) -> dict[str, dict]:
    """Per name: median, p20 and minimum over ``rounds`` of the µs per call, each round timing
    every callable once (``calls`` back-to-back calls), so a change in the machine's load hits all
    alike. The garbage collector is off while timing, as in ``timeit``: its pauses land on
    whichever call allocates past its threshold, noise larger than the differences measured."""
    from lorafast.benchmark import measure_host_time

    cpu = torch.device("cpu")
    per_round: dict[str, list[float]] = {name: [] for name in calls_by_name}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in calls_by_name.items():
                timing = measure_host_time(fn, cpu, calls=calls, samples=3, warmup_calls=1)
                per_round[name].append(timing.median_ms * 1e3)
    finally:
        gc.enable()
    result = {}
    for name, values in per_round.items():
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        result[name] = {"median_us": statistics.median(values), "p20_us": deciles[1], "min_us": min(values)}
    return result


CASES = {"decode": (1, 0.0), "forward+backward": (TRAINING_TOKENS, 0.1)}  # case -> (tokens, dropout)
#: The training step's model: lorafast bench's 2-layer Llama (7 projections a layer, GQA), tiny.
STEP_CASE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=128, batch=1, seq=TRAINING_TOKENS)


def step_calls(rank: int) -> dict[str, Callable]:
    """One AdamW training step of the tiny Llama (``STEP_CASE``) per provider, PEFT's and lorafast's
    LoRA on all 14 projections (lorafast.benchmark_suite's training step, on the CPU)."""
    from lorafast.benchmark_suite import LorafastProvider, PeftProvider, TrainStepCase, build_decoder, make_train_step

    case = TrainStepCase(**STEP_CASE, rank=rank, dropout=0.1)
    base = build_decoder(case, torch.device("cpu"), torch.float32)
    input_ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(2))
    providers = {"peft": PeftProvider(), "lorafast": LorafastProvider("triton")}
    return {
        name: make_train_step(provider.adapt_model(copy.deepcopy(base), case).train(), input_ids)
        for name, provider in providers.items()
    }


def case_calls(
    case: str, features: int, rank: int, dtype: torch.dtype
) -> tuple[dict[str, Callable], dict[str, torch.Tensor]]:
    """One call of the case per provider (base, peft, lorafast) on the same weights and input, and
    the tensors lorafast's call passes its kernels by name (x, grad_y, its layer's weights)."""
    tokens, dropout = CASES[case]
    layers = build_layers(features, rank, dropout, dtype)
    x = torch.randn(tokens, features, dtype=dtype, requires_grad=case != "decode")
    grad_y = torch.randn(tokens, features, dtype=dtype)
    calls = {
        name: decode_call(layer, x) if case == "decode" else training_call(layer, x, grad_y)
        for name, layer in layers.items()
    }
    lorafast_layer = layers["lorafast"]
    inputs = {"x": x, "grad_y": grad_y, **dict(lorafast_layer.named_parameters()), "W": lorafast_layer.base_weight}
    return calls, inputs


def measure(rounds: int, calls: int, features: int = 64, rank: int = 16) -> dict:
    from lorafast import benchmark

    install_stand_ins()
    dtype = torch.float32  # CPU kernels of 16-bit dtypes are slow: PEFT's and the base's would not stand for launches
    report = {
        "what": "host µs per call; lorafast through a stand-in CUDA driver (bench/host_overhead.py)",
        "cpu": benchmark.device_name(torch.device("cpu")),
        "versions": {name: benchmark.package_version(name) for name in benchmark.VERSIONED_PACKAGES},
        "git_commit": benchmark.git_commit(),
        "shape": {"in_features": features, "out_features": features, "rank": rank, "dtype": str(dtype)},
        "cases": {},
    }
    for case, (tokens, dropout) in CASES.items():
        calls_by_name = case_calls(case, features, rank, dtype)[0]
        with jit_runs() as runs:
            calls_by_name["lorafast"]()  # compiles the kernels the first time
        jit_function, args, kwargs = runs[-1]
        calls_by_name["triton launch"] = lambda f=jit_function, a=args, k=kwargs: f.run(*a, **k)
        with recorded_launches() as launches:
            calls_by_name["lorafast"]()
        timings = interleaved_host_us(calls_by_name, rounds, calls)
        timings["lorafast"]["triton_launches"] = len(launches)
        report["cases"][case] = {"tokens": tokens, "dropout": dropout, "host": timings}
    calls_by_name = step_calls(rank)
    with recorded_launches() as launches:
        calls_by_name["lorafast"]()  # the first call compiles
        launches.clear()
        calls_by_name["lorafast"]()
    timings = interleaved_host_us(calls_by_name, rounds, max(1, calls // 10))
    timings["lorafast"]["triton_launches"] = len(launches)
    report["cases"]["training step"] = {"tokens": TRAINING_TOKENS, "dropout": 0.1, "host": timings, "model": STEP_CASE}
    return report


def specialization_calls(features: int = 64, rank: int = 16) -> list[Callable[[], None]]:
    """``lora_forward`` + ``lora_backward`` calls that need kernels specialized apart: x 16-byte
    aligned and a view 4 bytes off, each with an int seed inside int32's range (after the
    kernels' 2**62 flip: outside), one whose flipped word is in it, and a tensor seed."""
    from lorafast import kernels

    generator = torch.Generator().manual_seed(0)
    storage = torch.randn(TRAINING_TOKENS * features + 1, generator=generator)
    weight, grad_y = torch.randn(features, features, generator=generator), torch.randn(TRAINING_TOKENS, features)
    lora_A, lora_B = torch.randn(rank, features, generator=generator), torch.randn(features, rank, generator=generator)
    calls = []
    for x in (storage[:-1].view(TRAINING_TOKENS, features), storage[1:].view(TRAINING_TOKENS, features)):
        for seed in (5, 2**62 + 5, torch.tensor([7])):

            def call(x=x, seed=seed) -> None:
                u = kernels.lora_forward(x, weight, None, lora_A, lora_B, 2.0, 0.1, seed)[1]
                kernels.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 2.0, 0.1, seed)

            calls.append(call)
    return calls


def check_launches(features: int = 64, rank: int = 16) -> list[str]:
    """Compare what the driver is asked to launch with compiled launches off and on
    (``set_compiled_launches``, kernels/_common.py ``CompiledLaunches``): decode, training on the
    cuBLAS path with atomic dA/dB and on the Triton GEMM with the ordered reduction, three calls
    each from the same RNG state, then :func:`specialization_calls` twice over. Returns the
    differences (none: the same compiled kernels, by their hash, grids and arguments, tensors
    compared by dtype, shape, strides and alignment, and by identity where they are the call's
    inputs), and that the last calls launched without ``JITFunction.run``."""
    from lorafast.kernels import lora_linear
    from lorafast.kernels._common import set_compiled_launches

    install_stand_ins()
    settings = [("decode", {}), ("forward+backward", {"LORAFAST_MAIN_GEMM": "cublas", "LORAFAST_REDUCTION": "atomic"})]
    settings.append(("forward+backward", {"LORAFAST_MAIN_GEMM": "triton", "LORAFAST_REDUCTION": "ordered"}))

    def described(launch: tuple, inputs: dict[int, str]) -> tuple:
        name, grid, args = launch
        return name, grid, tuple(
            (inputs.get(id(a), "new"), a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        )

    recorded: dict[bool, list] = {}
    for compiled in (False, True):
        set_compiled_launches(compiled)
        recorded[compiled] = []
        for case, environment in settings:
            with mock.patch.dict(os.environ, environment):
                for launcher in lora_linear._LAUNCHERS.values():
                    launcher.forget()  # bound launches resolve again, under this setting
                torch.manual_seed(0)
                calls, named_inputs = case_calls(case, features, rank, torch.float32)
                layer_call = calls["lorafast"]
                inputs = {id(t): name for name, t in named_inputs.items()}
                for call in range(3):
                    with recorded_launches() as launches, jit_runs() as runs:
                        layer_call()
                    recorded[compiled] += [(case, environment, call, described(launch, inputs)) for launch in launches]
                    if compiled and call == 2 and runs:
                        return [f"{case} {environment}: the third call still went through JITFunction.run ({len(runs)})"]
        calls = specialization_calls(features, rank)
        for index, call in enumerate(calls * 2):  # the second time round, every specialization is known
            with recorded_launches() as launches, jit_runs() as runs:
                call()
            recorded[compiled] += [("specializations", described(launch, {})) for launch in launches]
            if compiled and index == 2 * len(calls) - 1 and runs:
                return [f"specialization calls: the last still went through JITFunction.run ({len(runs)})"]
    off, on = recorded[False], recorded[True]
    if not off:
        return ["no launch reached the driver"]
    problems = [f"{len(off)} launches with compiled launches off, {len(on)} on"] if len(off) != len(on) else []
    problems += [f"launch {i}: off {a}\n  on {b}" for i, (a, b) in enumerate(zip(off, on, strict=False)) if a != b]
    return problems + _check_debug_setting(features, rank)


def _check_debug_setting(features: int, rank: int) -> list[str]:
    """``TRITON_DEBUG``'s setting turned on mid-process (a knob that enters every launch's
    options): the compiled path must launch the debug kernel ``JITFunction.run`` launches."""
    from lorafast.kernels import set_compiled_launches
    from triton import knobs

    decode = case_calls("decode", features, rank, torch.float32)[0]["lorafast"]
    kernel_names = {}
    previous = knobs.runtime.debug
    try:
        for debug, compiled in [(False, True), (True, False), (True, True)]:
            knobs.runtime.debug = debug
            set_compiled_launches(compiled)
            for _ in range(2):  # the second call takes the compiled path, where it is on
                with recorded_launches() as launches:
                    decode()
            kernel_names[debug, compiled] = launches[0][0]
    finally:
        knobs.runtime.debug = previous
    if kernel_names[True, False] == kernel_names[False, True]:
        return ["TRITON_DEBUG on: JITFunction.run launched the same kernel as with it off"]
    if kernel_names[True, True] != kernel_names[True, False]:
        return [f"TRITON_DEBUG on: compiled launches ran {kernel_names[True, True]}, run {kernel_names[True, False]}"]
    return []


def check_autotune_cache(rows: int = 2048, features: int = 256, rank: int = 16) -> list[str]:
    """Triton's disk cache of autotuning results (``cache_results=True`` on lorafast's kernels):
    F1's first autotune of a key times every config its prune keeps and writes the timings; with
    the in-memory choice forgotten (as in a new process), the same key is read back from disk,
    nothing timed, and the same config launched. The timings are stand-ins (no GPU), each config
    faster than the one before, so a choice that fell back to the default would show. Triton's
    cache folder is a fresh temporary one meanwhile (its kernels compiled there too): stand-in
    timings must never reach the real cache, where a GPU of the same architecture would read them."""
    import tempfile

    import triton
    import triton.testing
    from lorafast.kernels import lora_linear

    install_stand_ins()
    timed: list[int] = []

    def stand_in_do_bench(kernel_call, warmup=None, rep=None, quantiles=None, **_):
        kernel_call()
        timed.append(1)
        ms = 1.0 / len(timed)
        return [ms, ms, ms] if quantiles else ms

    chosen = []
    try:
        with (
            mock.patch.object(triton.testing, "do_bench", stand_in_do_bench),
            mock.patch.dict(os.environ, {"LORAFAST_AUTOTUNE": "1"}),
            tempfile.TemporaryDirectory() as cache_dir,
            triton.knobs.cache.scope(),
        ):
            triton.knobs.cache.dir = cache_dir
            x, lora_A = torch.randn(rows, features), torch.randn(rank, features)
            for _ in range(2):
                lora_linear._lora_down.forget()  # the autotuner's in-memory choices too
                timed.clear()
                bound = lora_linear._bind_down(x, lora_A, lora_linear.LoraScalars(2.0, 0.1, False))
                bound(x, lora_A, torch.empty(rows, rank), *lora_linear.seed_arguments(7, x.device))
                chosen.append((len(timed), bound.config))
    finally:
        lora_linear._lora_down.forget()
    (first_timed, first_config), (second_timed, second_config) = chosen
    problems = []
    if first_timed < 2:
        problems.append(f"the first autotune timed {first_timed} configs (a new key with several kept)")
    if second_timed:
        problems.append(f"the second autotune of the key timed {second_timed} configs instead of reading the disk")
    if second_config != first_config or first_config is None:
        problems.append(f"the cached choice {second_config} is not the timed one {first_config}")
    return problems


def format_report(report: dict) -> str:
    lines = [f"host µs per call, {report['cpu']}; triton {report['versions']['triton']}, torch {report['versions']['torch']}"]
    for case, entry in report["cases"].items():
        host = entry["host"]
        floor = "base" if "base" in host else "peft"
        lines.append(f"{case} ({entry['tokens']} tokens, dropout {entry['dropout']}):")
        for name, timing in host.items():
            extra = f"  ({timing['triton_launches']} Triton launches)" if "triton_launches" in timing else ""
            lines.append(
                f"  {name:14} {timing['median_us']:8.1f} [p20 {timing['p20_us']:7.1f}, min {timing['min_us']:7.1f}]"
                f"  x {floor} {timing['median_us'] / host[floor]['median_us']:5.2f}{extra}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--calls", type=int, default=50, help="back-to-back calls per timing (default 50)")
    parser.add_argument("--json", help="write the report here (atomically)")
    parser.add_argument(
        "--check-launches",
        action="store_true",
        help="instead of timing, check that compiled launches hand the driver what JITFunction.run does (exit 1 if not)",
    )
    parser.add_argument(
        "--check-autotune-cache",
        action="store_true",
        help="instead of timing, check that an autotuning choice is read back from Triton's disk cache (exit 1 if not)",
    )
    args = parser.parse_args(argv)
    from compile_check import cuda_target_available  # bench/ is this script's folder

    reason = cuda_target_available()
    if reason:
        print(f"cannot compile the kernels for CUDA: {reason}", file=sys.stderr)
        return 2
    if args.check_launches:
        problems = check_launches()
        print("\n".join(problems) if problems else "compiled launches: the same launches as JITFunction.run")
        return 1 if problems else 0
    if args.check_autotune_cache:
        problems = check_autotune_cache()
        print("\n".join(problems) if problems else "autotuning: a key's choice is read back from the disk cache")
        return 1 if problems else 0
    if args.rounds < 3 or args.calls < 1:
        parser.error("need --rounds >= 3 and --calls >= 1")
    if args.json:
        from lorafast.benchmark import check_output_path

        check_output_path(args.json, (".json",))
    report = measure(args.rounds, args.calls)
    print(format_report(report))
    if args.json:
        from lorafast.benchmark import atomic_output

        with atomic_output(args.json) as handle:
            json.dump(report, handle, indent=1)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
