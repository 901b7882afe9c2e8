"""OCR harness: CTC decoding, edit distance, renderer determinism, recognizer preprocessing,
and (accuracy tier) the float PP-OCRv6 recognizer reading the rendered lines."""

import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import need_shared
from onnxquant import images, ocr, ocr_render
from onnxquant.errors import UserError
from onnxquant.ocr_render import charset, font_paths, render_lines

ALPHABET = ["blank", "a", "b", "c", "l", "-"] + [" "]


def _one_hot(indices, classes=len(ALPHABET)):
    """1 x T x C scores with a 1 at each step's index."""
    probs = np.zeros((1, len(indices), classes), np.float32)
    probs[0, np.arange(len(indices)), indices] = 1.0
    return probs


@pytest.mark.parametrize("steps, text", [
    ([1, 1, 1, 2, 2, 3], "abc"),  # repeats collapse
    ([4, 4, 0, 4, 0, 0], "ll"),  # a blank separates a real double letter
    ([0, 0, 0], ""),  # only blanks
    ([1, 6, 6, 2, 0, 6, 3], "a b c"),  # the last class is the space
    ([5, 0, 5, 5, 1], "--a"),
])
def test_ctc_decode(steps, text):
    assert ocr.ctc_decode(_one_hot(steps), ALPHABET) == [text]


def test_ctc_decode_batch_and_soft_scores():
    probs = np.full((2, 4, len(ALPHABET)), 0.01, np.float32)
    probs[0, :, 1] = [0.9, 0.2, 0.9, 0.9]  # a, blank wins at step 1, a -> "aa"
    probs[0, 1, 0] = 0.5
    probs[1, :, 3] = 0.9
    assert ocr.ctc_decode(probs, ALPHABET) == ["aa", "c"]


def test_ctc_decode_refuses_a_wrong_alphabet():
    with pytest.raises(UserError, match="alphabet"):
        ocr.ctc_decode(_one_hot([1, 2]), ALPHABET[:-1])


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "abc", 0), ("", "abc", 3), ("abc", "", 3),
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "acb", 2), ("a b", "ab", 1),
])
def test_levenshtein(a, b, distance):
    assert ocr.levenshtein(a, b) == distance
    assert ocr.levenshtein(b, a) == distance


def test_scores():
    line, char = ocr.scores(["abc", "abd", ""], ["abc", "abc", "ab"])
    assert line == pytest.approx(100 / 3)
    assert char == pytest.approx(100 * (1 - 3 / 8))


def _pixels(lines):
    return [np.asarray(image).tobytes() for image, _ in lines]


def test_renderer_is_deterministic():
    a, b, c = render_lines(6, seed=3), render_lines(6, seed=3), render_lines(6, seed=4)
    assert [t for _, t in a] == [t for _, t in b]
    assert _pixels(a) == _pixels(b)
    assert _pixels(a) != _pixels(c)


def test_rendered_texts_use_the_alphabet():
    alphabet = ["blank"] + list("abcdefghijklmnopqrstuvwxyz0123456789.-") + [" "]
    for image, text in render_lines(20, seed=5, alphabet=alphabet):
        assert image.mode == "RGB" and image.height >= 14
        assert 1 <= len(text) <= 25 and text == text.strip()
        assert set(text) <= set(alphabet[1:])


def test_charset_keeps_what_fonts_draw():
    chars = charset(["blank", "a", "Z", "7", "\ue000", " "], font_paths()[:1])
    assert chars == "aZ7"


def test_preprocess_shape_padding_and_range():
    wide = Image.new("RGB", (480, 24), (255, 0, 0))  # ratio 20 -> width 960
    short = Image.new("RGB", (30, 30), (0, 0, 255))  # ratio 1 -> 48 px, then zeros
    x = ocr.preprocess([wide, short])
    assert x.shape == (2, 3, 48, 960) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_allclose(x[0, :, 0, 0], [-1.0, -1.0, 1.0])  # BGR: red is channel 2
    np.testing.assert_allclose(x[1, :, 0, 0], [1.0, -1.0, -1.0])
    assert not x[1, :, :, 48:].any()  # right zero padding
    assert ocr.preprocess([short]).shape[-1] == 320  # at least 320 wide


def test_preprocess_fixed_width_squeezes_wide_lines():
    x = ocr.preprocess([Image.new("RGB", (480, 24), (255, 255, 255))], width=320)
    assert x.shape == (1, 3, 48, 320)
    assert np.all(x == 1.0)


def test_calibration_array():
    x = ocr.calibration_array(3, seed=7)
    assert x.shape == (3, 3, 48, 320) and x.dtype == np.float32
    np.testing.assert_array_equal(x, ocr.calibration_array(3, seed=7))


def _at_own_width(image):
    w = int(np.ceil(48 * image.width / image.height))
    return ocr.preprocess([image], width=w)[0]


def test_packed_calibration_is_the_lines_side_by_side_cut_into_samples():
    x = ocr.calibration_array(3, seed=7, width=400, layout="packed")
    assert x.shape == (3, 3, 48, 400) and x.dtype == np.float32
    assert np.all(x != 0)  # no padding: a pixel never normalizes to exactly 0
    lines = [image for image, _ in render_lines(12, seed=7)]
    stream = np.concatenate([_at_own_width(image) for image in lines], axis=-1)
    np.testing.assert_array_equal(np.concatenate(list(x), axis=-1), stream[..., :1200])


