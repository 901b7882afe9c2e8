"""Inputs users really have: a correct output, or one line naming what to fix, exit 2,
nothing written and the input (and its external data) untouched."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from PIL import Image

from onnxquant.cli import main
from graphs import Builder, calibration, run_ort
from test_cli import _fails as fails


def _model(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    y = b.conv("conv_in", "x", 4, 8, k=3)
    return b.build({b.conv("conv_out", b.sdpa("attn", y), 8, 4): "float[N,4,4,4]"})


def _rgb_model(seed: int = 0) -> onnx.ModelProto:
    """``_model`` on a 3-channel input, for calibration from image folders."""
    b = Builder(seed, channels=3)
    y = b.conv("conv_in", "x", 3, 8, k=3)
    return b.build({b.conv("conv_out", b.sdpa("attn", y), 8, 4): "float[N,4,4,4]"})


def _save(model, path, external=False):
    onnx.save_model(model, str(path), save_as_external_data=external, size_threshold=0,
                    location=f"{path.name}.data" if external else None)
    return path


def _snapshot(folder):
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, tmp_path, argv, *words):
    """Exit 2, one line naming ``words``, no new files, inputs unchanged."""
    before = _snapshot(tmp_path)
    err = fails(capsys, argv, *words)
    assert _snapshot(tmp_path) == before
    return err


def _calib(tmp_path, array):
    path = tmp_path / "calib.npy"
    np.save(path, array)
    return str(path)


def test_half_precision_model(tmp_path, capsys):
    model = _model()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    src = tmp_path / "m.onnx"
    onnx.save(model, src)  # not even valid as fp16 (fp32 weights): refused before anything
    _refused(capsys, tmp_path, [str(src), str(tmp_path / "q.onnx"), "-q"], "float32")


def test_uint8_image_input(tmp_path, capsys):
    model = _model()
    model.graph.node.insert(0, helper.make_node("Mul", ["x8f", "inv255"], ["x"], name="normalize"))
    model.graph.node.insert(0, helper.make_node("Cast", ["x8"], ["x8f"], name="to_float", to=1))
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1 / 255), "inv255"))
    model.graph.input[0].name = "x8"
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    onnx.checker.check_model(model, full_check=True)
    src = _save(model, tmp_path / "m.onnx")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 4)).astype(np.uint8)
    out = tmp_path / "q.onnx"
    assert main([str(src), str(out), "--calib", _calib(tmp_path, pixels), "-q"]) == 0
    capsys.readouterr()
    (y,), (yq,) = run_ort(model, {"x8": pixels}), run_ort(onnx.load(out), {"x8": pixels})
    assert np.abs(y - yq).max() / np.abs(y).max() < 0.05
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    out.unlink()
    _refused(capsys, tmp_path, [str(src), str(out), "--calib", str(folder), "-q"], "uint8", ".npy")


def test_all_nan_calibration(tmp_path, capsys):
    src = _save(_model(), tmp_path / "m.onnx")
    calib = _calib(tmp_path, np.full((4, 4, 4, 4), np.nan, np.float32))
    _refused(capsys, tmp_path, [str(src), str(tmp_path / "q.onnx"), "--calib", calib, "-q"],
             "NaN")


def test_external_data_offset_past_the_end(tmp_path, capsys):
    src = _save(_model(), tmp_path / "m.onnx", external=True)
    model = onnx.load(str(src), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "conv_in_w")
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(10**7)
    onnx.save(model, str(src))
    _refused(capsys, tmp_path, [str(src), str(tmp_path / "q.onnx"), "-q"], "conv_in_w")


def test_output_onto_the_inputs_external_data(tmp_path, capsys):
    src = _save(_model(), tmp_path / "m.onnx", external=True)
    data = tmp_path / "m.onnx.data"
    _refused(capsys, tmp_path, [str(src), str(data), "-q"], "external data")
    data_named = tmp_path / "m"  # output m -> its own data file would be m.data: allowed
    assert main([str(src), str(data_named), "--calib", _calib(tmp_path, calibration()), "-q"]) == 0


def test_decompression_bomb_in_the_calibration_folder(tmp_path, capsys):
    src = _save(_rgb_model(), tmp_path / "m.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    png = (folder / "ok.png").read_bytes()
    # rewrite the IHDR width/height to 30000 x 30000 (CRC left stale: PIL checks size first)
    bomb = png[:16] + (30000).to_bytes(4, "big") * 2 + png[24:]
    (folder / "bomb.png").write_bytes(bomb)
    _refused(capsys, tmp_path, [str(src), str(tmp_path / "q.onnx"), "--calib", str(folder),
                                "-q", "--input-size", "4", "--crop-pct", "1"], "bomb.png")


def test_conv_with_an_empty_bias_name(tmp_path, capsys):
    model = _model()
    conv = next(n for n in model.graph.node if n.name == "conv_out")
    conv.input[2] = ""
    src = _save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    argv = [str(src), str(out), "--calib", _calib(tmp_path, calibration()), "-q"]
    for target in ("paper", "ort", "tensorrt"):
        extra = ["--ort-int8-kinds", "pointwise"] if target == "ort" else []
        assert main([*argv, "--target", target, *extra]) == 0
        x = calibration(seed=2)
        (y,), (yq,) = run_ort(model, {"x": x}), run_ort(onnx.load(out), {"x": x})
        # ort: uint8 activations + 7-bit weights on a random 4x4 graph: measured 0.11
        assert np.abs(y - yq).max() / np.abs(y).max() < (0.2 if target == "ort" else 0.05), target
    capsys.readouterr()


def test_op_from_an_unknown_domain(tmp_path, capsys):
    model = _model()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    relu = helper.make_node("FancyRelu", ["conv_out_out"], ["y2"], name="fancy",
                            domain="com.example")
    model.graph.node.append(relu)
    model.graph.output[0].name = "y2"
    src = _save(model, tmp_path / "m.onnx")
    calib = _calib(tmp_path, calibration())
    _refused(capsys, tmp_path, [str(src), str(tmp_path / "q.onnx"), "--calib", calib, "-q"],
             "onnxruntime cannot load")


def test_argument_errors_take_at_most_two_lines(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["only_one_argument.onnx"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) <= 2


def _batch_one(model: onnx.ModelProto, baked: bool) -> onnx.ModelProto:
    """``model`` exported for batch 1; ``baked``: its attention Reshapes name the batch (1)
    where the dynamic export copies it (0)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for info in (*fixed.graph.input, *fixed.graph.output):
        info.type.tensor_type.shape.dim[0].dim_value = 1
    if baked:
        for init in fixed.graph.initializer:
            if init.name.endswith("_shape"):
                shape = numpy_helper.to_array(init).copy()
                shape[0] = 1
                init.CopyFrom(numpy_helper.from_array(shape, init.name))
    return fixed


