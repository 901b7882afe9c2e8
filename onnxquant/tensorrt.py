"""TensorRT target: ahead-of-time engine builds with the log2 Q/DQ plugin.

    ONNX model --OnnxParser--> network --build_serialized_network--> engine file
         onnxquant.Log2QuantDequant node (plugin_namespace="onnxquant")
           -> plugin layer (PLUGIN_V3) when register_plugin() ran in this process,
           -> the inlined function body (standard layers) otherwise.

Engines build without a GPU when a compute capability is set (DESIGN.md §4); they cannot be
deserialized without one, so the report counts layers of the parsed network, and adds the
engine inspector's per-precision counts only where a GPU is present.
This module is the public face: ``import_trt``, ``register_plugin``, ``log2_qdq_cuda``,
``build_engine``; the plugin lives in ``trt_plugin``, the import/loader fix in ``trt_loader``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .trt_loader import NOT_FOUND, TensorRTError, import_trt, loader_status, logger
from .trt_plugin import (PLUGIN_NAME, PLUGIN_NAMESPACE, create_plugin, log2_qdq_cuda,
                         params_from_fields, plugin_disabled, register_plugin)

__all__ = ["NOT_FOUND", "TensorRTError", "EngineReport", "build_engine", "create_plugin",
           "import_trt", "loader_status", "log2_qdq_cuda", "logger", "params_from_fields",
           "register_plugin"]

_MATH = ("CONVOLUTION", "MATRIX_MULTIPLY", "DECONVOLUTION")
_NOTES = (
    "Layer counts are of the parsed network; TensorRT fuses them. The engine's own layers "
    "(kernel kinds, data types) are in the builder's VERBOSE log, also without a GPU "
    "(tools/engine_table.py); the concrete kernels are picked on the target GPU.",
    "INT8-eligible = conv/matmul whose data and weight inputs both come from DequantizeLinear. "
    "Weight-only Q/DQ gives no INT8 activation kernel: such convs run in float (TensorRT-RTX "
    "dequantizes the weights in a separate kernel); TensorRT-RTX may fuse int8 weights into "
    "a weight-only GEMM.",
)


@dataclass
class EngineReport:
    """What an ahead-of-time build produced and what the network says about precisions."""

    onnx_path: str
    engine_path: str
    engine_bytes: int
    parse_seconds: float
    build_seconds: float
    compute_capability: str
    network_layers: int
    layer_types: dict = field(default_factory=dict)
    plugin_layers: int = 0
    int8_eligible: list = field(default_factory=list)
    weight_only: list = field(default_factory=list)
    engine_precisions: dict | None = None  # from the engine inspector, GPU machines only
    notes: list = field(default_factory=lambda: list(_NOTES))

    @property
    def quantize_layers(self) -> int:
        return self.layer_types.get("QUANTIZE", 0)

    @property
    def dequantize_layers(self) -> int:
        return self.layer_types.get("DEQUANTIZE", 0)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a table."""
        rows = [("onnx", self.onnx_path), ("engine", self.engine_path),
                ("engine size (bytes)", f"{self.engine_bytes:,}"),
                ("parse / build time (s)", f"{self.parse_seconds:.2f} / {self.build_seconds:.2f}"),
                ("compute capability", self.compute_capability),
                ("network layers", str(self.network_layers)),
                (f"{PLUGIN_NAME} plugin layers", str(self.plugin_layers)),
                ("Quantize / Dequantize layers",
                 f"{self.quantize_layers} / {self.dequantize_layers}"),
                ("INT8-eligible conv/matmul", str(len(self.int8_eligible))),
                ("Q/DQ on weights only (no INT8 activations)", str(len(self.weight_only)))]
        top = sorted(self.layer_types.items(), key=lambda kv: -kv[1])[:8]
        rows.append(("layer types (top 8)", ", ".join(f"{k} {v}" for k, v in top)))
        if self.engine_precisions is not None:
            rows.append(("engine layers by precision",
                         ", ".join(f"{k} {v}" for k, v in self.engine_precisions.items())))
        return rows

    def table(self) -> str:
        width = max(len(label) for label, _ in self.rows())
        lines = [f"{label:<{width}}  {value}" for label, value in self.rows()]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _layers(network) -> list:
    return [network.get_layer(i) for i in range(network.num_layers)]


def _is_our_plugin(trt, layer) -> bool:
    if layer.type != trt.LayerType.PLUGIN_V3:
        return False
    layer.__class__ = trt.IPluginV3Layer  # the documented way to reach a layer's subclass
    core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    return (getattr(core, "plugin_name", None) == PLUGIN_NAME
            and getattr(core, "plugin_namespace", None) == PLUGIN_NAMESPACE)


