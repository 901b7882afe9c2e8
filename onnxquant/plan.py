"""The plan: what the passes marked for quantization, and the statistics calibration fills.

Passes mark the sites (where); decide.py writes a QuantSpec per quantized tensor (how);
``emit.py`` writes exactly those specs. Nothing here creates Q/DQ nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .config import QuantConfig
from .spec import QuantSpec

ROLES = ("conv_block", "transformer", "bridge")


@dataclass
class AttentionSite:
    """One Softmax that produces attention probabilities."""

    softmax: str  # node name
    output: str  # tensor that gets the log2 Q/DQ
    pattern: str  # which topology matched (see passes/find_attention.py)
    nodes: tuple = ()  # names of the matched pattern nodes, in order
    quantize: bool = True
    spec: QuantSpec | None = None  # decide.py: the post-Softmax quantizer


@dataclass
class ConvSite:
    """One Conv with a constant weight."""

    node: str
    weight: str  # initializer name (after following Identity)
    input: str  # activation tensor (input 0)
    output: str = ""
    role: str = "conv_block"  # one of ROLES
    kernel: tuple = ()
    group: int = 1
    cin: int = 0
    cout: int = 0
    stem: bool = False  # reads the graph input (the image)
    quantize: bool = True
    int8_input: bool = False  # targets ort/tensorrt: Q/DQ on the activation too
    int8_output: bool = False  # target ort: Q/DQ on the output + int32 bias (QLinearConv)
    weight_spec: QuantSpec | None = None  # decide.py fills these three
    input_spec: QuantSpec | None = None
    output_spec: QuantSpec | None = None

    @property
    def depthwise(self) -> bool:
        """One input channel per group (channel multipliers included, e.g. FastViT 48->96)."""
        return self.group > 1 and self.cin == 1

    @property
    def kind(self) -> str:
        """stem / depthwise / grouped / pointwise / dense kxk: what int8 speed depends on."""
        if self.stem:
            return "stem"
        if self.depthwise:
            return "depthwise"
        if self.group > 1:
            return "grouped"
        return "pointwise" if all(k == 1 for k in self.kernel) else "dense"


@dataclass
class LinearSite:
    """A MatMul/Gemm with a constant 2-D weight (transformer linear layers, heads)."""

    node: str
    op: str  # MatMul or Gemm
    weight: str  # initializer name
    input: str
    quantize: bool = False
    dynamic: bool = False  # target ort: dynamic int8 (DynamicQuantizeMatMul)
    int8_input: bool = False  # target tensorrt: Q/DQ on the activation too
    weight_spec: QuantSpec | None = None  # decide.py fills these two
    input_spec: QuantSpec | None = None


@dataclass
class ResidualSite:
    """An Add joining a Conv output with a skip connection (``skip``: the other input)."""

    node: str
    skip: str
    conv: str  # the Conv producing the other input
    quantize: bool = False  # target tensorrt: Q/DQ on the skip input (when the conv is int8)
    spec: QuantSpec | None = None


@dataclass
class Plan:
    attention: list = field(default_factory=list)  # AttentionSite
    convs: list = field(default_factory=list)  # ConvSite
    linears: list = field(default_factory=list)  # LinearSite
    residuals: list = field(default_factory=list)  # ResidualSite
    unmatched_softmax: list = field(default_factory=list)  # (node name, reason)
    notes: list = field(default_factory=list)  # lines for the summary
    canonical: dict = field(default_factory=dict)  # what canonicalization changed, by kind
    blocks: list = field(default_factory=list)  # Block (onnxquant/blocks.py): regions + boundaries
    choices: list = field(default_factory=list)  # search.Choice: what --auto chose and why
    reconstruction: list = field(default_factory=list)  # reconstruct.BlockResult per block
    reconstruction_check: object = None  # reconstruct.ModelCheck: whole-model acceptance
    stats: dict = field(default_factory=dict)  # tensor name -> (min, max)

    def calibration_tensors(self) -> list:
        """Tensors whose min/max the emission needs, in a stable order."""
        names = [a.output for a in self.attention if a.quantize]
        names += [c.input for c in self.convs if c.quantize and c.int8_input]
        names += [c.output for c in self.convs if c.quantize and c.int8_output]
        names += [s.input for s in self.linears if s.quantize and s.int8_input]
        names += [r.skip for r in self.residuals if r.quantize]
        return list(dict.fromkeys(names))

    def role_counts(self) -> dict:
        counts = {r: 0 for r in ROLES}
        for c in self.convs:
            counts[c.role] += 1
        return counts


@dataclass
class PassContext:
    config: QuantConfig
    plan: Plan = field(default_factory=Plan)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("onnxquant"))