def test_batch_one_model_reconstructs_on_all_samples_at_once(tmp_path, capsys):
    """Block strategies run every calibration sample at once: a batch-1 export whose ops
    do not bake the batch in gets the codes the dynamic export gets, and keeps batch 1."""
    calib = _calib(tmp_path, calibration(8))
    argv = ["--calib", calib, "-q", "--weight-bits", "4", "--reconstruct", "gptq", "--auto"]
    outs = {}
    for name, model in {"dynamic": _model(), "one": _batch_one(_model(), baked=False)}.items():
        src = _save(model, tmp_path / f"{name}.onnx")
        outs[name] = tmp_path / f"{name}.q.onnx"
        assert main([str(src), str(outs[name]), *argv]) == 0, capsys.readouterr().err
    capsys.readouterr()
    weights = [{i.name: numpy_helper.to_array(i) for i in onnx.load(outs[k]).graph.initializer}
               for k in ("dynamic", "one")]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        np.testing.assert_array_equal(weights[1][name], value, err_msg=name)
    dims = onnx.load(outs["one"]).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1


@pytest.mark.parametrize("flag", [["--reconstruct", "gptq"], ["--auto"]])
def test_batch_baked_into_the_ops_is_one_line(tmp_path, capsys, flag):
    src = _save(_batch_one(_model(), baked=True), tmp_path / "m.onnx")
    calib = _calib(tmp_path, calibration(8))
    _refused(capsys, tmp_path, [str(src), str(tmp_path / "q.onnx"), "--calib", calib, "-q",
                                "--weight-bits", "4", *flag], flag[0], "batch 1",
             "dynamic batch axis")
