"""Per-layer sensitivity: a damaged layer ranks first; each variant equals ``run(exclude=...)``."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant.cli import main
from onnxquant.errors import UserError
from onnxquant.sensitivity import sensitivity
from graphs import Builder, calibration, mixed_model, quantize, run_ort


def _damaged(model: onnx.ModelProto, conv: str) -> onnx.ModelProto:
    """``model`` with one weight of ``conv`` 8x its largest: 4-bit per-tensor codes then have
    a step of ~0.6 max|W|, and most other weights of that conv round to 0. (40x hides the
    damage: the outlier's channel then dominates ||y||; so does 8x on conv_out, whose
    remaining weights keep codes -1..1 and rank 4th, measured.)"""
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    init = next(i for i in damaged.graph.initializer if i.name == f"{conv}_w")
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = 8 * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return damaged


def residual_model(seed: int = 0) -> onnx.ModelProto:
    """mixed_model's attention with a conv residual (Add(conv, skip)) on each side."""
    b = Builder(seed)
    h = b.relu("stem_act", b.conv("stem", "x", 4, 8, k=3))
    b.node(f"[res1] res1_out = Add({b.conv('conv_a', h, 8, 8)}, {h})")
    h = b.sdpa("attn", b.conv("conv_in", "res1_out", 8, 8), variant="mul")
    b.node(f"[res2] res2_out = Add({b.conv('conv_b', h, 8, 8, k=3)}, {h})")
    return b.build({b.conv("tail", "res2_out", 8, 4): "float[N,4,4,4]"})


def _error(model, quantized, x) -> tuple:
    """The report's measures, computed here on their own: (error, agreement %)."""
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(quantized, {"x": x})
    y, yq = y.astype(np.float64), yq.astype(np.float64)
    err = ((yq - y) ** 2).reshape(len(x), -1).sum(1) / (y**2).reshape(len(x), -1).sum(1)
    return err.mean(), (y.argmax(-1) == yq.argmax(-1)).mean() * 100


@pytest.mark.parametrize("conv", ["stem", "conv_in"])
def test_a_damaged_conv_ranks_first(conv):
    model = _damaged(mixed_model(), conv)
    report = sensitivity(model, _paper_w4(), calibration(16), progress=False)
    assert report.rows[0].site == conv, report.to_markdown()
    assert report.rows[0].alone > 5 * report.rows[1].alone
    assert report.exclude_argument(1) == f"--exclude {conv}"
    assert report.exclusions[0][1] < report.full[0] / 3  # keeping it float gains most


def _paper_w4():
    from onnxquant import QuantConfig

    return QuantConfig(weight_bits=4, per_channel=False)  # the paper's per-tensor grid


RECIPES = [(mixed_model, {"target": "tensorrt"}),
           (residual_model, {"target": "tensorrt", "calib_method": "percentile"}),
           (mixed_model, {"target": "ort", "ort_int8_kinds": ("dense", "pointwise", "linear")})]


@pytest.mark.parametrize("make, recipe", RECIPES, ids=["trt", "trt-residual", "ort"])
def test_each_variant_is_run_with_exclude(make, recipe):
    """alone = exclude every other site, left float = exclude the site (int8 inputs and
    outputs, residual skips, log2 Softmax, static and dynamic linear layers)."""
    from onnxquant import QuantConfig

    model, x = make(), calibration(8)
    report = sensitivity(model, QuantConfig(**recipe), x, progress=False, left_float_top=None)
    sites = [r.site for r in report.rows]
    full = quantize(model, x, **recipe)
    quantized = [s.softmax if hasattr(s, "softmax") else s.node
                 for s in full.plan.attention + full.plan.convs + full.plan.linears if s.quantize]
    assert sorted(sites) == sorted(quantized) and len(set(sites)) == len(sites)
    assert make is mixed_model or sum(r.quantize for r in full.plan.residuals) == 2
    assert report.full == pytest.approx(_error(model, full.model, x), rel=1e-6)
    for row in report.rows:
        others = tuple(s for s in sites if s != row.site)
        alone = quantize(model, x, **recipe, exclude=others).model
        left_float = quantize(model, x, **recipe, exclude=(row.site,)).model
        assert (row.alone, row.agreement) == pytest.approx(_error(model, alone, x), rel=1e-6)
        assert (row.left_float, row.left_float_agreement) == pytest.approx(
            _error(model, left_float, x), rel=1e-6)


def _trt():
    from onnxquant import QuantConfig

    return QuantConfig(target="tensorrt")


def test_roles_and_markdown():
    report = sensitivity(mixed_model(), _trt(), calibration(8), progress=False, left_float_top=2)
    assert [r.role for r in report.roles] == ["conv_block", "bridge", "softmax", "linear"]
    assert [r.sites for r in report.roles] == [2, 2, 1, 3]
    assert sum(r.left_float is not None for r in report.rows) == 2
    assert [k for k, *_ in report.exclusions] == [1, 3, 5]
    text = report.to_text(top=3)
    assert text.count("| conv") + text.count("| linear") + text.count("| softmax") >= 3
    assert "--exclude " in text and "| full recipe |" in text


def test_inspect_sensitivity_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npy"
    onnx.save(_damaged(mixed_model(), "conv_in"), str(path))
    np.save(calib, calibration(8))
    argv = ["inspect", str(path), "--sensitivity", "--calib", str(calib), "--weight-bits", "4",
            "--plots", str(tmp_path / "plots"), "--sensitivity-top", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| 1 | `conv_in` |" in out and "| 5 |" not in out
    assert "keep the top 3 float: --exclude conv_in," in out
    assert (tmp_path / "plots" / "sensitivity.png").stat().st_size > 1000


def test_inspect_recipe_options_need_sensitivity(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(path))
    assert main(["inspect", str(path), "--target", "tensorrt"]) == 2
    assert "--sensitivity" in capsys.readouterr().err


def test_nothing_to_rank_is_a_user_error():
    from onnxquant import QuantConfig

    with pytest.raises(UserError, match="nothing to rank"):
        sensitivity(mixed_model(), QuantConfig(exclude=("*",)), calibration(8), progress=False)


def test_excluded_sites_are_not_ranked_and_stay_in_the_suggestion():
    from onnxquant import QuantConfig

    cfg = QuantConfig(target="tensorrt", exclude=("conv_in", "attn_*"))
    report = sensitivity(mixed_model(), cfg, calibration(8), progress=False, left_float_top=0)
    assert sorted(r.site for r in report.rows) == ["conv_out", "stem", "tail"]
    assert report.exclude_argument(1).startswith("--exclude 'conv_in,attn_*,")
