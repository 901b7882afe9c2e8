"""The ``onnxquant.Log2QuantDequant`` TensorRT plugin (class-based IPluginV3) and its kernel.

    Softmax -> [PLUGIN_V3 "Log2QuantDequant", namespace "onnxquant"] -> MatMul

The parser creates the plugin from the node attributes (int -> INT32, float -> FLOAT32
fields); ``get_fields_to_serialize`` stores them in the engine. The builder never calls
``enqueue`` (DESIGN.md §4); at run time ``enqueue`` runs a CuPy kernel that computes exactly
``quantizers.log2_quantize``/``log2_dequantize``: a float32 log estimate of the code, corrected
by one comparison with the reference's threshold table, then a lookup of the level table
(the same algorithm as the ONNX function body, so codes are exact whatever ``logf`` rounds to). The plugin is Python code, not part of the engine: call
``register_plugin()`` in every process that parses a model or deserializes such an engine.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import functions
from .quantizers import LN2, Log2Params, log2_tables
from .trt_loader import TensorRTError, check_loader, import_trt, logger

PLUGIN_NAME = functions.OP_TYPE
PLUGIN_NAMESPACE = functions.DOMAIN
PLUGIN_VERSION = functions.PLUGIN_VERSION
_INT_FIELDS = ("bits", "zero_point")
_FLOAT_FIELDS = ("scale", "eps")
_STRING_FIELDS = ("plugin_namespace", "plugin_version")  # tolerated if the parser passes them

_state: dict = {}  # compiled kernel, plugin classes, registered creator

# --------------------------------------------------------------------------- CUDA kernel

KERNEL_NAME = "onnxquant_log2_qdq"
KERNEL_SOURCE = r"""
extern "C" __global__ void onnxquant_log2_qdq(
    const float* x, float* y, int* codes, long long n,
    const float* thresholds, const float* levels, float eps, float inv, float z, int qmax)
{
    long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {
        float xm = fmaxf(x[i], eps);
        float t = floorf(logf(xm) * inv + z);       /* true code or one below it */
        int c = (int)fminf(fmaxf(t, 0.0f), (float)qmax);
        int q = c + (xm >= thresholds[c] ? 1 : 0);  /* thresholds[qmax] = +inf */
        if (codes) codes[i] = q;
        y[i] = levels[q];
    }
}
"""
KERNEL_OPTIONS = ("--fmad=false",)
_BLOCK = 256


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise TensorRTError("the Log2QuantDequant kernel needs CuPy on an NVIDIA GPU: "
                            "pip install cupy-cuda12x (or cupy-cuda13x)") from exc
    return cupy


def _kernel():
    """The CuPy RawKernel, compiled on first use."""
    if "kernel" not in _state:
        # no FMA contraction in the float32 code estimate (the table comparison makes the
        # codes exact either way; this keeps the estimate identical across GPUs)
        _state["kernel"] = _cupy().RawKernel(KERNEL_SOURCE, KERNEL_NAME,
                                             options=KERNEL_OPTIONS)
    return _state["kernel"]


def _tables(p: Log2Params):
    """The reference's threshold and level tables on the GPU, cached per parameter set."""
    cache = _state.setdefault("tables", {})
    if p not in cache:
        cp = _cupy()
        cache[p] = tuple(cp.asarray(t) for t in log2_tables(p))
    return cache[p]