def test_natural_calibration_pads_every_line_to_the_widest():
    x = ocr.calibration_array(4, seed=7, layout="natural")
    ratios = [im.width / im.height for im, _ in render_lines(4, seed=7)]
    assert x.shape[-1] == max(320, int(48 * max(ratios)))
    widths = [int(np.ceil(48 * r)) for r in ratios]
    for sample, w in zip(x, widths):
        assert np.all(sample[..., min(w, x.shape[-1]):] == 0)


def test_calibration_images_are_the_rendered_lines_as_png(tmp_path):
    """The folder a user's line crops would make: one lossless PNG per line, own size, in
    rendering order; read with line_preprocess they are the array the tools used."""
    paths = ocr.write_calibration_images(tmp_path / "lines", 5, seed=9)
    lines = [image for image, _ in render_lines(5, seed=9)]
    assert [p.name for p in paths] == [f"line_{i:04d}.png" for i in range(5)]
    for path, line in zip(paths, lines):
        np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")),
                                      np.asarray(line.convert("RGB")))
    pre = ocr.line_preprocess(320)
    read = np.stack([images.pad_line(Image.open(p), pre) for p in paths])
    np.testing.assert_array_equal(read, ocr.preprocess(lines, 320))
    with pytest.raises(UserError, match="already exists"):
        ocr.write_calibration_images(tmp_path / "lines", 5, seed=9)


def test_unknown_calibration_layout_is_a_user_error():
    with pytest.raises(UserError, match="packed"):
        ocr.calibration_array(2, seed=7, layout="stacked")
    with pytest.raises(UserError, match="positive"):
        ocr.calibration_array(2, seed=7, width=0, layout="packed")


def test_alphabet_needs_metadata():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,2] x) => (float[1,2] y) { y = Identity(x) }""")
    with pytest.raises(UserError, match="character"):
        ocr.load_alphabet(model)
    onnx.helper.set_model_props(model, {"character": "a\nb"})
    assert ocr.load_alphabet(model) == ["blank", "a", "b", " "]


@pytest.mark.accuracy
def test_float_recognizer_reads_rendered_lines():
    model = need_shared("real", "PP-OCRv6_rec_small.onnx")
    alphabet = ocr.load_alphabet(model)
    result = ocr.evaluate_ocr(model, render_lines(200, seed=1, alphabet=alphabet),
                              alphabet=alphabet)
    assert len(alphabet) == 18710
    assert result.line_acc >= 90.0 and result.char_acc >= 98.0


@pytest.mark.accuracy
@pytest.mark.parametrize("options, max_loss", [
    # measured on 300 lines (docs/ocr.md): per-channel -0.33, tensorrt -2.0, ort -1.3 points;
    # the paper's per-tensor weights lose ~20 points and are not a recipe to bound here
    ({"per_channel": True}, 2.0),
    ({"target": "tensorrt"}, 4.0),
    ({"target": "ort", "ort_int8_kinds": ("dense", "pointwise", "linear")}, 4.0),
])
def test_quantized_recognizer_stays_close_to_float(options, max_loss):
    import onnxquant

    model = need_shared("real", "PP-OCRv6_rec_small.onnx")
    alphabet = ocr.load_alphabet(model)
    calib = ocr.calibration_array(32, seed=1001, alphabet=alphabet)
    quant = onnxquant.quantize(str(model), onnxquant.QuantConfig(**options), calibration=calib)
    lines = render_lines(150, seed=1, alphabet=alphabet)
    base, got = ocr.evaluate_many([str(model), quant], lines, alphabet=alphabet)
    assert got.line_acc >= base.line_acc - max_loss, (base.line_acc, got.line_acc)
    assert ocr.agreement(base, got) >= 100.0 - 2 * max_loss


def test_no_font_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ocr_render, "FONT_DIRS", (tmp_path,))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match="no TTF font") as info:
        ocr_render.font_paths()
    assert "\n" not in str(info.value)


def test_detector_preprocess_and_found():
    x = ocr.detector_preprocess(Image.new("RGB", (800, 600), (255, 255, 255)))
    assert x.shape == (1, 3, 736, 992) and np.all(x == 1.0)
    mask = np.zeros((60, 80), bool)
    mask[10:20, 10:40] = True  # map at a tenth of the page's 800 x 600
    assert ocr._found(mask, [(100, 100, 400, 200), (500, 400, 700, 500)], (800, 600)) == [
        True, False]


def test_lines_are_fed_at_the_width_a_recognizer_fixes():
    """A recognizer exported for one width gets every batch at that width; a free width pads
    each batch to its widest line; two fixed widths cannot share batches."""
    from types import SimpleNamespace as Runner

    free, fixed = Runner(input_shape=["N", 3, 48, "W"]), Runner(input_shape=[1, 3, 48, 320])
    assert ocr._fixed_width([free]) is None
    assert ocr._fixed_width([free, fixed]) == 320
    with pytest.raises(UserError, match="different input widths"):
        ocr._fixed_width([fixed, Runner(input_shape=[1, 3, 48, 200])])