def _classify_math(trt, layers) -> tuple[list, list]:
    """(INT8-eligible, weight-only) conv/matmul layer names, from their inputs' producers:
    eligible when input 0 (data) and input 1 (weights) both come from a Dequantize layer."""
    producer = {layer.get_output(j).name: layer for layer in layers
                for j in range(layer.num_outputs)}

    def from_dq(tensor) -> bool:
        src = producer.get(tensor.name) if tensor is not None else None
        return src is not None and src.type == trt.LayerType.DEQUANTIZE

    eligible, weight_only = [], []
    for layer in layers:
        if layer.type.name not in _MATH or layer.num_inputs < 2:
            continue
        data, weight = from_dq(layer.get_input(0)), from_dq(layer.get_input(1))
        if data and weight:
            eligible.append(layer.name)
        elif weight:
            weight_only.append(layer.name)
    return eligible, weight_only


def _engine_precisions(trt, serialized) -> dict | None:
    """Engine layers by output data type via the engine inspector; None without a GPU."""
    try:
        engine = trt.Runtime(logger()).deserialize_cuda_engine(serialized)
        info = json.loads(engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON))
    except Exception:  # noqa: BLE001 - best effort: any failure means "not available"
        return None
    counts = Counter()
    for layer in info.get("Layers", []):
        outs = layer.get("Outputs", []) if isinstance(layer, dict) else []
        fmt = outs[0].get("Format/Datatype", "?") if outs else "?"
        counts[fmt.split()[-1] if fmt else "?"] += 1
    return dict(counts)


def _has_gpu() -> bool:
    try:
        return ctypes.CDLL("libcuda.so.1").cuInit(0) == 0
    except OSError:
        return False


def _parse(trt, onnx_path: str):
    if not Path(onnx_path).is_file():
        raise TensorRTError(f"{onnx_path}: no such file")
    builder = trt.Builder(logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0] if errors else "no details"
        raise TensorRTError(f"{onnx_path}: TensorRT could not parse it: {first}")
    return builder, network, parser


def _add_profile(builder, network, config, batch: int) -> None:
    """Optimization profile for a dynamic batch dimension: 1 .. ``batch`` (opt = ``batch``)."""
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise TensorRTError(f"input {tensor.name!r} has dynamic dims {shape}: export the "
                                "model with a fixed image size (only the batch may be dynamic)")
        if shape and shape[0] < 0:
            dynamic = True
            profile.set_shape(tensor.name, [1] + shape[1:], [batch] + shape[1:],
                              [batch] + shape[1:])
    if dynamic:
        config.add_optimization_profile(profile)


def _config(trt, builder, int8: bool, compute_capability: str | None):
    """Builder config; ``int8`` sets TensorRT's INT8 flag (only useful with Q/DQ layers)."""
    config = builder.create_builder_config()
    if int8 and hasattr(trt.BuilderFlag, "INT8"):  # TensorRT; RTX has no precision flags
        config.set_flag(trt.BuilderFlag.INT8)
    if compute_capability and hasattr(config, "set_compute_capability"):
        choices = [c for c in dir(trt.ComputeCapability) if c.startswith("SM")]
        if compute_capability not in choices:
            raise TensorRTError(f"compute capability {compute_capability!r}: use one of "
                                f"{', '.join(choices)} (or none for the GPU present)")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, compute_capability), 0)
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    return config


def build_engine(onnx_path, engine_path=None, int8: bool = True,
                 compute_capability: str | None = "SM89", use_plugin: bool = True,
                 batch: int = 1) -> EngineReport:
    """Parse ``onnx_path``, build an engine (ahead of time for ``compute_capability``,
    e.g. "SM89"; None: the GPU present) and save it to ``engine_path`` (default: beside
    the model, ``.engine``). ``use_plugin`` registers the log2 plugin first; without it a
    Log2QuantDequant node is built from its function body (a registered plugin is taken
    out of the registry for the parse). A dynamic batch dimension gets a profile of
    1 .. ``batch``."""
    trt = import_trt()
    logger()
    if use_plugin:
        register_plugin()
    t0 = time.perf_counter()
    with contextlib.nullcontext() if use_plugin else plugin_disabled():
        builder, network, _parser = _parse(trt, onnx_path)
    t1 = time.perf_counter()
    layers = _layers(network)
    has_qdq = any(layer.type == trt.LayerType.DEQUANTIZE for layer in layers)
    config = _config(trt, builder, int8 and has_qdq, compute_capability)
    _add_profile(builder, network, config, batch)
    serialized = builder.build_serialized_network(network, config)
    t2 = time.perf_counter()
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT failed to build an engine (see its log)")
    engine_path = Path(engine_path or Path(onnx_path).with_suffix(".engine"))
    engine_path.write_bytes(bytes(serialized))
    eligible, weight_only = _classify_math(trt, layers)
    return EngineReport(
        str(onnx_path), str(engine_path), engine_path.stat().st_size, t1 - t0, t2 - t1,
        compute_capability or "current GPU", len(layers),
        dict(Counter(layer.type.name for layer in layers)),
        sum(_is_our_plugin(trt, layer) for layer in layers), eligible, weight_only,
        _engine_precisions(trt, serialized) if _has_gpu() else None)

