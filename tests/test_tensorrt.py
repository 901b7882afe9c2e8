"""TensorRT tier: the log2 plugin, ahead-of-time engine builds, and the loader workaround.

No GPU needed: TensorRT-RTX parses and builds engines for a set compute capability without
one (DESIGN.md §4). Running an engine needs a GPU and is not tested here.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxquant import functions, quantizers, trt_loader
from onnxquant import tensorrt as qt

HAVE_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx imports")
ROOT = Path(__file__).resolve().parents[1]
PARAMS = quantizers.log2_params(1e-5, 1.0)


def attention_model(n_blocks: int, d: int = 16) -> onnx.ModelProto:
    """``n_blocks`` times MatMul -> Softmax -> Log2QuantDequant -> MatMul, named by role."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(n_blocks):
        for w in (f"k{i}", f"v{i}"):
            inits.append(numpy_helper.from_array(rng.random((d, d), np.float32), w))
        nodes += [
            helper.make_node("MatMul", [cur, f"k{i}"], [f"s{i}"], name=f"qk{i}"),
            helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1, name=f"softmax{i}"),
            helper.make_node(functions.OP_TYPE, [f"p{i}"], [f"pq{i}"], name=f"log2_{i}",
                             domain=functions.DOMAIN, **functions.log2_node_attrs(PARAMS)),
            helper.make_node("MatMul", [f"pq{i}", f"v{i}"], [f"o{i}"], name=f"av{i}"),
        ]
        cur = f"o{i}"
    shape = [1, 4, d, d]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    functions.install(model)
    onnx.checker.check_model(model)
    return model


def _int8_weights(rng, shape):
    w = rng.standard_normal(shape).astype(np.float32)
    p = quantizers.uniform_params(w, 8, symmetric=True, axis=0)
    return quantizers.uniform_quantize(w, p), p.scale, p.zero_point


