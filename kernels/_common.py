"""Shared pieces of the LoRA kernels: Triton helpers (program swizzle, dropout mask, fp32-accurate
low-precision dots) and launcher utilities (input validation, block-size helpers, interpreter
detection).

Everything here must compile with triton 3.6 (the GPU machine) and run under triton 3.9's
interpreter (the CPU machines).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

#: Largest LoRA rank the kernels accept (R_PAD <= 256 keeps the epilogue tiles in SMEM).
MAX_RANK = 256
#: The smallest dimension ``tl.dot`` accepts on the GPU: every dot operand dim is padded to it.
MIN_DOT = 16
#: Rows up to which ``lora_forward`` uses the single fused small-M (decode) kernel.
SMALL_M_MAX = 64
#: A pointer increment is ``BLOCK * stride`` in int32: tensors whose strides could overflow it
#: are made contiguous first (never happens for realistic LoRA shapes).
_MAX_BLOCK = 256

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_compiled_launches = os.environ.get("LORAFAST_COMPILED_LAUNCH", "1").strip() != "0"


def compiled_launches_enabled() -> bool:
    """Whether resolved launches go to the compiled kernels (:func:`set_compiled_launches`)."""
    return _compiled_launches


def set_compiled_launches(enabled: bool) -> bool:
    """Whether resolved launches go to the compiled kernels (:class:`CompiledLaunches`) or every
    one through ``JITFunction.run``; returns the previous setting. On unless the process started
    with ``LORAFAST_COMPILED_LAUNCH=0``. For benchmarks and checks that compare the two."""
    global _compiled_launches
    previous, _compiled_launches = _compiled_launches, bool(enabled)
    return previous


def autotune_enabled() -> bool:
    """False when ``LORAFAST_AUTOTUNE=0``: every kernel uses its one default config."""
    return os.environ.get("LORAFAST_AUTOTUNE", "1").strip() != "0"


#: How long one autotuning measurement warms up and repeats, in ms of GPU time, for the configs'
#: autotuning (:func:`autotune_timer`) and the main-GEMM choice (``main_gemm.time_ms``).
TIMING_WARMUP_MS, TIMING_REP_MS = 5, 20


def autotune_timer(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    """The autotuners' ``do_bench``: ``triton.testing.do_bench`` with :data:`TIMING_WARMUP_MS` of
    warm-up and :data:`TIMING_REP_MS` of repeats, the L2 flushed before each call as always.

    Why not Triton's default (25 + 100 ms per config): autotuning pays it for every config that
    survives the prune, for every key (M bucket, N, K, flags), and all of it is paid on first
    use (a training run's first steps; the GPU check's stages, each a fresh process with a time
    limit): six configs for each of four kernels at a new shape are 24 x 125 ms, ~3 s of timing
    alone, and now 24 x 25 ms, ~0.6 s (by the budgets, not measured). 20 ms still repeats the
    slowest of the kernels' tuned launches (~2 ms, B2 at M = 8192, K = N = 8192) ten times and a
    decode launch (~20 µs) about a thousand."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=TIMING_WARMUP_MS, rep=TIMING_REP_MS, quantiles=quantiles)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code (grids). Not ``triton.cdiv``: triton 3.9 makes that a
    ``ConstexprFunction`` whose host call costs ~9 µs (five per training step: ~45 µs of Python
    per layer, measured with the kernels stubbed out on the CPU)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def padded_rank(r: int) -> int:
    """R_PAD: r rounded up to a power of two and to at least 16 (the GPU's smallest dot dim)."""
    return max(MIN_DOT, next_pow2(r))


