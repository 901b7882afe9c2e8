"""The one source of options: a frozen, validated dataclass. The CLI maps to it one-to-one."""

from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("paper", "ort", "tensorrt")
PARTS = ("conv_block", "transformer", "bridge", "softmax", "linear")
WEIGHT_FORMATS = ("qdq", "folded")
SOFTMAX_QUANTIZERS = ("log2", "log_sqrt2", "adalog", "uniform")  # softmax_quantizers.py
LOG2_BODIES = ("auto", "table", "bitcast")  # functions.py, log2_body.py
CALIB_METHODS = ("minmax", "percentile", "mse", "entropy")  # ranges.py
CONV_KINDS = ("dense", "pointwise", "grouped", "depthwise", "stem")
INT8_KINDS = CONV_KINDS + ("linear",)
RECONSTRUCT_METHODS = ("none", "gptq", "adaround", "brecq", "qdrop", "mgrq")  # reconstruct.py
TORCH_RECONSTRUCT = ("adaround", "brecq", "qdrop", "mgrq")
RECONSTRUCT_DEVICES = ("auto", "cpu", "cuda")  # where the torch methods run
DEFAULT_CALIB = 32  # calibration samples: the paper's
RECONSTRUCT_CALIB = 64  # with --reconstruct (QuantConfig.num_calib)
BIAS_CORRECTION_BITS = (4,)  # weight bits rounded to nearest that get bias correction by default
SEARCH_METRICS = ("mse", "fisher")  # search.py; fisher.py (needs torch)
# Share of the calibration samples held out to judge reconstructed codes when
# reconstruct_holdout is None: the torch methods learn by gradient descent and fit 32 samples
# too well at 3 bits (docs/reconstruct.md; measured before 64 became the default); GPTQ's
# one-pass least-squares fit needs every sample (on 24 of the recognizer's 32 lines it lost
# 21.7 points at W3, on 32 lines 8.7).
HOLDOUT_DEFAULTS = {"gptq": 0.0, **{m: 0.25 for m in TORCH_RECONSTRUCT}}

# What each target quantizes when ``parts`` is not given. The paper quantizes conv weights
# and post-Softmax activations only. On onnxruntime CPU the log2 fake-quant has no int8
# kernel to feed (it only costs time), while int8 linear layers pay (DESIGN.md §7,
# docs/benchmarks.md), hence the ort default. TensorRT wants Q/DQ on the inputs of every
# weighted op, linear layers included (docs/tensorrt_engines.md).
TARGET_PARTS = {
    "paper": frozenset({"conv_block", "transformer", "bridge", "softmax"}),
    "ort": frozenset({"conv_block", "transformer", "bridge", "linear"}),
    "tensorrt": frozenset({"conv_block", "transformer", "bridge", "softmax", "linear"}),
}