def qdq_conv_model() -> onnx.ModelProto:
    """x -> Q/DQ -> conv1 (int8 per-channel weights) -> Relu -> conv2 (weight-only DQ)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
    for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3))):
        q, s, z = _int8_weights(rng, shape)
        inits += [numpy_helper.from_array(q, f"{name}_q"),
                  numpy_helper.from_array(s, f"{name}_scale"),
                  numpy_helper.from_array(z, f"{name}_zero")]
    mk = helper.make_node
    nodes = [mk("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q_x"),
             mk("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq_x")]
    for name, src, out in (("w1", "xd", "c1"), ("w2", "r1", "y")):
        nodes.append(mk("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"],
                        [name], axis=0, name=f"dq_{name}"))
        nodes.append(mk("Conv", [src, name], [out], pads=[1, 1, 1, 1],
                        name=f"conv{name[1]}"))
        if out == "c1":
            nodes.append(mk("Relu", ["c1"], ["r1"], name="relu1"))
    graph = helper.make_graph(
        nodes, "qdq_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _save(model, tmp_path, name) -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _run_fresh(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a new Python process (clean plugin registry); it prints one JSON line."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_trt
@pytest.mark.tensorrt
@pytest.mark.parametrize("n_blocks", [1, 3])
def test_plugin_layer_per_log2_node(tmp_path, n_blocks):
    onnx_path = _save(attention_model(n_blocks), tmp_path, "attn.onnx")
    report = qt.build_engine(onnx_path, tmp_path / "attn.engine", use_plugin=True)
    assert report.plugin_layers == n_blocks
    assert report.layer_types["SOFTMAX"] == n_blocks
    assert report.engine_bytes == (tmp_path / "attn.engine").stat().st_size > 0
    assert "plugin layers" in report.table()


@needs_trt
@pytest.mark.tensorrt
def test_without_plugin_the_function_body_is_built(tmp_path):
    onnx_path = _save(attention_model(2), tmp_path, "attn.onnx")
    code = ("import json; from onnxquant import tensorrt as t; "
            f"r = t.build_engine({str(onnx_path)!r}, 'a.engine', use_plugin=False); "
            "print(json.dumps([r.plugin_layers, r.network_layers, r.layer_types]))")
    plugins, layers, types = _run_fresh(code, tmp_path)
    assert plugins == 0 and "PLUGIN_V3" not in types
    assert types["UNARY"] >= 2 * 3  # Log, Round, Exp of each inlined body
    in_process = qt.build_engine(onnx_path, tmp_path / "b.engine", use_plugin=False)
    assert (in_process.plugin_layers, in_process.network_layers) == (0, layers)
    assert qt.build_engine(onnx_path, tmp_path / "c.engine").plugin_layers == 2


@needs_trt
@pytest.mark.tensorrt
def test_plugin_fields_round_trip():
    trt = qt.import_trt()
    creator = qt.register_plugin()
    assert qt.register_plugin() is creator  # idempotent
    attrs = functions.log2_node_attrs(quantizers.log2_params(3e-7, 0.9, bits=6))
    kinds = {"bits": trt.PluginFieldType.INT32, "zero_point": trt.PluginFieldType.INT32,
             "scale": trt.PluginFieldType.FLOAT32, "eps": trt.PluginFieldType.FLOAT32}
    arrays = {n: np.array([attrs[n]], np.int32 if kinds[n] == trt.PluginFieldType.INT32
                          else np.float32) for n in kinds}
    fields = [trt.PluginField(n, a, kinds[n]) for n, a in arrays.items()]
    fields.append(trt.PluginField("plugin_namespace", np.frombuffer(b"onnxquant", np.int8),
                                  trt.PluginFieldType.CHAR))  # tolerated
    plugin = creator.create_plugin("log2", trt.PluginFieldCollection(fields),
                                   trt.TensorRTPhase.BUILD)
    for p in (plugin, plugin.clone()):
        out = {f.name: np.asarray(f.data).reshape(-1)[0] for f in p.get_fields_to_serialize()}
        assert out == {n: a[0] for n, a in arrays.items()}
        assert qt.params_from_fields(p.get_fields_to_serialize()) == functions.params_from_attrs(attrs)


@needs_trt
@pytest.mark.tensorrt
def test_symmetric_int8_qdq_conv_builds(tmp_path):
    report = qt.build_engine(_save(qdq_conv_model(), tmp_path, "qdq.onnx"), tmp_path / "q.engine")
    assert (report.quantize_layers, report.dequantize_layers) == (1, 3)
    assert report.int8_eligible == ["conv1"]
    assert report.weight_only == ["conv2"]


@needs_trt
@pytest.mark.tensorrt
def test_int4_block_wise_linears_build(tmp_path):
    """W4A8 with --weight-block-size: INT4 block-wise weight-only linears beside int8 convs."""
    import graphs

    out = graphs.quantize(graphs.sdpa_model(head=True), graphs.calibration(), target="tensorrt",
                          weight_bits=4, weight_block_size=4).model
    int4 = [i.name for i in out.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(int4) >= 4
    report = qt.build_engine(_save(out, tmp_path, "int4.onnx"), tmp_path / "int4.engine")
    dq = sum(n.op_type == "DequantizeLinear" for n in out.graph.node)
    assert report.dequantize_layers == dq and report.engine_bytes > 0
    assert report.int8_eligible == ["conv_in", "conv_out"]


@needs_trt
@pytest.mark.tensorrt
def test_reference_mobilevit_xxs_float_builds(tmp_path):
    from conftest import need_shared

    onnx_path = need_shared("reference", "mobilevit_xxs.imagenette.onnx")
    report = qt.build_engine(onnx_path, tmp_path / "m.engine")
    assert report.layer_types["CONVOLUTION"] == 35 and report.layer_types["SOFTMAX"] == 9
    assert report.plugin_layers == 0 and report.dequantize_layers == 0
    assert report.engine_bytes > 1_000_000


@needs_trt
@pytest.mark.tensorrt
def test_loader_fix_works_in_a_fresh_process(tmp_path):
    """The parser dlopens libtensorrt_rtx.so on a plugin node; without the fix it aborts."""
    onnx_path = _save(attention_model(1), tmp_path, "attn.onnx")
    code = ("import json; from onnxquant import tensorrt as t; "
            f"r = t.build_engine({str(onnx_path)!r}, 'a.engine'); "
            "print(json.dumps([r.plugin_layers, t.loader_status()]))")
    plugins, status = _run_fresh(code, tmp_path)
    assert plugins == 1, status


def test_read_only_wheel_after_import_gives_one_line(tmp_path, monkeypatch):
    libdir = tmp_path / "tensorrt_rtx_libs"
    libdir.mkdir()
    (libdir / "__init__.py").write_text("")
    (libdir / "libtensorrt_rtx.so.1").write_text("")
    spec = importlib.util.spec_from_file_location("tensorrt_rtx_libs", libdir / "__init__.py")
    monkeypatch.setattr(trt_loader.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_libs", object())  # bindings already loaded

    def refuse(target, link):
        raise PermissionError(link)

    monkeypatch.setattr(trt_loader, "_symlink", refuse)
    monkeypatch.setattr(trt_loader, "_state", {})
    message = trt_loader._prepare_rtx_loader()
    assert "\n" not in message and "LD_LIBRARY_PATH" in message and str(libdir) in message
    monkeypatch.setitem(trt_loader._state, "trt", object())
    with pytest.raises(qt.TensorRTError, match="read-only"):
        trt_loader.check_loader()


def test_missing_tensorrt_is_one_line(monkeypatch):
    monkeypatch.setattr(trt_loader, "_state", {})
    monkeypatch.setattr(trt_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(qt.TensorRTError) as err:
        qt.build_engine("model.onnx")
    assert str(err.value) == qt.NOT_FOUND


def test_cli_without_tensorrt_exits_2(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_engine as cli
    finally:
        sys.path.remove(str(ROOT / "tools"))
    monkeypatch.setattr(trt_loader, "_state", {})
    monkeypatch.setattr(trt_loader.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["model.onnx"]) == 2
    assert capsys.readouterr().err.strip() == qt.NOT_FOUND
