"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update, computed by the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafast import ops, reference


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer storing its weight as ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """Modules ``apply_lora`` can adapt: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoraLinear(nn.Module):
    """``y = x Wᵀ + bias + s·(dropout(x) Aᵀ) Bᵀ`` with W and bias frozen, A ``[r, in]`` and B ``[out, r]`` trained.

    The base layer's ``weight`` and ``bias`` parameters are registered here as they are (the
    same ``Parameter`` objects, no copy), so the model's state-dict keys for them do not change.
    For a ``Conv1D`` base (weight stored ``[in, out]``) the op sees the transposed view.

    ``merge()`` folds ``s·B A`` into W in place (computed in fp32, rounded once); a merged layer
    runs the base matmul only. ``unmerge()`` takes it out again.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoraLinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        self.weight.requires_grad_(False)
        self.in_features, self.out_features = self.base_weight.shape[1], self.base_weight.shape[0]
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=lora_dtype))
        self.reset_lora_parameters(init_lora_weights)
        self.merged = False
        self.disable_adapters = False
        # The original module, kept outside the module tree (not a submodule) for merge_and_unload.
        self._base_layer = (base_layer,)

    @property
    def base_weight(self) -> torch.Tensor:
        """W as ``[out, in]`` (a view for ``Conv1D``)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisation: A kaiming-uniform(a=√5) or gaussian(std=1/r), B zeros; ``False`` leaves B random."""
        with torch.no_grad():
            if init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
                return
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disable_adapters:
            if self.merged and self.disable_adapters:
                self.unmerge()
            return nn.functional.linear(x, self.base_weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0
        return ops.lora_linear(x, self.base_weight, self.bias, self.lora_A, self.lora_B, self.scaling, dropout_p)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``s·B A`` in fp32, ``[out, in]``."""
        return self.scaling * (self.lora_B.to(torch.float32) @ self.lora_A.to(torch.float32))

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·B A in place (fp32 accumulation, one rounding). Merging twice is a no-op."""
        if self.merged:
            return
        self._add_delta(sign=1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·B A in place. A no-op on an unmerged layer."""
        if not self.merged:
            return
        self._add_delta(sign=-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        weight = self.base_weight
        if ops.use_triton(weight.device):
            ops._load_kernels().lora_merge_(weight, self.lora_A, self.lora_B, sign * self.scaling)
        else:
            weight.copy_(reference.merged_weight(weight, self.lora_A, self.lora_B, sign * self.scaling))

    def unload(self) -> nn.Module:
        """The original base module (holding the current, possibly merged, weights)."""
        return self._base_layer[0]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, merged={self.merged}"
        )
