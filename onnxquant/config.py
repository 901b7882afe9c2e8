"""The one source of options: a frozen, validated dataclass. The CLI maps to it one-to-one."""

from __future__ import annotations

from dataclasses import dataclass, field

TARGETS = ("paper", "ort", "tensorrt")
PARTS = ("conv_block", "transformer", "bridge", "softmax")

# Default log2 epsilon, chosen by the sweep in docs/log2_eps.md (top-1 on real images of
# the reference mobilevit_xxs): smaller eps spends codes on probabilities that do not
# matter, larger eps clamps probabilities that do.
DEFAULT_LOG2_EPS = 2.0**-16


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. Defaults reproduce the EfficientQuant paper recipe.

    target: "paper" (weight-only uint8 convs + log2 post-Softmax, runs anywhere),
        "ort" (int8 only where onnxruntime CPU is faster), "tensorrt" (symmetric int8 Q/DQ
        profile TensorRT accepts, log2 op kept for its plugin).
    parts: which parts to quantize (ablation): conv_block, transformer, bridge convs, softmax.
    """

    target: str = "paper"
    weight_bits: int = 8
    weight_symmetric: bool = False
    per_channel: bool = False
    softmax_bits: int = 8
    log2_eps: float = DEFAULT_LOG2_EPS
    parts: frozenset = field(default_factory=lambda: frozenset(PARTS))
    num_calib: int = 32
    batch_size: int = 8

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        for name in ("weight_bits", "softmax_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise ValueError(f"{name} must be in 2..8, got {bits}")
        if not 0 < self.log2_eps < 1:
            raise ValueError(f"log2_eps must be in (0, 1), got {self.log2_eps}")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
        object.__setattr__(self, "parts", frozenset(self.parts))
        if self.num_calib < 1 or self.batch_size < 1:
            raise ValueError("num_calib and batch_size must be >= 1")
