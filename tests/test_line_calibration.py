"""``--calib DIR`` for models whose input is not a square image (text-line recognizers).

A folder of line images of their own sizes must calibrate exactly as the same lines
preprocessed by hand (PaddleOCR's resize_norm_img, written out here with PIL + NumPy) and
passed as a .npy; the summary says what the images went through.
"""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxquant.cli import main

HEIGHT = 8
LINE_FLAGS = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
              "--channel-order", "bgr", "--interpolation", "bilinear"]


def _line_model(path, width="W", channels=3):
    """Conv-ReLU-Conv over an N x ``channels`` x 8 x ``width`` input (a str width is free)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, channels, 3, 3)).astype(np.float32),
                                 "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(
        nodes, "line", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["N", channels, HEIGHT, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, HEIGHT, width])],
        [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _lines(folder, sizes=((40, 16), (90, 16), (13, 20), (64, 30))):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"line_{i}.png")
    return folder


def _by_hand(folder, width):
    """BGR, height 8 with the aspect kept (width rounded up, capped), (x/255 - 0.5)/0.5,
    zeros on the right: the lines as the model's users feed them."""
    out = []
    for path in sorted(folder.glob("*.png")):
        img = Image.open(path).convert("RGB")
        w = min(width, math.ceil(HEIGHT * img.width / img.height))
        rgb = np.asarray(img.resize((w, HEIGHT), Image.BILINEAR), np.float32)
        x = np.zeros((3, HEIGHT, width), np.float32)
        x[:, :, :w] = (rgb[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        out.append(x)
    return np.stack(out)


@pytest.mark.parametrize("flags, width", [([], 19), (["--input-width", "32"], 32)])
def test_line_folder_calibrates_like_the_lines_preprocessed_by_hand(tmp_path, capsys, flags,
                                                                   width):
    model = _line_model(tmp_path / "m.onnx")
    lines = _lines(tmp_path / "lines")  # free width: the median of 20, 45, 6, 18
    np.save(tmp_path / "lines.npy", _by_hand(lines, width))
    common = [str(model), "--target", "tensorrt", "-q"]
    assert main([*common[:1], str(tmp_path / "dir.onnx"), *common[1:], "--calib", str(lines),
                 *LINE_FLAGS, *flags]) == 0
    out = capsys.readouterr().out
    assert f"4 images, pad to {HEIGHT}x{width}, bilinear, BGR, mean 0.5/0.5/0.5" in out
    assert main([*common[:1], str(tmp_path / "npy.onnx"), *common[1:], "--calib",
                 str(tmp_path / "lines.npy")]) == 0
    assert (tmp_path / "dir.onnx").read_bytes() == (tmp_path / "npy.onnx").read_bytes()


def test_fixed_width_model_pads_to_its_width_and_warns_of_guessed_normalization(tmp_path,
                                                                               capsys):
    model = _line_model(tmp_path / "m.onnx", width=24)
    lines = _lines(tmp_path / "lines")
    assert main([str(model), str(tmp_path / "q.onnx"), "--target", "tensorrt", "-q",
                 "--calib", str(lines)]) == 0
    captured = capsys.readouterr()
    assert f"pad to {HEIGHT}x24, bicubic, RGB" in captured.out
    assert "guessed mean 0.485/0.456/0.406" in captured.err and "--channel-order" in captured.err
    assert main([str(model), str(tmp_path / "q2.onnx"), "--target", "tensorrt", "-q",
                 "--calib", str(lines), *LINE_FLAGS]) == 0
    assert "guessed" not in capsys.readouterr().err  # normalization given: nothing guessed


def test_center_crop_of_a_model_that_is_not_square_is_one_line(tmp_path, capsys):
    model = _line_model(tmp_path / "m.onnx", width=24)
    lines = _lines(tmp_path / "lines")
    out = tmp_path / "q.onnx"
    code = main([str(model), str(out), "--calib", str(lines), "--resize", "crop"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "crop" in err and "pad" in err
    assert not out.exists()


def test_one_channel_model_calibrates_on_gray_lines(tmp_path, capsys):
    """Gray: PIL's "L" before resizing, (x/255 - 0.5)/0.5 unless told otherwise, and a warning
    that the normalization was guessed."""
    model = _line_model(tmp_path / "m.onnx", channels=1)
    lines = _lines(tmp_path / "lines")
    by_hand = []
    for path in sorted(lines.glob("*.png")):
        img = Image.open(path).convert("L")
        w = min(19, math.ceil(HEIGHT * img.width / img.height))  # median width 19
        x = np.zeros((1, HEIGHT, 19), np.float32)
        x[0, :, :w] = (np.asarray(img.resize((w, HEIGHT), Image.BICUBIC), np.float32)
                       / 255.0 - 0.5) / 0.5
        by_hand.append(x)
    np.save(tmp_path / "lines.npy", np.stack(by_hand))
    assert main([str(model), str(tmp_path / "dir.onnx"), "--target", "tensorrt", "-q",
                 "--calib", str(lines)]) == 0
    captured = capsys.readouterr()
    assert f"pad to {HEIGHT}x19, bicubic, GRAY, mean 0.5, std 0.5" in captured.out
    assert "guessed mean 0.5 and std 0.5 (GRAY)" in captured.err
    assert main([str(model), str(tmp_path / "npy.onnx"), "--target", "tensorrt", "-q",
                 "--calib", str(tmp_path / "lines.npy")]) == 0
    assert (tmp_path / "dir.onnx").read_bytes() == (tmp_path / "npy.onnx").read_bytes()


@pytest.mark.parametrize("channels, flags, words", [
    (1, ["--channel-order", "rgb"], ["lines: ", "1 channel", "--channel-order gray"]),
    (3, ["--channel-order", "gray"], ["lines: ", "3 channel", "--channel-order rgb or bgr"]),
    (3, ["--mean", "0.5", "0.5"], ["mean needs 3 values"]),
    (4, [], ["lines: ", "4 channel", "--calib FILE.npy of N x 4 x H x W"]),  # .npy works
])
def test_channels_the_model_does_not_take_are_one_line(tmp_path, capsys, channels, flags,
                                                       words):
    model = _line_model(tmp_path / "m.onnx", channels=channels)
    lines = _lines(tmp_path / "lines")
    out = tmp_path / "q.onnx"
    code = main([str(model), str(out), "--calib", str(lines), "--target", "tensorrt", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists()