# Default log2 epsilon, chosen by the sweep in docs/log2_eps.md (top-1 on real images of
# the reference checkpoints): top-1 agreement with float is flat (99.9-100 %) for every eps
# from 2^-12 to 2^-32 and drops at 2^-8, so the default sits inside the flat region with a
# finer log step (s = 16/255 of an octave) than smaller values give.
DEFAULT_LOG2_EPS = 2.0**-16


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. Defaults: the EfficientQuant recipe (weight-only convs + log2
    post-Softmax) with per-channel weights. The paper's exact recipe is ``per_channel=False``
    (CLI ``--per-tensor``): per-tensor weights lose 20 points of line accuracy on the real
    PP-OCR recognizer (79.7 % vs 99.0 %, float 99.3 %) and are equal within noise on the
    reference checkpoints (docs/default_recipe.md).

    target: "paper" (weight-only uint8 convs + log2 post-Softmax, runs anywhere),
        "ort" (int8 only where onnxruntime CPU is faster), "tensorrt" (symmetric int8 Q/DQ
        profile TensorRT accepts, log2 op kept for its plugin).
    weight_format: how weight-only weights are stored: "qdq" (DequantizeLinear, the
        standard form) or "folded" (Cast -> Sub -> Mul, which onnxruntime constant-folds at
        load, so the small file runs at float speed).
    parts: which parts to quantize (ablation); None = the target's default (TARGET_PARTS).
        conv_block / transformer / bridge convs, softmax (log2), linear (MatMul/Gemm weights).
    ort_int8_kinds: target ort: what gets int8 kernels: conv kinds (dense, pointwise,
        grouped, depthwise, stem) and "linear" (dynamic int8 MatMul). None (default):
        chosen by timing the model on this CPU (kernel_probe.py); the rest is stored
        folded (8-bit file, float speed).
    log2_body: the standard-op body of the log-family Softmax op in the file: "table"
        (Log + table lookups, the model's own opset), "bitcast" (one lookup on the input's
        float bits, 2.7-4x cheaper on onnxruntime CPU; the model is converted to opset 26 and
        checked), "auto" (default): bitcast where the conversion and its checks pass, except
        on target tensorrt (its plugin replaces the body; its parser has no BitCast).
    softmax_quantizer: the post-Softmax quantizer: "log2" (the paper's), "log_sqrt2"
        (RepQ-ViT), "adalog" (searched log base), "uniform" (onnxruntime's; a baseline);
        see softmax_quantizers.py.
    fold_batchnorm: fold inference BatchNormalization into the Conv before it, so the
        quantized weights are the ones that run (passes/fold_batchnorm.py). None (default):
        only where conv weights are quantized per channel (BN gains spread over 60-100x
        crush per-tensor grids: docs/canonicalize.md).
    bias_correction: after the weights are rounded (or reconstructed), move each quantized
        layer's bias by the mean output error its rounding makes on the calibration samples
        (bias_correction.py). None (default): with 4-bit weights rounded to nearest
        (BIAS_CORRECTION_BITS; no reconstruct), where it recovers about half of the loss;
        at 3 bits it cost mobilevit_xxs 4.6 points, at 5-6 and after GPTQ it gained
        nothing measurable (docs/reconstruct_table.md).
    act_bits: bits of the activation Q/DQ (targets ort, tensorrt): 8, or 2..7 on an 8-bit
        container (W6A6: weight_bits=6, act_bits=6).
    calib_method: activation range estimator: minmax, percentile, mse, entropy (ranges.py);
        ``range_method`` is the one in use. None (default): "mse" where weights have 4 bits or fewer and activations are
        quantized (targets ort, tensorrt: W4A8), else "minmax". Measured at W4A8 with GPTQ
        (docs/reconstruct_table.md): the real recognizer loses 2.00 points of line accuracy
        with mse ranges and 4.67 with min-max; the reference checkpoints are within noise
        either way (-0.9 / -0.4 vs -0.4 / -0.2 on 1000 images).
    num_calib: calibration samples (images, lines or array rows); ``calib_samples`` is the
        number in use. None (default): 32, the paper's, and 64 with ``reconstruct``: GPTQ
        fits its error feedback to the calibration samples, and over four draws of them its
        4-bit agreement with float on mobilevitv2_050 rose 1.0-2.2 points from 32 to 64
        (within 0.4 on mobilevit_xxs; 128 added nothing: docs/calib_draws.md), for 1.4x
        the time and memory.
    auto: search, per quantized layer, weight granularity and scheme and the activation
        range estimator by the reconstruction error of its block (search.py, Q-HyViT).
    search_metric: what --auto minimizes per block: "mse" (relative squared error of the
        block outputs) or "fisher" (the same, each element weighted by the squared gradient
        of the model's cross entropy against its own prediction: fisher.py, needs torch).
    reconstruct: how the integer codes of quantized weights are chosen: "none" (round to
        nearest), "gptq" (NumPy, Hessian-guided), "adaround" / "brecq" / "qdrop" / "mgrq"
        (learned rounding in torch, layer- or block-wise); see reconstruct.py. Needs the
        calibration samples themselves (images, .npy or an array).
    weight_block_size: MatMul/Gemm weights get one scale per block of this many input
        channels (K) per output channel instead of one per output channel (DequantizeLinear
        ``block_size``, opset 21; the model is converted). These linear layers are then
        weight-only on every target (TensorRT runs INT4 block-wise weights weight-only).
        Needs "linear" among the quantized parts and weight_format "qdq".
    reconstruct_iters: iteration budget per layer/block of the torch methods (None: the
        method's default).
    reconstruct_device: where the torch methods run: "auto" (CUDA when torch sees a device,
        else the CPU), "cpu" or "cuda". Neither is always faster: on one machine with an
        H200 and 16 CPU cores, MGRQ took 1.18x the CPU's time on the GPU for mobilevitv2_050
        (128 px) and 0.75x for the PP-OCR recognizer (docs/reconstruct.md).
    reconstruct_holdout: fraction of the calibration samples the methods never fit on; the
        codes of each block (round to nearest, GPTQ's start, the learned ones) are judged on
        these (None: 0.25 for the torch methods, 0 for gptq; 0: judge on the fitted samples).
    seed: seeds every random choice of reconstruction (sampling, QDrop masks, init).
    exclude: node names or fnmatch patterns (``"*attn*"``) of Conv/MatMul/Gemm/Softmax
        nodes to keep in float (``onnxquant inspect --sensitivity`` ranks candidates).
    """

    target: str = "paper"
    weight_bits: int = 8
    weight_symmetric: bool = False
    per_channel: bool = True
    weight_format: str = "qdq"
    weight_block_size: int | None = None
    softmax_bits: int = 8
    log2_eps: float = DEFAULT_LOG2_EPS
    softmax_quantizer: str = "log2"
    log2_body: str = "auto"
    parts: frozenset | None = None
    ort_int8_kinds: tuple | None = None
    num_calib: int | None = None
    batch_size: int = 8
    fold_batchnorm: bool | None = None
    bias_correction: bool | None = None
    exclude: tuple = ()
    act_bits: int = 8
    calib_method: str | None = None
    auto: bool = False
    search_metric: str = "mse"
    reconstruct: str = "none"
    reconstruct_iters: int | None = None
    reconstruct_holdout: float | None = None
    reconstruct_device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise ValueError(f"softmax_quantizer must be one of {SOFTMAX_QUANTIZERS}, "
                             f"got {self.softmax_quantizer!r}")
        if self.log2_body not in LOG2_BODIES:
            raise ValueError(f"log2_body must be one of {LOG2_BODIES}, got {self.log2_body!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, "
                             f"got {self.weight_format!r}")
        for name in ("weight_bits", "softmax_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise ValueError(f"{name} must be in 2..8, got {bits}")
        if not 2.0**-120 <= self.log2_eps < 1:  # quantizers.MIN_EPS: float32 tables
            raise ValueError(f"log2_eps must be in [2^-120, 1), got {self.log2_eps}")
        if self.parts is not None:
            if not self.parts:
                raise ValueError(f"parts is empty: nothing would be quantized; choose from {PARTS}")
            unknown = set(self.parts) - set(PARTS)
            if unknown:
                raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
            object.__setattr__(self, "parts", frozenset(self.parts))
        if self.ort_int8_kinds is not None:
            unknown = set(self.ort_int8_kinds) - set(INT8_KINDS)
            if unknown:
                raise ValueError(f"unknown int8 kinds {sorted(unknown)}; choose from {INT8_KINDS}")
            object.__setattr__(self, "ort_int8_kinds", tuple(self.ort_int8_kinds))
        if not 2 <= self.act_bits <= 8:
            raise ValueError(f"act_bits must be in 2..8, got {self.act_bits}")
        if self.calib_method is not None and self.calib_method not in CALIB_METHODS:
            raise ValueError(f"calib_method must be one of {CALIB_METHODS}, "
                             f"got {self.calib_method!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if any(not isinstance(p, str) or not p for p in self.exclude):
            raise ValueError(f"exclude takes non-empty node names or patterns, got {self.exclude!r}")
        if self.search_metric not in SEARCH_METRICS:
            raise ValueError(f"search_metric must be one of {SEARCH_METRICS}, "
                             f"got {self.search_metric!r}")
        if self.search_metric != "mse" and not self.auto:
            raise ValueError("search_metric applies to the --auto search: add --auto (auto=True)")
        if self.reconstruct not in RECONSTRUCT_METHODS:
            raise ValueError(f"reconstruct must be one of {RECONSTRUCT_METHODS}, "
                             f"got {self.reconstruct!r}")
        if self.reconstruct_iters is not None:
            if self.reconstruct not in TORCH_RECONSTRUCT:
                raise ValueError(f"reconstruct_iters applies to {TORCH_RECONSTRUCT}, not "
                                 f"reconstruct={self.reconstruct!r}")
            if self.reconstruct_iters < 1:
                raise ValueError(f"reconstruct_iters must be >= 1, got {self.reconstruct_iters}")
        if self.reconstruct_device not in RECONSTRUCT_DEVICES:
            raise ValueError(f"reconstruct_device must be one of {RECONSTRUCT_DEVICES}, "
                             f"got {self.reconstruct_device!r}")
        if self.reconstruct_device != "auto" and self.reconstruct not in TORCH_RECONSTRUCT:
            raise ValueError(f"reconstruct_device applies to {TORCH_RECONSTRUCT}, not "
                             f"reconstruct={self.reconstruct!r}")
        if self.reconstruct_holdout is not None:
            if self.reconstruct == "none":
                raise ValueError("reconstruct_holdout applies to --reconstruct: choose a method")
            if not 0 <= self.reconstruct_holdout < 1:
                raise ValueError(f"reconstruct_holdout must be in [0, 1), got "
                                 f"{self.reconstruct_holdout}")
        if (self.num_calib is not None and self.num_calib < 1) or self.batch_size < 1:
            raise ValueError("num_calib and batch_size must be >= 1")
        self._refuse_ignored_options()

    @property
    def calib_samples(self) -> int:
        """The calibration samples in use: ``num_calib``, or where that is None, 32 (the
        paper's) and 64 with ``reconstruct``. Resolved on read, like ``range_method``."""
        if self.num_calib is not None:
            return self.num_calib
        return RECONSTRUCT_CALIB if self.reconstruct != "none" else DEFAULT_CALIB

    @property
    def corrects_bias(self) -> bool:
        """``bias_correction``, or where that is None, whether the weights are rounded to
        nearest (no ``reconstruct``) with a bit width in BIAS_CORRECTION_BITS. Resolved on
        read, like ``range_method``."""
        if self.bias_correction is not None:
            return self.bias_correction
        return self.weight_bits in BIAS_CORRECTION_BITS and self.reconstruct == "none"

    @property
    def range_method(self) -> str:
        """The activation range estimator in use: ``calib_method``, or where that is None,
        mse for W4A8-style recipes (4-bit weights, quantized activations), else minmax.
        Resolved on read, so that ``dataclasses.replace`` of the bits or the target moves
        the default with them."""
        if self.calib_method is not None:
            return self.calib_method
        low_bit = self.weight_bits <= 4 and self.target in ("ort", "tensorrt")
        return "mse" if low_bit else "minmax"

    def _refuse_ignored_options(self):
        """An option the chosen target would silently ignore is an error, not a no-op."""
        t = self.target
        if self.ort_int8_kinds is not None and t != "ort":
            raise ValueError(f"ort_int8_kinds applies to target 'ort' only, not {t!r}")
        if t in ("ort", "tensorrt") and (not self.per_channel or self.weight_symmetric):
            raise ValueError(f"target {t!r} fixes the weight scheme (symmetric per-channel int8 "
                             "where int8 runs); per_channel=False/weight_symmetric are for "
                             "'paper'")
        if t == "paper" and (self.act_bits != 8 or self.calib_method not in (None, "minmax")):
            raise ValueError("act_bits/calib_method apply to quantized activations: targets "
                             "'ort' and 'tensorrt' (the paper recipe quantizes weights only)")
        if self.weight_block_size is not None:
            self._check_block_size()
        if t == "tensorrt" and self.weight_format != "qdq":
            raise ValueError("target 'tensorrt' needs weight_format 'qdq' (TensorRT reads Q/DQ)")
        softmax_set = (self.softmax_bits != 8 or self.log2_eps != DEFAULT_LOG2_EPS
                       or self.softmax_quantizer != "log2" or self.log2_body != "auto")
        if softmax_set and "softmax" not in self.active_parts:
            raise ValueError(f"softmax_bits/log2_eps/softmax_quantizer/log2_body set, but target "
                             f"{t!r} with parts {sorted(self.active_parts)} leaves the Softmax "
                             "float")
        if self.log2_body != "auto" and self.softmax_quantizer == "uniform":
            raise ValueError("log2_body applies to the log quantizers; softmax_quantizer "
                             "'uniform' is standard Q/DQ")
        if self.log2_body == "bitcast" and t == "tensorrt":
            raise ValueError("log2_body 'bitcast' is for onnxruntime: TensorRT's parser has no "
                             "BitCast (its plugin replaces the op); use 'table' or 'auto'")

    def _check_block_size(self):
        b, t = self.weight_block_size, self.target
        if b < 2:
            raise ValueError(f"weight_block_size must be >= 2, got {b}")
        if t == "ort":
            raise ValueError("weight_block_size applies to DequantizeLinear weights: targets "
                             "'paper' and 'tensorrt' (target 'ort' runs linear layers in "
                             "dynamic int8 or folds them to float)")
        if "linear" not in self.active_parts:
            raise ValueError(f"weight_block_size applies to MatMul/Gemm weights, but parts "
                             f"{sorted(self.active_parts)} leave them float: add 'linear'")
        if self.weight_format != "qdq" or not self.per_channel:
            raise ValueError("weight_block_size needs weight_format 'qdq' and per-channel "
                             "weights (blocks refine each output channel's scale)")
        if t == "tensorrt" and self.weight_bits > 4:
            raise ValueError("target 'tensorrt' takes block-wise weights as INT4 only: "
                             f"weight_bits <= 4 with weight_block_size, got {self.weight_bits}")

    @property
    def holdout(self) -> float:
        """reconstruct_holdout, or the method's default (HOLDOUT_DEFAULTS) where None."""
        if self.reconstruct_holdout is not None:
            return self.reconstruct_holdout
        return HOLDOUT_DEFAULTS.get(self.reconstruct, 0.0)

    @property
    def active_parts(self) -> frozenset:
        return TARGET_PARTS[self.target] if self.parts is None else self.parts