def _launch(p: Log2Params, x_ptr: int, y_ptr: int, codes_ptr: int, n: int) -> None:
    """One launch on the current CuPy stream."""
    thresholds, levels = _tables(p)
    blocks = max(1, min((n + _BLOCK - 1) // _BLOCK, 65535))
    args = (np.uint64(x_ptr), np.uint64(y_ptr), np.uint64(codes_ptr), np.int64(n),
            np.uint64(thresholds.data.ptr), np.uint64(levels.data.ptr), np.float32(p.eps),
            np.float32(1.0 / (p.scale * LN2)), np.float32(p.zero_point), np.int32(p.qmax))
    _kernel()((blocks,), (_BLOCK,), args)


def log2_qdq_cuda(x, p: Log2Params):
    """Codes (int32) and dequantized values (float32) of a float32 CuPy array, on the GPU."""
    cp = _cupy()
    x = cp.ascontiguousarray(cp.asarray(x, dtype=cp.float32))
    y = cp.empty_like(x)
    codes = cp.empty(x.shape, dtype=cp.int32)
    _launch(p, x.data.ptr, y.data.ptr, codes.data.ptr, x.size)
    return codes, y


# --------------------------------------------------------------------------- plugin


def params_from_fields(fields) -> Log2Params:
    """Log2Params from plugin fields (node attributes: int -> INT32, float -> FLOAT32)."""
    values = {}
    for f in fields:
        if f.name in _INT_FIELDS + _FLOAT_FIELDS:
            values[f.name] = np.asarray(f.data).reshape(-1)[0].item()
        elif f.name not in _STRING_FIELDS:
            raise TensorRTError(f"{PLUGIN_NAME}: unexpected plugin field {f.name!r}")
    missing = [n for n in _INT_FIELDS + _FLOAT_FIELDS if n not in values]
    if missing:
        raise TensorRTError(f"{PLUGIN_NAME}: missing attributes {missing}; "
                            "set every attribute on the node (functions.log2_node_attrs)")
    return Log2Params(float(np.float32(values["scale"])), int(values["zero_point"]),
                      int(values["bits"]), float(np.float32(values["eps"])))


def _field_arrays(p: Log2Params) -> dict:
    return {"bits": np.array([p.bits], np.int32), "scale": np.array([p.scale], np.float32),
            "zero_point": np.array([p.zero_point], np.int32),
            "eps": np.array([p.eps], np.float32)}


def _plugin_classes():
    """(Plugin, Creator) classes; defined on first use because their bases come from TensorRT."""
    if "classes" in _state:
        return _state["classes"]
    trt = import_trt()
    ftype = {"bits": trt.PluginFieldType.INT32, "zero_point": trt.PluginFieldType.INT32,
             "scale": trt.PluginFieldType.FLOAT32, "eps": trt.PluginFieldType.FLOAT32}

    def collection(arrays: dict):
        return trt.PluginFieldCollection([trt.PluginField(n, a, ftype[n])
                                          for n, a in arrays.items()])

    class Log2QDQPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                        trt.IPluginV3OneRuntime):
        """Y = 2^(s (clamp(round(log2(max(X, eps)) / s) + z, 0, 2^b - 1) - z)), float32."""

        def __init__(self, params: Log2Params):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace = PLUGIN_NAME, PLUGIN_NAMESPACE
            self.plugin_version, self.num_outputs = PLUGIN_VERSION, 1
            self.params = params
            self._fields = _field_arrays(params)  # kept alive while TensorRT reads them

        def get_capability_interface(self, type):
            return self

        def clone(self):
            return Log2QDQPlugin(self.params)

        def get_output_data_types(self, input_types):
            return [trt.DataType.FLOAT]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            return desc.type == trt.DataType.FLOAT and desc.format == trt.TensorFormat.LINEAR

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return collection(self._fields)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            _enqueue(self.params, input_desc[0], inputs[0], outputs[0], stream)

        def destroy(self):
            pass

    class Log2QDQCreator(trt.IPluginCreatorV3One):
        """Creates Log2QDQPlugin from the node attributes (bits, scale, zero_point, eps)."""

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace = PLUGIN_NAME, PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self._defaults = {n: a[:0] for n, a in _field_arrays(Log2Params(1, 0, 8, 1)).items()}
            self.field_names = collection(self._defaults)

        def create_plugin(self, name, fc, phase):
            return Log2QDQPlugin(params_from_fields(fc))

    _state["classes"] = (Log2QDQPlugin, Log2QDQCreator)
    return _state["classes"]


def _enqueue(p: Log2Params, desc, src: int, dst: int, stream: int) -> None:
    """Run the kernel on TensorRT's device buffers (float32, linear), on TensorRT's stream."""
    n = int(np.prod(tuple(desc.dims)))
    with _cupy().cuda.ExternalStream(stream):
        _launch(p, src, dst, 0, n)


def create_plugin(params: Log2Params):
    """A plugin instance as the parser would create it (for tests and tools)."""
    plugin_cls, _ = _plugin_classes()
    return plugin_cls(params)


def register_plugin():
    """Register the Log2QuantDequant creator under namespace "onnxquant" (idempotent).

    Call it before parsing (to get plugin layers) and before deserializing an engine that
    contains them. Returns the creator.
    """
    if "creator" in _state:
        return _state["creator"]
    trt = import_trt()
    logger()  # create the process's logger before any other TensorRT object
    check_loader()  # without it the parser would abort the process on the first plugin node
    registry = trt.get_plugin_registry()
    existing = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    if existing is not None:
        _state["creator"] = existing
        return existing
    _, creator_cls = _plugin_classes()
    creator = creator_cls()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise TensorRTError(f"TensorRT refused to register the {PLUGIN_NAME} plugin creator")
    _state["creator"] = creator
    return creator



@contextlib.contextmanager
def plugin_disabled():
    """Parse without the plugin even where this process registered it (restored after)."""
    creator = _state.get("creator")
    registry = import_trt().get_plugin_registry()
    removed = creator is not None and registry.deregister_creator(creator)
    try:
        yield
    finally:
        if removed:
            registry.register_creator(creator, PLUGIN_NAMESPACE)
