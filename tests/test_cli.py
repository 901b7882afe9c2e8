"""The command line on the bundled model, and every bad input: one line, exit 2, no output."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
import pytest

from onnxquant.cli import main
from conftest import BUNDLED

MODEL = BUNDLED / "mobilevit_xxs.imagenette.onnx"
PRE = ["--preprocess-json", str(BUNDLED / "mobilevit_xxs.imagenette.json")]


def _fails(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_quantize_bundled_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    before = MODEL.read_bytes()
    assert main([str(MODEL), str(out), "--calib", str(BUNDLED / "calib"), "-q", *PRE]) == 0
    text = capsys.readouterr().out
    assert "9 blocks" in text and "35 conv weights" in text and "9 softmax outputs" in text
    assert MODEL.read_bytes() == before  # input never modified
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Log2QuantDequant") == 9 and ops.count("DequantizeLinear") == 35
    x = np.random.default_rng(0).random((2, 3, 128, 128), np.float32)
    y = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    y0 = ort.InferenceSession(str(MODEL)).run(None, {"input": x})[0]
    assert y.shape == y0.shape == (2, 10)
    assert np.abs(y - y0).max() < 1.0  # measured 0.12-0.38 on random and real inputs


def test_default_calibration_is_the_bundled_images(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main([str(MODEL), str(out), "-q", *PRE]) == 0
    assert "bundled" in capsys.readouterr().err
    assert out.exists()


def test_the_bundled_images_warning_counts_them_whatever_used_them(tmp_path, capsys):
    """No activation ranges here (conv weights only), but GPTQ fits on the bundled images:
    the warning still comes, with the number used."""
    out = tmp_path / "q.onnx"
    argv = [str(MODEL), str(out), "-q", *PRE, "--parts", "conv_block", "--weight-bits", "4",
            "--reconstruct", "gptq", "--num-calib", "8"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "calibration bundled ImageNet images: 8 images" in captured.out
    assert "calibrated on 8 bundled ImageNet images" in captured.err


def test_console_script_runs(tmp_path):
    out = tmp_path / "q.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxquant", str(MODEL), str(out), "-q", *PRE,
                           "--calib", str(BUNDLED / "calib"), "--num-calib", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "size" in proc.stdout


def test_inspect_prints_block_map(capsys):
    assert main(["inspect", str(MODEL), "-v"]) == 0
    out = capsys.readouterr().out
    assert "attention blocks: 9" in out and "transformer 9, bridge 6" in out


def test_missing_file(tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx")], "nope.onnx",
           "no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_not_onnx_and_truncated(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    _fails(capsys, [str(bad), str(tmp_path / "o.onnx")], "bad.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    _fails(capsys, [str(cut), str(tmp_path / "o.onnx")], "cut.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_output_equals_input(tmp_path, capsys):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(MODEL.read_bytes())
    _fails(capsys, [str(copy), str(copy)], "output path is the input")
    assert copy.read_bytes() == MODEL.read_bytes()


def test_unwritable_output(tmp_path, capsys):
    _fails(capsys, [str(MODEL), str(tmp_path / "no" / "dir" / "o.onnx")], "does not exist")


def test_no_softmax_no_conv(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "plain",
                              [helper.make_tensor_value_info("x", 1, [1, 4])],
                              [helper.make_tensor_value_info("y", 1, [1, 4])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    _fails(capsys, [str(path), str(tmp_path / "o.onnx")], "no Softmax and no Conv")
    assert not (tmp_path / "o.onnx").exists()


def test_already_quantized(tmp_path, capsys):
    q = tmp_path / "q.onnx"
    assert main([str(MODEL), str(q), "-q", "--num-calib", "4", *PRE]) == 0
    capsys.readouterr()
    _fails(capsys, [str(q), str(tmp_path / "qq.onnx")], "already quantized", "float model")
    assert not (tmp_path / "qq.onnx").exists()


def test_wrong_calibration_shape_and_dtype(tmp_path, capsys):
    npy = tmp_path / "calib.npy"
    np.save(npy, np.zeros((4, 3, 64, 64), np.float32))
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--calib", str(npy)], "calib.npy",
           "[N, 3, 128, 128]")
    np.save(npy, np.zeros((4, 3, 128, 128), np.float64))
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--calib", str(npy)], "float32")
    assert not (tmp_path / "o.onnx").exists()


def test_npy_calibration_works(tmp_path, capsys):
    npy = tmp_path / "calib.npy"
    np.save(npy, np.random.default_rng(0).random((8, 3, 128, 128), np.float32))
    assert main([str(MODEL), str(tmp_path / "o.onnx"), "--calib", str(npy), "-q"]) == 0


def test_empty_calibration_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--calib", str(empty)], "no images")
    assert not (tmp_path / "o.onnx").exists()


def test_bad_option_value(tmp_path, capsys):
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--weight-bits", "12"], "weight_bits")
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--parts", "convs"], "unknown parts")


def test_reconstruct_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here: the error is for machines without one")
    # progress bars on: the device is checked before calibration prints any
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--reconstruct", "brecq",
                    "--reconstruct-device", "cuda"], "--reconstruct-device cuda")
    _fails(capsys, [str(MODEL), str(tmp_path / "o.onnx"), "--reconstruct", "gptq",
                    "--reconstruct-device", "cpu"], "reconstruct_device applies to")
    assert not (tmp_path / "o.onnx").exists()
