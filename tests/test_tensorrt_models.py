"""TensorRT engines of the hybrid zoo: float, paper recipe and the tensorrt target.

For mobilevit_xxs, mobilevitv2_050 (reference checkpoints, 128 px), efficientformer_l1,
efficientformerv2_s0 and tiny_vit_5m_224 (timm zoo exports, 224 px) every engine is built
once per model (module-scoped fixture), ahead of time for SM89 with no GPU (DESIGN.md §4):

    float           builds, no Q/DQ, no plugin layer
    paper           uint8 asymmetric weights: TensorRT's parser rejects them (UINT8)
    paper-sym       int8 symmetric per-channel weights, weight-only: builds, 0 INT8-eligible
                    convs (every Conv weight-only), plugin layers == Log2QuantDequant nodes
    tensorrt        every Conv INT8-eligible (data and weights from Dequantize layers),
                    plugin layers == log2 nodes; onnxruntime runs the same file; in a fresh
                    process the engine's own layer list (builder log) shows every Conv
                    running with int8 input, and the build without the plugin also succeeds

Running the engines needs an RTX GPU and is not tested here (docs/tensorrt_engines.md).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxquant
from onnxquant import QuantConfig, functions
from onnxquant import tensorrt as qt

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))
pytestmark = [pytest.mark.tensorrt,
              pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx "
                                 "imports (pip install tensorrt-rtx)")]

REFERENCE = ("mobilevit_xxs", "mobilevitv2_050")  # shared Imagenette checkpoints, 128 px
ZOO = ("efficientformer_l1", "efficientformerv2_s0", "tiny_vit_5m_224")  # timm, 224 px
CC = "SM89"
NUM_CALIB = 4


def _source(name: str, tmp: Path) -> Path:
    """A private copy of the float model (other jobs rewrite the shared zoo cache)."""
    from conftest import REFERENCE as REF_DIR

    ref = REF_DIR / f"{name}.imagenette.onnx"
    if name in REFERENCE and ref.is_file():
        origin = ref
    else:
        pytest.importorskip("timm", reason="the zoo models are exported from timm")
        from onnxquant.models.export import zoo_cache

        origin = zoo_cache(name, input_size=128) if name in REFERENCE else zoo_cache(name)
    dst = tmp / f"{name}.float.onnx"
    shutil.copyfile(origin, dst)
    return dst


def _counts(model: onnx.ModelProto) -> dict:
    """Conv and log2 counts, and the convs/linears whose data input is dequantized (int8)."""
    nodes = model.graph.node
    producers = {o: n.op_type for n in nodes for o in n.output}

    def int8(n):
        return all(producers.get(t) == "DequantizeLinear" for t in n.input[:2])

    return {"conv": sum(n.op_type == "Conv" for n in nodes),
            "int8_conv": sum(n.op_type == "Conv" and int8(n) for n in nodes),
            "int8_linear": sum(n.op_type in ("MatMul", "Gemm") and int8(n) for n in nodes),
            "qdq_skip": sum(n.op_type == "Add" and any(producers.get(t) == "DequantizeLinear"
                                                       for t in n.input) for n in nodes),
            "log2": sum(n.op_type == functions.OP_TYPE and n.domain == functions.DOMAIN
                        for n in nodes)}


def _quantize(src: Path, cfg: QuantConfig, calib: np.ndarray, dst: Path):
    model = onnxquant.quantize(str(src), cfg, calibration=calib)
    onnx.save(model, str(dst))
    return dst, _counts(model)


def _fresh_build(onnx_path: Path, engine: Path, use_plugin: bool) -> dict:
    """tools/engine_table.py --one: a build in a new process whose first TensorRT logger
    keeps the builder's engine layer list (and whose plugin registry is clean)."""
    cmd = [sys.executable, str(ROOT / "tools" / "engine_table.py"), "--one", str(onnx_path),
           str(engine), "--compute-capability", CC] + ([] if use_plugin else ["--no-plugin"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TALKING_HEADS = {"efficientformerv2_s0": 4}  # 4 attentions: the Conv right after the Softmax


@pytest.fixture(scope="module", params=REFERENCE + ZOO)
def built(request, tmp_path_factory):
    """Every model, quantized output and engine report of one model, built once."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    src = _source(name, tmp)
    float_model = onnx.load(str(src))
    size = float_model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    calib = np.random.default_rng(0).standard_normal((NUM_CALIB, 3, size, size)).astype(np.float32)
    out = {"name": name, "size": size, "float": (src, _counts(float_model))}
    for variant, cfg in (
            ("paper", QuantConfig(num_calib=NUM_CALIB, batch_size=NUM_CALIB)),
            ("paper-sym", QuantConfig(weight_symmetric=True, per_channel=True,
                                      num_calib=NUM_CALIB, batch_size=NUM_CALIB)),
            ("tensorrt", QuantConfig(target="tensorrt", num_calib=NUM_CALIB,
                                     batch_size=NUM_CALIB))):
        out[variant] = _quantize(src, cfg, calib, tmp / f"{name}.{variant}.onnx")
    reports = {}
    for variant in ("float", "paper-sym", "tensorrt"):
        path = out[variant][0]
        reports[variant] = qt.build_engine(path, path.with_suffix(".engine"),
                                           compute_capability=CC, use_plugin=True)
    out["reports"] = reports
    return out


def test_float_engine_builds(built):
    report, counts = built["reports"]["float"], built["float"][1]
    assert report.engine_bytes > 100_000
    assert report.layer_types["CONVOLUTION"] == counts["conv"]
    assert report.plugin_layers == 0 and report.dequantize_layers == 0
    assert report.int8_eligible == [] and report.weight_only == []


def test_paper_recipe_uint8_weights_are_rejected(built):
    """The paper's uint8 asymmetric weights: TensorRT accepts only symmetric int8."""
    path, counts = built["paper"]
    assert counts["conv"] > 0
    with pytest.raises(qt.TensorRTError, match=r"DequantizeLinear.*UINT8"):
        qt.build_engine(path, path.with_suffix(".engine"), compute_capability=CC)


def test_paper_symmetric_weights_are_weight_only(built):
    report, counts = built["reports"]["paper-sym"], built["paper-sym"][1]
    assert report.plugin_layers == counts["log2"] > 0
    assert len(report.int8_eligible) == 0
    convs = [n for n in report.weight_only if n in _conv_names(built["paper-sym"][0])]
    assert len(convs) == counts["conv"]
    assert report.quantize_layers == 0


def test_tensorrt_target_every_conv_is_int8_eligible(built):
    path, counts = built["tensorrt"]
    report = built["reports"]["tensorrt"]
    assert report.plugin_layers == counts["log2"] > 0
    conv_names = _conv_names(path)
    eligible = [n for n in report.int8_eligible if n in conv_names]
    # every conv but those reading a log2-quantized Softmax (EfficientFormer v2 talking heads)
    assert len(eligible) == counts["int8_conv"] == len(conv_names) - TALKING_HEADS.get(
        built["name"], 0)
    weight_only = [n for n in report.weight_only if n in conv_names]
    assert len(weight_only) == TALKING_HEADS.get(built["name"], 0)
    # one Q per distinct quantized input (conv and linear inputs, residual skip inputs)
    assert 0 < report.quantize_layers <= (counts["int8_conv"] + counts["int8_linear"]
                                          + counts["qdq_skip"])


def test_onnxruntime_runs_the_tensorrt_output(built):
    """The log2 op is a model-local function: stock onnxruntime runs the TensorRT-bound file."""
    import onnxruntime as ort

    size = built["size"]
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    outs = {}
    for variant in ("float", "tensorrt"):
        sess = ort.InferenceSession(str(built[variant][0]), providers=["CPUExecutionProvider"])
        outs[variant] = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert outs["tensorrt"].shape == outs["float"].shape
    assert np.isfinite(outs["tensorrt"]).all()


def test_tensorrt_engine_layers_run_convs_in_int8(built, tmp_path):
    """Fresh processes: with the plugin, the engine's layer list (printed by the builder,
    no GPU needed) has every Conv on int8 input and one custom layer per log2 node;
    without the plugin the function bodies are built instead and the engine still builds."""
    path, counts = built["tensorrt"]
    with_plugin = _fresh_build(path, tmp_path / "p.engine", use_plugin=True)
    body = _fresh_build(path, tmp_path / "b.engine", use_plugin=False)
    assert with_plugin["ok"] and body["ok"]
    assert with_plugin["plugin_layers"] == counts["log2"] and body["plugin_layers"] == 0
    assert body["int8_convs"] == counts["int8_conv"]
    if "engine_layers" not in with_plugin:
        pytest.skip("this TensorRT prints no engine layer list at build time")
    assert with_plugin["engine_custom"] == counts["log2"] and body["engine_custom"] == 0
    assert with_plugin["engine_int8_convs"] == counts["int8_conv"]
    # every linear layer (Q/DQ on input and weight) becomes an int8 GEMM in the engine
    assert with_plugin["engine_int8_matmuls"] == counts["int8_linear"]


_CONVS: dict = {}


def _conv_names(path: Path) -> set:
    if path not in _CONVS:
        model = onnx.load(str(path), load_external_data=False)
        _CONVS[path] = {n.name for n in model.graph.node if n.op_type == "Conv"}
    return _CONVS[path]
