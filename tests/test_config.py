"""QuantConfig: options the chosen target would ignore are refused, naming the option."""

from dataclasses import replace

import pytest

from onnxquant import QuantConfig
from onnxquant.cli import main


@pytest.mark.parametrize("options, word", [
    ({"target": "paper", "ort_int8_kinds": ("dense",)}, "ort_int8_kinds"),
    ({"target": "tensorrt", "ort_int8_kinds": ("dense",)}, "ort_int8_kinds"),
    ({"target": "paper", "act_bits": 6}, "act_bits"),
    ({"target": "paper", "calib_method": "mse"}, "calib_method"),
    ({"target": "tensorrt", "calib_method": "kl"}, "calib_method"),
    ({"target": "tensorrt", "act_bits": 9}, "act_bits"),
    ({"target": "ort", "per_channel": False}, "per_channel"),
    ({"target": "tensorrt", "weight_symmetric": True}, "weight_symmetric"),
    ({"target": "tensorrt", "weight_format": "folded"}, "weight_format"),
    ({"target": "ort", "softmax_bits": 6}, "softmax_bits"),
    ({"target": "paper", "parts": {"conv_block"}, "log2_eps": 2.0**-10}, "log2_eps"),
    ({"reconstruct": "gptq", "reconstruct_device": "cpu"}, "reconstruct_device"),
    ({"reconstruct_device": "cuda"}, "reconstruct_device"),
    ({"reconstruct": "mgrq", "reconstruct_device": "gpu"}, "reconstruct_device"),
])
def test_ignored_options_are_errors(options, word):
    with pytest.raises(ValueError, match=word):
        QuantConfig(**options)


@pytest.mark.parametrize("options", [
    {"target": "ort", "ort_int8_kinds": ("dense",)},
    {"target": "tensorrt", "softmax_bits": 6},
    {"target": "tensorrt", "weight_bits": 6, "act_bits": 6, "calib_method": "mse"},
    {"target": "ort", "weight_bits": 4, "ort_int8_kinds": ("dense",)},
    {"target": "paper", "weight_bits": 4, "per_channel": True, "softmax_bits": 4},
    {"reconstruct": "brecq", "reconstruct_device": "cpu"},
    {"reconstruct": "gptq", "reconstruct_device": "auto"},
])
def test_applicable_options_are_accepted(options):
    QuantConfig(**options)


@pytest.mark.parametrize("options, method", [
    ({}, "minmax"),
    ({"target": "tensorrt"}, "minmax"),
    ({"target": "tensorrt", "weight_bits": 4}, "mse"),
    ({"target": "ort", "weight_bits": 3}, "mse"),
    ({"target": "tensorrt", "weight_bits": 4, "calib_method": "minmax"}, "minmax"),
    ({"target": "tensorrt", "weight_bits": 6, "act_bits": 6}, "minmax"),
    ({"target": "paper", "weight_bits": 4}, "minmax"),  # no activation ranges there
])
def test_activation_ranges_default_to_mse_for_4_bit_weights(options, method):
    """W4A8 on the real recognizer: GPTQ loses 2.00 points with mse ranges, 4.67 with
    min-max (docs/reconstruct_table.md); an explicit choice is kept."""
    assert QuantConfig(**options).range_method == method


def test_range_default_follows_replace():
    """The default is read, not stored: replacing the bits or the target moves it."""
    w4a8 = QuantConfig(target="tensorrt", weight_bits=4)
    assert replace(w4a8, weight_bits=8).range_method == "minmax"
    assert replace(w4a8, target="paper").range_method == "minmax"  # no refusal either
    assert replace(QuantConfig(target="tensorrt"), weight_bits=4).range_method == "mse"


def test_cli_leaves_the_range_default_to_the_config():
    from onnxquant.cli import config_from_args, build_parser

    args = build_parser("quantize").parse_args(["in.onnx", "out.onnx", "--target", "tensorrt",
                                      "--weight-bits", "4"])
    assert config_from_args(args).range_method == "mse"


@pytest.mark.parametrize("options, samples", [
    ({}, 32),
    ({"reconstruct": "gptq"}, 64),
    ({"reconstruct": "mgrq", "weight_bits": 4}, 64),
    ({"reconstruct": "gptq", "num_calib": 16}, 16),
    ({"num_calib": 100}, 100),
])
def test_calibration_samples_default_to_64_with_reconstruct(options, samples):
    """GPTQ fits its error feedback to the calibration samples: 64 by default under
    --reconstruct (docs/reconstruct_table.md, "How many calibration images"), the paper's 32
    otherwise; an explicit count is kept. Read, not stored: replace moves it."""
    cfg = QuantConfig(**options)
    assert cfg.calib_samples == samples
    if "num_calib" not in options:
        assert replace(cfg, reconstruct="none").calib_samples == 32


def test_cli_leaves_the_calibration_count_to_the_config():
    from onnxquant.cli import config_from_args, build_parser

    parse = build_parser("quantize").parse_args
    gptq = config_from_args(parse(["a.onnx", "b.onnx", "--reconstruct", "gptq"]))
    eight = config_from_args(parse(["a.onnx", "b.onnx", "--num-calib", "8"]))
    assert (gptq.calib_samples, eight.calib_samples) == (64, 8)


@pytest.mark.parametrize("count", [0, -1])
def test_calibration_count_must_be_positive(count):
    with pytest.raises(ValueError, match="num_calib"):
        QuantConfig(num_calib=count)


def test_cli_reports_an_ignored_option_in_one_line(capsys, tmp_path):
    code = main(["in.onnx", str(tmp_path / "out.onnx"), "--ort-int8-kinds", "dense"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ort_int8_kinds" in err[0]


def test_cli_argument_errors_take_two_lines(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["in.onnx", "out.onnx", "--weight-bits", "eight"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 2 and "--weight-bits" in err[0]


def test_ort_choice_is_recorded_in_the_metadata():
    from graphs import calibration, mixed_model, quantize

    result = quantize(mixed_model(), calibration(), target="ort", ort_int8_kinds=("dense",))
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert meta["onnxquant.ort_int8_kinds"] == "dense"
    assert meta["onnxquant.ort_int8_basis"] == "given"
    paper = quantize(mixed_model(), calibration())
    assert not any(p.key.startswith("onnxquant.") for p in paper.model.metadata_props)


def test_holdout_defaults_by_method():
    """None: the torch methods hold a quarter out, GPTQ none; a given share is kept."""
    assert QuantConfig(reconstruct="gptq").holdout == 0.0
    assert {QuantConfig(reconstruct=m).holdout for m in ("adaround", "brecq", "qdrop", "mgrq")} == {0.25}
    assert QuantConfig(reconstruct="brecq", reconstruct_holdout=0.0).holdout == 0.0
    assert QuantConfig(reconstruct="gptq", reconstruct_holdout=0.5).holdout == 0.5
    assert QuantConfig().holdout == 0.0
