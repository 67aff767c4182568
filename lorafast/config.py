"""``LoraConfig``: PEFT's LoRA configuration, with the same field names and meanings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")

# Used when ``target_modules`` is None, as PEFT does for these model types.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
}


# PEFT options that change what the adapter computes and that lorafast does not implement: a
# config (an adapter's, or a peft.LoraConfig given to apply_lora) setting any of them is refused rather
# than applied as a model that computes something else.
UNSUPPORTED_PEFT_OPTIONS = (
    "use_dora",
    "lora_bias",
    "layers_to_transform",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "mica",
)


@dataclass
class LoraConfig:
    """Which linear layers get a LoRA adapter, and how.

    ``target_modules``: a list of module names, each matched exactly or as a dotted suffix
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a single string, taken as a
    regex that must match the full module name; ``"all-linear"``, every linear layer except
    the output head; or module classes (``torch.nn.Linear``) matched with ``isinstance``.
    ``exclude_modules`` takes the same forms and wins over ``target_modules``.

    ``scaling`` is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
    ``rank_pattern`` / ``alpha_pattern`` map a regex (matched as a dotted suffix of the module
    name) to the r / lora_alpha of the modules it matches.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    exclude_modules: Any = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, set | tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, set | tuple):
            self.exclude_modules = list(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.{name} must be a positive integer, got {rank!r}")
        for name, alpha in [
            ("lora_alpha", self.lora_alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
                raise ValueError(f"LoraConfig.{name} must be a finite number, got {alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, int | float):
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not (self.init_lora_weights is True or self.init_lora_weights is False or self.init_lora_weights == "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be one of {INIT_MODES}, got {self.init_lora_weights!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                if isinstance(value, str) and value != "all-linear":
                    _compile_regex(name, value)
                continue
            if not isinstance(value, list) or not all(isinstance(t, str | type) for t in value):
                raise ValueError(f"LoraConfig.{name} must be a string, or a list of names or module classes, got {value!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                _compile_regex(f"{name} key", key)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The (r, lora_alpha) for ``module_name``, after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            _pattern_value(self.rank_pattern, module_name, self.r),
            _pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )

    def scaling(self, module_name: str) -> float:
        """``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) for ``module_name``."""
        rank, alpha = self.rank_and_alpha(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("target_modules", "exclude_modules"):
            if isinstance(out[name], list):
                out[name] = [t if isinstance(t, str) else t.__name__ for t in out[name]]
        return out

    @classmethod
    def from_any(cls, config: Any) -> LoraConfig:
        """Accept a ``LoraConfig``, a ``peft.LoraConfig`` or a dict with the same fields."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            source = config
        elif type(config).__name__ == "LoraConfig" and hasattr(config, "lora_alpha"):
            source = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        else:
            raise ValueError(f"expected a lorafast.LoraConfig, a peft.LoraConfig or a dict, got {type(config).__name__}")
        get = source.get if isinstance(config, dict) else lambda option: getattr(config, option, None)
        for option in UNSUPPORTED_PEFT_OPTIONS:
            if get(option):
                raise ValueError(f"{option}={get(option)!r} is a PEFT option lorafast does not implement")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in source.items() if k in known})


def _compile_regex(field_name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"LoraConfig.{field_name} {pattern!r} is not a valid regex: {error}") from None


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule: the first key whose regex matches a dotted suffix of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
