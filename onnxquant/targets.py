"""Targets as data: what each deployment target quantizes, in which formats, under which
constraints. select_sites.py reads the ``where`` fields, decide.py the ``how`` fields; no
other module branches on the target name.

    paper     weight-only convs (the user's scheme) + log2 post-Softmax: EfficientQuant
    ort       int8 kernels only on the layer kinds that are faster on this CPU (QLinearConv:
              7-bit symmetric per-channel weights, uint8 activations, int32 bias; linear
              MatMuls dynamic int8), every other weight 8-bit folded (DESIGN.md §7)
    tensorrt  symmetric int8 Q/DQ on the inputs and weights of every conv and linear layer,
              residual skip inputs, log2 op for the plugin (DESIGN.md §4: TensorRT rejects
              uint8 and non-zero zero points; INT8 needs activations and weights together)
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import QuantConfig


@dataclass(frozen=True)
class TargetProfile:
    name: str
    # where (select_sites.py)
    int8_convs: str  # "none" | "all" | "kinds" (config.ort_int8_kinds)
    int8_conv_outputs: bool  # QLinearConv form: Q/DQ on the output + int32 bias
    int8_linears: str  # "none" | "static" (Q/DQ on the input) | "dynamic" (if 'linear' kind)
    residual_skips: bool  # Q/DQ on the skip input of Conv + skip Adds
    # how (decide.py); None = the user's choice from QuantConfig
    weight_symmetric: bool | None
    weight_per_channel: bool | None
    weight_format: str | None
    int8_weight_bits: int | None  # weights of int8-kernel convs (None: config.weight_bits)
    activation_symmetric: bool
    # constraints the output must satisfy (checked in decide.py)
    symmetric_only: bool = False  # no uint8 / non-zero zero points anywhere
    # storage (api.py): which weight codes of 4 bits or fewer are written as INT4/UINT4
    int4_weights: str = "all"  # "all" DequantizeLinear weights | "block_wise" only

    def weight_scheme(self, cfg: QuantConfig) -> dict:
        """Scheme of weight-only weights: bits, symmetric, per channel, storage format."""
        sym = cfg.weight_symmetric if self.weight_symmetric is None else self.weight_symmetric
        per_channel = cfg.per_channel if self.weight_per_channel is None else self.weight_per_channel
        return {"bits": cfg.weight_bits, "symmetric": sym, "per_channel": per_channel,
                "fmt": cfg.weight_format if self.weight_format is None else self.weight_format}

    def describe(self, cfg: QuantConfig) -> str:
        """One line for the summary: the recipe as applied."""
        parts = ",".join(p for p in ("conv_block", "transformer", "bridge", "softmax", "linear")
                         if p in cfg.active_parts)
        softmax = (f"softmax {cfg.softmax_quantizer} {cfg.softmax_bits}-bit eps={cfg.log2_eps:g}; "
                   if "softmax" in cfg.active_parts else "")
        acts = (f"activations {cfg.act_bits}-bit {cfg.range_method}"
                + (", searched per layer (--auto)" if cfg.auto else ""))
        if self.int8_convs == "kinds":
            kinds = ", ".join(cfg.ort_int8_kinds or ()) or "nothing"
            return (f"target={self.name}: int8 on {kinds} ({acts}); other weights "
                    f"{cfg.weight_bits}-bit folded; parts {parts}")
        w = self.weight_scheme(cfg)
        scheme = "symmetric" if w["symmetric"] else "asymmetric"
        grain = "per-channel" if w["per_channel"] else "per-tensor"
        if cfg.weight_block_size:
            grain += f", linear layers per block of {cfg.weight_block_size} (weight-only)"
        if self.int8_convs == "all":
            return (f"target={self.name}: int8 symmetric Q/DQ (weights {cfg.weight_bits}-bit "
                    f"{grain}, {acts}), {softmax}parts {parts}")
        searched = ", searched per layer (--auto)" if cfg.auto else ""
        if cfg.reconstruct != "none":
            searched += f", codes by {cfg.reconstruct}"
        return (f"target={self.name}: weights {cfg.weight_bits}-bit {scheme} {grain} "
                f"({w['fmt']}{searched}), {softmax}parts {parts}")


PROFILES = {
    "paper": TargetProfile("paper", int8_convs="none", int8_conv_outputs=False,
                           int8_linears="none", residual_skips=False, weight_symmetric=None,
                           weight_per_channel=None, weight_format=None, int8_weight_bits=None,
                           activation_symmetric=False),
    "ort": TargetProfile("ort", int8_convs="kinds", int8_conv_outputs=True,
                         int8_linears="dynamic", residual_skips=False, weight_symmetric=False,
                         weight_per_channel=True, weight_format="folded",
                         # AVX2 u8s8 kernels can saturate 16-bit sums with 8-bit weights
                         int8_weight_bits=7, activation_symmetric=False,
                         int4_weights="block_wise"),
    "tensorrt": TargetProfile("tensorrt", int8_convs="all", int8_conv_outputs=False,
                              int8_linears="static", residual_skips=True, weight_symmetric=True,
                              weight_per_channel=True, weight_format=None, int8_weight_bits=None,
                              activation_symmetric=True, symmetric_only=True,
                              # TensorRT takes INT4 as weight-only block-wise layers only
                              int4_weights="block_wise"),
}


def profile(cfg: QuantConfig) -> TargetProfile:
    return PROFILES[cfg.target]
