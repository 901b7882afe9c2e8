"""--exclude: matching nodes stay float, the rest is quantized as before; typos are errors."""

import numpy as np
import pytest

from onnxquant.errors import UserError
from graphs import (calibration, log2_nodes, mixed_model, nodes_by_name, producer_of, quantize,
                    run_ort, weight_dq)


def test_excluded_conv_keeps_its_float_weight():
    model = mixed_model()
    result = quantize(model, calibration(), target="tensorrt", exclude=("conv_out",))
    by_node = {c.node: c for c in result.plan.convs}
    assert not by_node["conv_out"].quantize and not by_node["conv_out"].int8_input
    assert all(c.quantize for n, c in by_node.items() if n != "conv_out")
    conv_out = nodes_by_name(result.model)["conv_out"]
    assert producer_of(result.model, conv_out.input[1]) is None  # the float initializer
    assert weight_dq(result.model, "conv_in") is not None
    assert "kept float by --exclude: 1 node(s)" in result.plan.notes


def test_patterns_match_attention_and_linears():
    model = mixed_model()
    result = quantize(model, calibration(), target="tensorrt", exclude=("attn_*",))
    assert not log2_nodes(result.model)
    assert not any(s.quantize for s in result.plan.linears if s.node.startswith("attn_"))
    x = calibration(seed=2)
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    assert np.abs(y - yq).max() / np.abs(y).max() < 0.05


def test_a_pattern_matching_nothing_is_an_error():
    with pytest.raises(UserError, match="'no_such_node' matches no"):
        quantize(mixed_model(), calibration(), exclude=("no_such_node",))