def m_bucket(M: int) -> int:
    """Autotune key for M: power-of-two bucket, so varying sequence lengths do not re-tune."""
    return min(next_pow2(M), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use true fp32 products ("ieee") to match PyTorch's default fp32 matmul."""
    return "ieee" if dtype == torch.float32 else "tf32"


def needs_split(x_dtype: torch.dtype, *lora_params: torch.Tensor) -> bool:
    """SPLIT_LORA: True when the dots run in fp16/bf16 (x's dtype) but a LoRA parameter is not
    exact in that dtype (fp32 by default, as PEFT): its dots then go through :func:`dot_fp32_rhs`
    / :func:`dot_fp32_lhs`'s hi/lo split, and so do those on the fp32 u and du."""
    return x_dtype != torch.float32 and any(t.dtype != x_dtype for t in lora_params)


#: Opt-in shared memory per block (bytes) by compute capability (CUDA programming guide,
#: technical specifications): for devices Triton's driver cannot ask, i.e. the ``meta`` tensors
#: bench/compile_check.py records launches with.
SMEM_PER_BLOCK = {
    (8, 0): 166912,  # A100
    (8, 6): 101376,  # RTX 30xx, A10, A40
    (8, 7): 166912,  # Jetson Orin
    (8, 9): 101376,  # RTX 40xx, L4, L40
    (9, 0): 232448,  # H100, H200
    (10, 0): 232448,  # B200
    (12, 0): 101376,  # RTX 50xx
}
#: The architecture launches on non-CUDA tensors are pruned for (``LORAFAST_TARGET_ARCH``, e.g. "86").
_DEFAULT_TARGET_ARCH = "90"


def device_arch(device: torch.device) -> tuple[int, int]:
    """Compute capability the kernels launch on: the CUDA device's own; for tensors elsewhere
    (``meta``: bench/compile_check.py) ``LORAFAST_TARGET_ARCH`` ("90" unless set)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    major, minor = divmod(int(os.environ.get("LORAFAST_TARGET_ARCH", _DEFAULT_TARGET_ARCH)), 10)
    return major, minor


#: The config families the kernels' autotune candidates come in (:func:`arch_family`).
ARCH_FAMILIES = ("hopper", "ampere")


def arch_family(arch: tuple[int, int]) -> str:
    """Which config family suits the architecture: "hopper" for sm_90 and sm_100 (warpgroup MMA,
    227 KiB of shared memory per block), "ampere" for the rest (sm_80-89, sm_120: mma.sync)."""
    hopper, ampere = ARCH_FAMILIES
    return hopper if arch[0] in (9, 10) else ampere


def smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` in bytes: Triton's driver for CUDA devices,
    else :data:`SMEM_PER_BLOCK` of :func:`device_arch` (sm_80's where unknown)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    return SMEM_PER_BLOCK.get(device_arch(device), SMEM_PER_BLOCK[(8, 0)])


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (never off CUDA):
    nothing may be timed or synchronized then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that makes ``device`` the current CUDA device while it is open, if it is not
    already (then, and off CUDA, it does nothing).

    Why: Triton compiles for and launches on the *current* CUDA device and its current stream,
    not on the device of the tensors it is given. In a model spread over GPUs (transformers'
    ``device_map="auto"``) a layer on cuda:1 runs while cuda:0 is current: without peer access
    the launch fails ("Pointer argument cannot be accessed from Triton"); with it the kernel runs
    on GPU 0, unordered with cuda:1's stream, a silent race with the work that produced its
    inputs and with the cuBLAS half of the cuBLAS path (which PyTorch runs on cuda:1).
    """
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_first_argument_device(launcher: Callable) -> Callable:
    """Decorator for a launcher whose first argument is a tensor on the device its kernels must
    run on: the launcher runs inside :func:`launch_device` of that device (anything else as the
    first argument goes straight to the launcher, whose checks name it)."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if not isinstance(first, torch.Tensor):
            return launcher(first, *args, **kwargs)
        with launch_device(first.device):
            return launcher(first, *args, **kwargs)

    return launch


class TunedLauncher:
    """Launch a ``triton.autotune``'d kernel, paying the autotuner's per-call Python once per key.

    ``launcher.launch(grid, args, meta)`` behaves like ``autotuned_kernel[grid](*args, **meta)``. The first
    call with a given autotune key goes through the autotuner (which prunes and, if configs are
    left, benchmarks them); later calls with that key launch the JIT function directly with the
    config the autotuner chose for it. Why: ``Autotuner.run`` rebuilds a dict of every argument and
    scans the argument-name list once per argument on every call: about 8 µs of Python per launch
    here (2-core Xeon, triton 3.9, the JIT launch stubbed out), a third of a decode call's host time
    and about 35 µs of a LoRA layer's forward + backward.

    The memo key is the autotuner's own key: the values of the autotune ``key`` arguments and the
    dtypes of the call's tensor arguments, so a memoized call gets exactly the config the
    autotuner would have used. Their positions are worked out once per call layout (the
    arguments' types and the keyword names).

    A key whose early prune keeps a single config (always with ``LORAFAST_AUTOTUNE=0``, as the GPU
    tests run; small problems, where few tiles fit) launches it directly: triton 3.6's
    ``Autotuner.run`` (the GPU machine's) benchmarks even a lone pruned config with ``do_bench``
    (a hundred launches and a synchronization, impossible while a CUDA graph is captured), where
    3.9 skips it. A key first seen while a CUDA graph is being captured (a shape the warm-up did
    not run) cannot be benchmarked either: it launches the prune's first config, the default,
    and is not memoized, so the key's first eager launch still autotunes it.

    When a tool replaces the autotuner's ``run`` (``bench/compile_check.py`` records launches that
    way), no config is chosen and nothing is memoized, so every call still reaches it.
    """

    def __init__(self, autotuner) -> None:
        self.autotuner = autotuner
        self._layouts: dict[tuple, tuple[tuple, tuple]] = {}  # call layout -> (key sources, tensor positions)
        self._configs: dict[tuple, dict] = {}  # memo key -> the chosen config's launch kwargs
        self.generation = 0  # bumped by forget(): a BoundLaunch resolved before then resolves again

    def bind(self, grid: Callable[[dict], tuple], args: list, meta: dict) -> BoundLaunch:
        """A :class:`BoundLaunch` of this kernel: ``args`` with ``None`` where each call puts its
        own values (tensors, seeds), ``meta`` its constexpr keywords."""
        return BoundLaunch(self, grid, args, meta)

    def choices(self) -> list[dict]:
        """The configs chosen so far, one ``{"key": [...], "config": {...}}`` per memo key (key
        values as strings: dtypes are not JSON), for benchmarks to report what autotuning picked."""
        return [{"key": [str(v) for v in key], "config": dict(config)} for key, config in self._configs.items()]

    def forget(self) -> None:
        """Drop every config chosen so far (and the autotuner's cache): the next launch of each
        key goes through the autotuner again, e.g. after its config list was changed."""
        self._configs.clear()
        self.autotuner.cache.clear()
        self.generation += 1

    def _layout(self, args: tuple, meta: dict) -> tuple[tuple, tuple]:
        # the argument types are part of the layout: a slot may hold an int in one call and a
        # tensor in another, whose dtype the key then counts (tuple(map(type, ...)): ~0.6 µs for
        # 30 arguments)
        layout = (tuple(map(type, args)), tuple(meta))
        found = self._layouts.get(layout)
        if found is None:
            positional = {name: i for i, name in enumerate(self.autotuner.arg_names[: len(args)])}
            sources = tuple(positional.get(k, k) for k in self.autotuner.keys if k in positional or k in meta)
            tensors = tuple(i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor))
            found = self._layouts[layout] = (sources, tensors)
        return found

    def _key(self, args: tuple, meta: dict) -> tuple:
        sources, tensors = self._layout(args, meta)
        return tuple(args[s] if isinstance(s, int) else meta[s] for s in sources) + tuple(
            args[i].dtype for i in tensors
        )

    def memoized(self, args: tuple, meta: dict) -> dict | None:
        """The config a launch with these arguments will run, if autotuning chose it already (else
        None: the launch goes through the autotuner, which may try every config)."""
        return self._configs.get(self._key(args, meta))

    def _untimed_config(self, key: tuple, args: tuple, meta: dict) -> dict | None:
        """Launch kwargs of a config to run without the autotuner, for a key not memoized yet: its
        only config (which it never prunes) or the only one its early prune keeps, memoized; while
        a CUDA graph is captured, the prune's first, not memoized. None when the autotuner must
        choose, or a tool replaced its ``run``."""
        configs, prune = self.autotuner.configs, self.autotuner.early_config_prune
        if "run" in vars(self.autotuner):
            return None
        if len(configs) > 1 and prune is not None:
            configs = prune(configs, dict(zip(self.autotuner.arg_names, args, strict=False)), **meta)
        if len(configs) == 1:
            self._configs[key] = configs[0].all_kwargs()
            return self._configs[key]
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        return configs[0].all_kwargs() if capturing(device) else None

    def launch(self, grid, args: tuple, meta: dict):
        key = self._key(args, meta)
        config = self._configs.get(key)
        if config is None:
            config = self._untimed_config(key, args, meta)
        if config is not None:
            return self.autotuner.fn[grid](*args, **meta, **config)
        self.autotuner.best_config = None
        result = self.autotuner[grid](*args, **meta)
        if self.autotuner.best_config is not None:
            self._configs[key] = self.autotuner.best_config.all_kwargs()
        return result


class BoundLaunch:
    """One launch of a :class:`TunedLauncher`'s kernel with everything fixed but the values each
    call brings: ``launch(*values)`` puts ``values`` into the argument slots left ``None``, in
    order, and launches.

    Why: the launchers call the same kernels with the same shapes, strides and scalars step after
    step, and rebuilding the ~30 arguments, constexprs, autotune key and grid per call cost ~10 µs
    of Python per launch (2-core EPYC, bench/host_overhead.py), about what Triton's own launch
    costs. A launch plan (``lora_linear``) binds its launches once per call signature.

    Until the kernel's config is known for this argument set, a call goes through the
    :class:`TunedLauncher` (which may autotune); once it has memoized one, the config's keywords
    and the grid they give are kept and later calls launch the JIT function directly, through
    :class:`CompiledLaunches` where it is a compiled one. ``forget`` on the launcher (a new
    ``generation``) makes them resolve again.
    """

    def __init__(self, launcher: TunedLauncher, grid: Callable[[dict], tuple], args: list, meta: dict) -> None:
        self.launcher = launcher
        self.grid = grid
        self.args = list(args)
        self.slots = tuple(i for i, arg in enumerate(args) if arg is None)
        self.meta = meta
        self._resolved: tuple | None = None  # (generation, config, keywords, grid tuple, CompiledLaunches | None)

    @property
    def config(self) -> dict | None:
        """The config this launch runs, once the launcher has memoized it (else None)."""
        resolved = self._resolved
        return resolved[1] if resolved is not None and resolved[0] == self.launcher.generation else None

    def __call__(self, *values) -> None:
        args = self.args.copy()
        for slot, value in zip(self.slots, values, strict=True):
            args[slot] = value
        resolved = self._resolved
        if resolved is not None and resolved[0] == self.launcher.generation:
            _, _, keywords, grid, compiled = resolved
            if compiled is not None and _compiled_launches:
                compiled(args, values)
            else:
                self.launcher.autotuner.fn[grid](*args, **keywords)
            return
        args = tuple(args)
        self.launcher.launch(self.grid, args, self.meta)
        config = self.launcher.memoized(args, self.meta)
        if config is not None:
            keywords = {**self.meta, **config}
            grid = tuple(self.grid(keywords))
            compiled = CompiledLaunches.of(self.launcher.autotuner.fn, len(args), keywords, grid)
            self._resolved = (self.launcher.generation, config, keywords, grid, compiled)


def _specialization_key(value) -> tuple:
    """At least what Triton may specialize a compiled kernel on for this argument: a tensor's
    dtype and 16-byte alignment; an int's type (i32, i64 or u64 by its value), == 1 and
    divisibility by 16; for anything else its type (floats are never specialized)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return int, -(2**31) <= value < 2**31, -(2**63) <= value < 2**63, value == 1, value % 16 == 0
    return (type(value), value) if isinstance(value, bool) else (type(value),)


def _compile_settings() -> tuple:
    """Triton's process-wide settings that ``JITFunction.run`` adds to every launch's options, so
    to which compiled kernel it picks: ``debug`` (device asserts), Proton's instrumentation mode,
    and where this triton has them the fpsan casts and a stages-inspection hook (3.9)."""
    compilation, runtime = triton.knobs.compilation, triton.knobs.runtime
    return (
        runtime.debug,
        compilation.instrumentation_mode,
        getattr(compilation, "fpsan_homomorphic_casts", None),
        getattr(runtime, "add_stages_inspection_hook", None),
    )


class CompiledLaunches:
    """The launches of a :class:`BoundLaunch` once resolved, sent to the compiled kernel itself:
    ``CompiledKernel[grid](*arguments)``, Triton's own launch of a compiled kernel, with every
    argument in the kernel's order (the constexprs too, as ``JITFunction.run`` passes them).

    Why: ``JITFunction.run`` binds and specializes all ~30 arguments, builds its cache key and
    checks the kernel's globals on every launch, about 20 of the ~25 µs a launch takes on this
    project's CPU (triton 3.6 and 3.9, bench/host_overhead.py), where a bound launch changes only
    a few arguments from call to call. What a compiled kernel is specialized on
    (:func:`_specialization_key`) is worked out from those per-call values (the fixed ones never
    change) and, with the current device and Triton's settings that enter every launch's options
    (:func:`_compile_settings`: turning on ``TRITON_DEBUG``'s asserts or Proton mid-process takes
    effect), keys the compiled kernels kept here: the first call of each key goes through ``run``,
    which compiles or finds the kernel and returns it, so a call never runs a kernel compiled for
    other argument properties or settings. Only finished ``CompiledKernel`` objects are kept (in
    triton 3.9's ``AsyncCompileMode`` ``run`` may return a future).

    Only for compiled JIT functions (the interpreter's run every call) without pre-run hooks;
    :func:`set_compiled_launches` or ``LORAFAST_COMPILED_LAUNCH=0`` turns it off
    (bench/host_overhead.py --check-launches compares what the driver receives either way).
    """

    def __init__(self, jit_function, keywords: dict, grid: tuple, tail: tuple) -> None:
        self.jit_function = jit_function
        self.keywords, self.grid, self.tail = keywords, grid, tail
        self._kernels: dict[tuple, CompiledKernel] = {}  # (device, settings, per-call specialization) -> kernel

    @classmethod
    def of(cls, jit_function, positional: int, keywords: dict, grid: tuple) -> CompiledLaunches | None:
        """For ``jit_function`` called with ``positional`` arguments and ``keywords``; None where
        launches must go through ``run``: the interpreter, a ``run`` replaced by a tool
        (bench/compile_check.py records launches so), or a parameter that is neither positional
        nor among the keywords (its default would be Triton's to fill in)."""
        from triton.runtime.jit import JITFunction

        if not isinstance(jit_function, JITFunction) or "run" in vars(jit_function):
            return None
        names = jit_function.arg_names[positional:]
        if any(name not in keywords for name in names):
            return None
        grid = (*grid, 1, 1)[:3]  # the compiled kernel's launch reads three dims (run fills in 1s)
        return cls(jit_function, keywords, grid, tuple(keywords[name] for name in names))

    def __call__(self, args: list, values: tuple) -> None:
        jit_function = self.jit_function
        device = triton.runtime.driver.active.get_current_device()
        key = (device, _compile_settings(), *map(_specialization_key, values))
        kernel = self._kernels.get(key)
        if kernel is None or jit_function.pre_run_hooks:
            kernel = jit_function.run(*args, grid=self.grid, warmup=False, **self.keywords)
            if isinstance(kernel, CompiledKernel) and not jit_function.pre_run_hooks:
                self._kernels[key] = kernel
            return
        kernel[self.grid](*args, *self.tail)


def stride_unsafe(t: torch.Tensor) -> bool:
    """Whether a ``BLOCK * stride`` increment over ``t`` could overflow int32 (:func:`stride_safe`)."""
    return t.numel() > 0 and max(t.stride()) * _MAX_BLOCK >= 2**31


def stride_safe(t: torch.Tensor) -> torch.Tensor:
    """Return ``t``, or a contiguous copy if a ``BLOCK * stride`` increment could overflow int32."""
    return t.contiguous() if stride_unsafe(t) else t


# ----------------------------------------------------------------------------- validation


def check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2D, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(named: Sequence[tuple[str, torch.Tensor | None]]) -> torch.device:
    tensors = [(n, t) for n, t in named if t is not None]
    device = tensors[0][1].device
    for name, t in tensors[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {tensors[0][0]} is on {device}: all tensors must share a device"
            )
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "Triton kernels need CUDA tensors; got CPU tensors (set TRITON_INTERPRET=1 to run them "
            "through the Triton interpreter, or use lorafast.reference on CPU)"
        )
    return device


def check_scalars(
    scaling: float, dropout_p: float, seed: int | torch.Tensor, device: torch.device | None = None
) -> None:
    """``seed``: an int in [0, 2**63), or a 1-element int64 tensor on ``device`` (its value is
    not read on the host: that would synchronize)."""
    if not (float(scaling) == float(scaling)) or abs(float(scaling)) == float("inf"):
        raise ValueError(f"scaling must be finite, got {scaling}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or (device is not None and seed.device != device):
            raise ValueError(
                f"a tensor seed must be one int64 element on {device}, got {seed.dtype} {tuple(seed.shape)} on {seed.device}"
            )
    elif not (0 <= int(seed) < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")


# ----------------------------------------------------------------------------- triton helpers


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a 1D program id to (pid_m, pid_n) in GROUP_M-row super-blocks (L2 reuse, as in the
    Triton matmul tutorial)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def drop_threshold(dropout_p: float) -> int:
    """The integer form of p that :func:`keep_mask` compares its 16-bit lanes against:
    ``round(p · 2**16)``, at most ``2**16 - 1`` (keep probability ``1 - threshold / 2**16``,
    within 2**-17 of ``1 - p``; p = 0.1 keeps 0.8999939; the kept elements are scaled by its
    inverse, ``lora_linear.LoraScalars.inv_keep``)."""
    return min(round(float(dropout_p) * 2**16), 2**16 - 1)


def resolved_dropout_p(dropout_p: float) -> float:
    """The dropout probability the kernels realize for ``dropout_p``: ``drop_threshold(p) / 2**16``
    (their masks drop that share, and their kept elements are scaled by ``1 / (1 - it)``). To
    compare the kernels with ``lorafast.reference`` on the kernels' own mask, give the reference this p."""
    return drop_threshold(dropout_p) / 2**16


#: XORed into the kernels' integer seed word by :func:`seed_arguments` and back by :func:`philox_seed`.
SEED_FLIP = 1 << 62
_ZERO_SEEDS: dict[torch.device, torch.Tensor] = {}  # device -> int64 [1] zero: the pointer beside an int seed


def keeps_buffers(device: torch.device) -> bool:
    """Whether a launcher may keep a device buffer between calls on ``device``: off CUDA, and on
    CUDA while the current stream is the default one. Elsewhere it takes fresh tensors per call: a
    CUDA graph is never captured on the default stream (a buffer created while capturing is only
    initialized when the graph replays), and torch.compile's CUDA-graph trees warm up and record
    on a stream of their own, allocating from a private pool whose checkpoints may hand a kept
    buffer's memory to other tensors."""
    return device.type != "cuda" or torch.cuda.current_stream(device) == torch.cuda.default_stream(device)


def seed_arguments(seed: int | torch.Tensor, device: torch.device) -> tuple[int, torch.Tensor]:
    """The kernels' two seed arguments ``(seed_word, seed_ptr)``, whose Philox seed is
    ``seed_word ^ *seed_ptr ^ SEED_FLIP`` (:func:`philox_seed`): an int seed s gives
    ``(s ^ SEED_FLIP, a zero on the device)``, a device tensor seed t gives ``(SEED_FLIP, t)``.

    Why two: a tensor seed keeps a CUDA-graph replay drawing new masks (it reads what the graph's
    RNG wrote that step, where an integer is frozen into the graph), an int seed costs eager calls
    no launch. With one argument that is sometimes an int and sometimes a pointer the kernels had
    two compiled variants, and a graph captured after eager warm-up (int seeds) compiled and
    loaded the pointer variant during capture, which CUDA forbids. Now both take the same one.
    The flip keeps the word outside int32 (Triton types an int argument by its value: i32 or
    i64, another variant), except for int seeds in ``[2**62, 2**62 + 2**31)``: correct, compiled
    apart. The zero is made where :func:`keeps_buffers` allows and kept per (indexed) device; it
    is only ever read, so every stream and graph may use it; before it exists, calls elsewhere
    make their own. ``seed_ptr`` is not specialized on its 16-byte alignment either
    (``do_not_specialize``): a tensor seed that is a view would otherwise be another variant."""
    if isinstance(seed, torch.Tensor):
        return SEED_FLIP, seed
    zero = _ZERO_SEEDS.get(device)
    if zero is None:
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        if keeps_buffers(device):
            _ZERO_SEEDS[device] = zero
    return int(seed) ^ SEED_FLIP, zero


@triton.jit
def philox_seed(seed_word, seed_ptr):
    """The Philox seed of a launch, ``seed_word ^ *seed_ptr ^ SEED_FLIP`` (:func:`seed_arguments`)."""
    return (seed_word ^ tl.load(seed_ptr)) ^ 4611686018427387904  # SEED_FLIP, 2**62


@triton.jit
def keep_mask(seed, offs_m, col_start, threshold, BLOCK_K: tl.constexpr):
    """Dropout keep mask ``m`` of the tile rows ``offs_m`` x columns ``col_start + [0, BLOCK_K)``
    of an [M, K] input (``col_start`` and BLOCK_K multiples of 8).

    Element (row, col) keeps iff its 16-bit lane is ``>= threshold`` (:func:`drop_threshold`):
    half ``col % 2`` (low half first) of word ``(col // 2) % 4`` of ``Philox4x32-10(seed;
    counter = (col // 8, row, 0, 0))``. One Philox evaluation serves eight neighbouring
    columns. The mapping depends on (seed, row, col) only, so every kernel that regenerates the
    mask (F1, small-M forward, B2 backward, the ordered grads, the mask kernel) draws
    bit-identical masks whatever its tiling.

    Why. Philox is ~100 integer instructions per evaluation (the H200 data: one evaluation per
    element, the first design, made dropout cost +89 µs in the forward of K=N=4096, M=8192, F1:
    0.577 vs 0.488 ms at p=0.1 vs 0 -- more than F1's whole read of x, about 16 µs at 4 TB/s).
    Four elements per evaluation (its four words, as PyTorch's CUDA dropout uses
    ``curand_uniform4``) still left F1 bound by that integer work, by this estimate: 33.5 M
    elements / 4 x ~44 instructions (what the +89 µs implies) over 132 SMs x 64 int32 lanes x
    1.98 GHz is ~22 µs against ~15 µs of memory time. Eight per evaluation (~11 µs) hides
    under the read of x and halves the mask work in B2's epilogue; the cost is p's resolution,
    2**-16 instead of 2**-31 (PyTorch's curand_uniform compare resolves 2**-24). The counter
    holds (col // 8, row) as two 32-bit words rather than an int64 element offset: no [BM, BK]
    int64 tile exists and the first Philox round runs on [BM, 1] / [1, BK/8] vectors (the
    int64 tile cost B2 255 registers + 232 B spilled, bench/compile_check.py, sm_90). The words
    are put in column order by ``tl.interleave``s (a join along a new in-thread axis and a
    reshape) and compared as integers (mask or shift, compare), never converted to floats.
    """
    group = (col_start // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.uint32)[None, :]
    row = offs_m.to(tl.uint32)[:, None]
    zero = tl.zeros_like(group)
    w0, w1, w2, w3 = tl.philox(seed, group, row, zero, zero)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # word (c // 2) % 4 of group c // 8
    lanes = tl.interleave(words & 0xFFFF, words >> 16)  # column c: half c % 2 of its word
    return lanes.to(tl.int32) >= threshold


@triton.jit
def split_fp32(v, DT: tl.constexpr, AXIS: tl.constexpr):
    """Split an fp32 tile for dots in the 16-bit dtype DT: ``v ≈ scale · (hi + lo · lo_weight)``.

    fp16: ``scale`` is ``max |v|`` along AXIS, the dot's contracted axis (kept as a size-1 dim; 1
    where that is 0), so it factors out of the dot; ``hi = (v/scale).to(DT)`` and
    ``lo = ((v/scale - hi) · 2**11).to(DT)``, ``lo_weight = 2**-11``. The scaling keeps fp16's
    small exponent range from flushing small values (LoRA B starts at 0, so B and du are tiny
    early in training) into subnormals; the 2**11 keeps lo as far from them as hi, so a value
    down to 2**-14 of its tile's largest keeps all 22 bits of hi + lo. Without it lo, 2**-11 below
    hi, went subnormal first: one token with activations 1e4x the others' (an outlier token) cut
    the others' dB to hi's 11 bits (an error 500x the fp32 reference's).
    bf16 has fp32's exponent range, so there ``scale`` and ``lo_weight`` are 1, ``hi = v.to(DT)``,
    ``lo = (v - hi).to(DT)``: no max-reduction across the tile (a cross-warp reduction through
    shared memory, once per loop iteration in F1, B1 and the small-M kernel), no division.
    hi + lo carries 2 x 11 (fp16) or 2 x 8 (bf16) significant bits.
    """
    if DT == tl.bfloat16:
        hi = v.to(DT)
        lo = (v - hi.to(tl.float32)).to(DT)
        scale = 1.0
        lo_weight = 1.0
    else:
        amax = tl.max(tl.abs(v), axis=AXIS, keep_dims=True)
        scale = tl.where(amax > 0, amax, 1.0)
        w = v / scale
        hi = w.to(DT)
        lo = ((w - hi.to(tl.float32)) * 2048.0).to(DT)  # 2**11: fp16's significand bits
        lo_weight = 0.00048828125  # 2**-11, exact on the fp32 partial sum
    return hi, lo, scale, lo_weight


@triton.jit
def dot_fp32_rhs(a, v, acc, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + a @ v`` for ``a`` [M, C] exact in the dot dtype DT = a.dtype and ``v`` [C, N] fp32
    (or already DT). SPLIT: two dots on :func:`split_fp32`'s lo and hi parts (lo's partial sum
    weighted before hi's joins it), ~fp32-accurate; else one dot on ``v.to(DT)`` (exact when v is
    DT, and for DT = fp32 with "ieee")."""
    if SPLIT:
        hi, lo, scale, lo_weight = split_fp32(v, a.dtype, 0)
        part = tl.dot(a, lo, input_precision=DOT_PREC) * lo_weight
        part = tl.dot(a, hi, part, input_precision=DOT_PREC)
        out = acc + part * scale
    else:
        out = tl.dot(a, v.to(a.dtype), acc, input_precision=DOT_PREC)
    return out


@triton.jit
def dot_fp32_lhs(v, b, acc, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + v @ b`` for ``v`` [M, C] fp32 (or already DT) and ``b`` [C, N] exact in the dot
    dtype DT = b.dtype: :func:`dot_fp32_rhs` with the fp32 operand on the left."""
    if SPLIT:
        hi, lo, scale, lo_weight = split_fp32(v, b.dtype, 1)
        part = tl.dot(lo, b, input_precision=DOT_PREC) * lo_weight
        part = tl.dot(hi, b, part, input_precision=DOT_PREC)
        out = acc + part * scale
    else:
        out = tl.dot(v.to(b.dtype), b, acc, input_precision=DOT_PREC)
    return out


@triton.jit
def dot_fp32_both(u, v, acc, DT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """``acc + u @ v`` for ``u`` [M, C] and ``v`` [C, N] both fp32 (or already DT), with dots in DT.

    SPLIT: both split by :func:`split_fp32` (u per row, v per column) and three dots
    ``hi·hi + hi·lo + lo·hi`` (the two with a lo part summed first, then weighted); the dropped
    lo·lo (~2^-22 of |u||v| for fp16, ~2^-18 for bf16) is far below the DT rounding of the y / dX
    tile this feeds. Else one dot on the DT casts.
    """
    if SPLIT:
        uh, ul, us, lo_weight = split_fp32(u, DT, 1)
        vh, vl, vs, _ = split_fp32(v, DT, 0)
        part = tl.dot(uh, vl, input_precision=DOT_PREC)
        part = tl.dot(ul, vh, part, input_precision=DOT_PREC) * lo_weight
        part = tl.dot(uh, vh, part, input_precision=DOT_PREC)
        out = acc + part * us * vs
    else:
        out = tl.dot(u.to(DT), v.to(DT), acc, input_precision=DOT_PREC)
    return out
