"""``LoraLinear``: a frozen linear layer plus a trainable low-rank update, computed by the fused op."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorafast import ops, reference


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer storing its weight as ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """Modules ``apply_lora`` can adapt: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def unfusable_reason(module: nn.Module) -> str | None:
    """Why ``x Wᵀ + b`` from a linear module's weight and bias (what ``LoraLinear`` and the fused
    op compute, never calling the module) would not be what calling the module computes; None
    when it is. PEFT calls its base layer, so for these lorafast refuses rather than differ: a
    forward of the class's own (an ``nn.Linear`` subclass: quantized layers, custom kernels) or of
    the instance's (accelerate's offloading hooks replace it), hooks, a parametrized weight."""
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has a forward of its own"
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return "its forward is replaced (e.g. by accelerate's offloading hooks)"
    if nn.utils.parametrize.is_parametrized(module):
        return "its weight is parametrized"
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    if any(hooks):
        return "it has hooks"
    return None


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class MergeResidual:
    """What plain unmerging gets wrong, kept at merge time so ``unmerge`` is bit-exact.

    Merging rounds: ``W_m = round(W + ΔW)``, and ``round(W_m − ΔW)`` differs from W wherever that
    rounding lost bits of W. At merge the layer computes that round trip once and keeps only the
    flat positions where its bit pattern differs from W (``indices`` [n], int32 below 2^31
    elements) and W's values there (``values`` [n]); unmerge redoes the same subtraction and
    scatters them back. Sparse beats a dense int8 ulp correction (1 byte per element, and ulp
    gaps across a sign change do not fit): measured on 2048×2048 N(0, 0.02) weights, r=16,
    kaiming A, B ~ N(0, σ), s=2, the share of elements kept and the residual / weight bytes are

    ====== ============= =============== ============== ===============
    dtype  ‖ΔW‖/‖W‖=0.5% ‖ΔW‖/‖W‖=5%     ‖ΔW‖/‖W‖=15%   ‖ΔW‖/‖W‖=51%
    bf16   0.8% / 2.4%   4.7% / 14%      10% / 31%      23% / 68%
    fp16   0.6% / 1.9%   4.6% / 14%      10% / 31%      22% / 67%
    fp32   1.4% / 2.8%   7.5% / 15%      15% / 29%      26% / 52%
    ====== ============= =============== ============== ===============

    ``fingerprint`` identifies the adapter the residual belongs to; a changed adapter makes it void.
    """

    indices: torch.Tensor  # [n] int32 / int64 flat positions in the stored weight
    values: torch.Tensor  # [n] the original weight there, weight dtype
    fingerprint: tuple

    @classmethod
    def capture(cls, round_trip: torch.Tensor, original: torch.Tensor, fingerprint: tuple) -> MergeResidual | None:
        """The residual between ``round(W_m − ΔW)`` and W (same shape and layout), or None if W is not contiguous."""
        if not original.is_contiguous():
            return None
        bits = _SAME_SIZE_INT[original.element_size()]
        differs = round_trip.contiguous().view(bits).reshape(-1) != original.view(bits).reshape(-1)
        index_dtype = torch.int32 if original.numel() < 2**31 else torch.int64
        indices = differs.nonzero().squeeze(1)
        return cls(indices.to(index_dtype), original.reshape(-1)[indices], fingerprint)

    def restore(self, weight: torch.Tensor) -> None:
        """Write the kept original values back into ``weight`` (the layer's contiguous stored W)."""
        weight.view(-1)[self.indices] = self.values

    def nbytes(self) -> int:
        return self.indices.nbytes + self.values.nbytes


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
        reason = unfusable_reason(base_layer)
        if reason is not None:
            raise ValueError(f"LoraLinear cannot wrap this {type(base_layer).__name__}: {reason}")
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
        self._merge_residual: MergeResidual | None = None
        self.disable_adapters = False
        # The original module, kept outside the module tree (not a submodule) for merge_and_unload.
        self._base_layer = (base_layer,)

    @property
    def base_weight(self) -> torch.Tensor:
        """W as ``[out, in]`` (a view for ``Conv1D``)."""
        return self._out_in(self.weight)

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
    def merge(self, keep_residual: bool = True) -> None:
        """W ← W + s·B A in place (fp32 accumulation, one rounding). Merging twice is a no-op.

        With ``keep_residual`` it also keeps the ``MergeResidual`` that makes the next ``unmerge``
        give W back bit for bit (peak extra memory while merging: two copies of this layer's W);
        ``merge_and_unload``, which never unmerges, passes False and costs one delta pass only.
        """
        if self.merged:
            return
        original = self.weight.detach().clone() if keep_residual else None
        self._add_delta(self.base_weight, sign=1.0)
        if keep_residual:
            round_trip = self.weight.detach().clone()
            self._add_delta(self._out_in(round_trip), sign=-1.0)
            self._merge_residual = MergeResidual.capture(round_trip, original, self._lora_fingerprint())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·B A in place, then the merge residual puts back the elements rounding changed.

        Bit-exact when A, B and the scaling are unchanged since ``merge``; otherwise (the adapter
        was edited while merged) it is the plain fp32 subtraction, as PEFT does. No-op if unmerged.
        """
        if not self.merged:
            return
        self._add_delta(self.base_weight, sign=-1.0)
        residual, self._merge_residual = self._merge_residual, None
        if residual is not None and residual.fingerprint == self._lora_fingerprint():
            residual.restore(self.weight.detach())
        self.merged = False

    def merge_residual_bytes(self) -> int:
        """Bytes held by the merge residual (0 when unmerged)."""
        return 0 if self._merge_residual is None else self._merge_residual.nbytes()

    def _lora_fingerprint(self) -> tuple:
        """Changes whenever A, B (in-place version counters) or the scaling change."""
        return (self.lora_A._version, self.lora_B._version, id(self.lora_A), id(self.lora_B), self.scaling)

    def _out_in(self, weight_like: torch.Tensor) -> torch.Tensor:
        """A tensor stored like ``self.weight``, seen as ``[out, in]`` (transposed for ``Conv1D``)."""
        return weight_like.t() if self.fan_in_fan_out else weight_like

    def _add_delta(self, weight: torch.Tensor, sign: float) -> None:
        """``weight`` [out, in] ← weight + sign·s·B A in place (fp32 accumulation, one rounding)."""
        if ops.use_triton(weight.device):
            ops._load_kernels().lora_merge_(weight, self.lora_A, self.lora_B, sign * self.scaling)
        else:
            weight.copy_(reference.merged_weight(weight, self.lora_A, self.lora_B, sign * self.scaling))

    def unload(self) -> nn.Module:
        """The original base module, given this layer's current (possibly merged) weight and bias:
        the layer's own parameters, which a ``load_state_dict(..., assign=True)`` or a dtype
        conversion under ``torch.__future__.set_overwrite_module_params_on_conversion(True)`` may
        have replaced since the base module was wrapped (it is not in the module tree)."""
        base = self._base_layer[0]
        base.weight, base.bias = self.weight, self.bias
        return base

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, merged={self.merged}"
        )
