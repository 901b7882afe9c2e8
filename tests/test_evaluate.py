"""Evaluation numerics on a tiny linear classifier, the CLI glue, and the reference models."""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from PIL import Image

from onnxquant import evaluate as ev
from onnxquant.errors import UserError
from onnxquant.images import Preprocess

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRE = Preprocess(8, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
NETTE = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
K = np.arange(10, dtype=np.float32)


def _linear_model(red_row, batch="N", bias=0.0, size=8):
    """logits = mean_rgb @ W + bias; W rows: red -> red_row, green -> -k, blue -> 0."""
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        tiny (float[{batch},3,{size},{size}] x) => (float[{batch},10] logits) {{
            pooled = GlobalAveragePool(x)
            flat = Flatten(pooled)
            scores = MatMul(flat, w)
            logits = Add(scores, b)
        }}""")
    w = np.stack([red_row, -K, np.zeros(10, np.float32)]).astype(np.float32)
    b = np.full(10, bias, np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(w, "w"),
                                    numpy_helper.from_array(b, "b")])
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def images(tmp_path):
    """Red images rank outputs 9,8,7,..; green ones 0,1,2,..; labels are ImageNet indices."""
    rows = [("r0.png", (255, 0, 0), 701),  # output 9: top-1 hit
            ("r1.png", (255, 0, 0), 571),  # output 7: top-5 hit
            ("g0.png", (0, 255, 0), 491),  # output 3: top-5 hit
            ("g1.png", (0, 255, 0), 701),  # output 9: miss
            ("skip.png", (0, 255, 0), 5)]  # not a model output: skipped
    for name, color, _ in rows:
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    lines = ["path\tclass_index"] + [f"{name}\t{label}" for name, _, label in rows]
    (tmp_path / "labels.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_top1_top5_by_hand(images):
    res = ev.evaluate(_linear_model(K), images, PRE, class_map=NETTE, progress=False)
    assert (res.n, res.skipped) == (4, 1)
    assert res.top1 == 25.0 and res.top5 == 75.0
    np.testing.assert_array_equal(res.labels, [3, 9, 9, 7])  # sorted: g0, g1, r0, r1
    np.testing.assert_allclose(res.logits[2], K)  # r0: a red pixel averages to exactly 1


def test_fixed_batch_model_is_padded(images):
    dynamic = ev.evaluate(_linear_model(K), images, PRE, class_map=NETTE, progress=False)
    fixed = ev.evaluate(_linear_model(K, batch=3), images, PRE, class_map=NETTE,
                        batch_size=2, progress=False)
    np.testing.assert_array_equal(fixed.logits, dynamic.logits)
    assert fixed.top1 == dynamic.top1


def test_limit_takes_images_spread_over_the_list(images):
    res = ev.evaluate(_linear_model(K), images, PRE, class_map=NETTE, limit=2, progress=False)
    assert res.n + res.skipped == 2


def test_compare_offset_logits_agree_fully(images):
    res = ev.compare(_linear_model(K), _linear_model(K, bias=2.5), images, PRE,
                     class_map=NETTE, progress=False)
    assert res.agreement == 100.0
    assert res.kl == pytest.approx(0.0, abs=1e-9)  # softmax ignores a constant offset
    assert res.max_abs_err == pytest.approx(2.5)
    assert res.a.top1 == res.b.top1 == 25.0
    assert res.change_se == 0.0  # no image is right for one model only


def test_compare_reversed_red_ranking(images):
    res = ev.compare(_linear_model(K), _linear_model(9 - K), images, PRE,
                     class_map=NETTE, progress=False)
    assert res.agreement == 50.0  # red images flip from 9 to 0, green ones agree
    p = np.exp(K) / np.exp(K).sum()
    # red: KL = sum p_k (k - (9 - k)) (same log-sum-exp, a permutation); green: 0
    assert res.kl == pytest.approx(0.5 * float(np.sum(p * (2 * K - 9))), rel=1e-6)
    assert res.max_abs_err == pytest.approx(9.0)
    assert res.b.top1 == 0.0 and res.b.top5 == 25.0
    # per-image differences -1, 0, 0, 0: sd 0.5 (n - 1 in the denominator), over sqrt(4)
    assert res.change_se == pytest.approx(25.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=60))
def test_paired_change_se_closed_form(outcomes):
    """With b images only float gets right and c only the other: the paired standard error
    is sqrt((b + c - (c - b)^2 / n) / (n (n - 1))), in points."""
    n = len(outcomes)
    labels = np.zeros(n, np.int64)
    logits = [np.array([[1.0, 0.0] if right else [0.0, 1.0] for right in side])
              for side in zip(*outcomes)]
    a, b = (ev.EvalResult(name, n, 0.0, 0.0, 0, lg, labels) for name, lg in zip("ab", logits))
    lost = sum(x and not y for x, y in outcomes)
    won = sum(y and not x for x, y in outcomes)
    want = np.sqrt((lost + won - (won - lost) ** 2 / n) / (n * (n - 1))) * 100
    assert ev.paired_change_se(a, b) == pytest.approx(want, abs=1e-9)


def test_user_errors(images, tmp_path):
    with pytest.raises(UserError, match="class map has 3"):
        ev.evaluate(_linear_model(K), images, PRE, class_map=[0, 1, 2], progress=False)
    with pytest.raises(UserError, match="no image's class"):
        ev.evaluate(_linear_model(K), images, PRE, class_map=list(range(900, 910)),
                    progress=False)
    with pytest.raises(UserError, match="input is 16x16"):
        ev.evaluate(_linear_model(K, size=16), images, PRE, class_map=NETTE, progress=False)
    with pytest.raises(UserError, match="no such model"):
        ev.evaluate(tmp_path / "missing.onnx", images, PRE, progress=False)


def _cli(argv):
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    return ev.run(parser.parse_args(argv))


def test_cli_compare_with_reference_json(images, tmp_path, capsys):
    onnx.save(_linear_model(K), tmp_path / "a.onnx")
    onnx.save(_linear_model(9 - K), tmp_path / "b.onnx")
    ref = {"imagenet_index": NETTE, "eval_preprocessing": {
        "input_size": [3, 8, 8], "interpolation": "bicubic", "crop_pct": 1.0,
        "mean": [0, 0, 0], "std": [1, 1, 1]}}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    code = _cli([str(tmp_path / "a.onnx"), "--images", str(images), "--compare",
                 str(tmp_path / "b.onnx"), "--reference-json", str(tmp_path / "ref.json"),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "a.onnx" in out and "25.00" in out and "agreement 50.00" in out
    assert "top-1 change -25.00 points, standard error 25.00 from these 4 images" in out


def test_cli_explicit_flags_and_class_map(images, tmp_path, capsys):
    onnx.save(_linear_model(K), tmp_path / "a.onnx")
    code = _cli([str(tmp_path / "a.onnx"), "--images", str(images), "--input-size", "8",
                 "--crop-pct", "1", "--mean", "0", "0", "0", "--std", "1", "1", "1",
                 "--class-map", ",".join(map(str, NETTE)), "--no-progress"])
    assert code == 0 and "75.00" in capsys.readouterr().out
    with pytest.raises(UserError, match="crop_pct"):
        _cli([str(tmp_path / "a.onnx"), "--images", str(images), "--crop-pct", "0"])
    with pytest.raises(UserError, match="--class-map"):
        _cli([str(tmp_path / "a.onnx"), "--images", str(images), "--class-map", "0,x"])


REFERENCE = [("mobilevit_xxs", "imagenette/val", "imagenette-val"),
             ("mobilevit_xxs", "imagenet-val/nette", "imagenet-val-nette"),
             ("mobilevitv2_050", "imagenette/val", "imagenette-val"),
             ("mobilevitv2_050", "imagenet-val/nette", "imagenet-val-nette")]


@pytest.mark.accuracy
@pytest.mark.parametrize("name, subset, key", REFERENCE)
def test_reference_onnx_matches_torch_top1(name, subset, key):
    """The float ONNX export, preprocessed here, reproduces the PyTorch top-1 of its JSON."""
    assets = SHARED / "assets"
    json_path = assets / "reference" / f"{name}.imagenette.json"
    if not json_path.is_file() or not (assets / subset).is_dir():
        pytest.skip(f"shared assets not found under {assets}")
    ref = json.loads(json_path.read_text())
    res = ev.evaluate(assets / "reference" / ref["onnx"], assets / subset,
                      Preprocess.from_json(json_path), class_map=ref["imagenet_index"],
                      batch_size=64, progress=False)
    assert res.skipped == 0
    assert abs(res.top1 - ref["top1_fp32_torch"][key]) <= 0.3


def test_labels_beyond_the_outputs_without_a_class_map_are_refused(images):
    """A 10-output model scored against ImageNet-1k labels would print a meaningless 0 %."""
    with pytest.raises(UserError, match="labels go up to class 701"):
        ev.evaluate(_linear_model(K), images, PRE, progress=False)


def test_mostly_skipped_images_are_refused(images):
    """2 of 5 images in the class map: the score would describe almost nothing."""
    with pytest.raises(UserError, match="only 2 of 5 images"):
        ev.evaluate(_linear_model(K), images, PRE, class_map=[701] + list(range(900, 909)),
                    progress=False)
