"""On a GPU: the fused forward and backward give the same bits with compiled launches on as with
every launch through ``JITFunction.run`` (``lorafast.kernels.set_compiled_launches``).

Why: the compiled-launch path (kernels/_common.py ``CompiledLaunches``) is checked on the CPU only
against a stand-in driver (``bench/host_overhead.py --check-launches``); the interpreter never
takes it. ``bench/gpu_check.sh`` runs this first and, if it fails, runs its other stages with
``LORAFAST_COMPILED_LAUNCH=0``, so a fault there costs the GPU session one line, not its numbers.

Cases (bf16, fp32 LoRA weights, r = 16, K = N = 256, each kernel's default config:
``LORAFAST_AUTOTUNE=0`` unless set, five compiles): decode (M = 1, the small-M kernel) and
training (M = 128, dropout 0.1) on the paths the benchmarks take by default, the cuBLAS main GEMM
and atomic dA / dB. The JIT-launched results come first, then three calls with compiled launches
(the first of each signature goes through ``run``, the others do not). y, u and dX must match bit
for bit; dA and dB, summed by fp32 atomics in whatever order the programs finish, to 1e-5.

    python bench/compiled_launch_check.py      # exit 0: the same; 1: different or failed; 2: no CUDA
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import import_lorafast  # noqa: E402  (lorafast from the source tree when not installed)


def run_cases(kernels, device: str = "cuda", features: int = 256, tokens: int = 128) -> list[torch.Tensor]:
    """Every output of the check's cases, in order: decode's y and u, training's y, u, dX, dA, dB
    (``tokens`` rows, K = N = ``features``; a CPU test runs them small through the interpreter)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    K = N = features
    weight, lora_A, lora_B = randn(N, K), randn(16, K, dtype=torch.float32), randn(N, 16, dtype=torch.float32)
    outputs = [*kernels.lora_forward(randn(1, K), weight, None, lora_A, lora_B, 2.0, 0.0, 0, path="small_m")]
    x, grad_y, bias = randn(tokens, K), randn(tokens, N), randn(N)
    y, u = kernels.lora_forward(x, weight, bias, lora_A, lora_B, 2.0, 0.1, 1234, path="cublas")
    grads = kernels.lora_backward(grad_y, x, weight, lora_A, lora_B, u, 2.0, 0.1, 1234, main_gemm="cublas")
    return [*outputs, y, u, *grads]


ATOMIC_OUTPUTS = {5, 6}  # dA, dB: fp32 atomics, summed in no fixed order


def differences(got: list[torch.Tensor], expected: list[torch.Tensor]) -> list[int]:
    """The outputs that differ: bit for bit, except dA / dB to 1e-5."""
    return [
        i
        for i, (a, b) in enumerate(zip(got, expected, strict=True))
        if not (torch.allclose(a, b, rtol=1e-5, atol=1e-6) if i in ATOMIC_OUTPUTS else torch.equal(a, b))
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("compiled launch check: no CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("LORAFAST_AUTOTUNE", "0")  # each kernel's default config: one compile each, no timing
    kernels = import_lorafast()[0]
    try:
        kernels.set_compiled_launches(False)
        expected = run_cases(kernels)
        kernels.set_compiled_launches(True)
        for call in range(3):
            different = differences(run_cases(kernels), expected)
            if different:
                print(f"compiled launch check: FAILED, call {call}: outputs {different} differ from JITFunction.run's")
                return 1
    except Exception as error:  # any failure here means: run the GPU check without compiled launches
        print(f"compiled launch check: FAILED with {type(error).__name__}: {error}")
        return 1
    torch.cuda.synchronize()
    print(f"compiled launch check: ok ({len(expected)} outputs the same over 3 calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
