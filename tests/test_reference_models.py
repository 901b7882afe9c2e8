"""Real checkpoints (../shared/assets/reference): block map counts, valid output, numerics."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxquant
from onnxquant import QuantConfig
from conftest import need_shared

# (softmax patterns, conv roles) measured with `onnxquant inspect -v`; the roles follow the
# rule in passes/find_blocks.py (MobileViT v1: local kxk + in/out 1x1 inside the transformer,
# fusion conv and the preceding IR projection are the bridges).
EXPECTED = {
    "mobilevit_xxs": ({"sdpa": 9}, {"conv_block": 20, "transformer": 9, "bridge": 6}),
    "mobilevitv2_050": ({"separable": 9}, {"conv_block": 22, "transformer": 36, "bridge": 6}),
}


@pytest.fixture(params=sorted(EXPECTED))
def reference(request):
    return request.param, need_shared("reference", f"{request.param}.imagenette.onnx")


def _calib(rng, n=8):
    return rng.random((n, 3, 128, 128), np.float32)


def test_block_map_counts(reference):
    name, path = reference
    _, plan = onnxquant.analyze(str(path))
    patterns = {}
    for a in plan.attention:
        patterns[a.pattern] = patterns.get(a.pattern, 0) + 1
    assert (patterns, plan.role_counts()) == EXPECTED[name]
    assert not plan.unmatched_softmax


@pytest.mark.parametrize("config", [QuantConfig(per_channel=False), QuantConfig(),
                                    QuantConfig(weight_symmetric=True, weight_bits=6)],
                         ids=["paper", "per-channel", "sym6"])
def test_quantized_model_is_valid_and_close(reference, config, rng):
    name, path = reference
    result = onnxquant.run(str(path), config, calibration=_calib(rng), progress=False)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    n_conv = sum(EXPECTED[name][1].values())
    assert ops.count("Log2QuantDequant") == 9
    assert ops.count("DequantizeLinear") == n_conv == ops.count("Conv")
    x = _calib(np.random.default_rng(1), 4)
    y0 = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    # logits of these models span about +-10; measured max error 0.1-0.5 for 8-bit
    assert np.abs(y - y0).max() < (0.6 if config.weight_bits == 8 else 2.0)
    assert np.abs(y - y0).max() > 0  # something was quantized


def test_ablation_parts(reference, rng):
    name, path = reference
    roles = EXPECTED[name][1]
    for part in ("conv_block", "transformer", "bridge", "softmax"):
        result = onnxquant.run(str(path), QuantConfig(parts={part}), _calib(rng), progress=False)
        ops = [n.op_type for n in result.model.graph.node]
        assert ops.count("DequantizeLinear") == roles.get(part, 0)
        assert ops.count("Log2QuantDequant") == (9 if part == "softmax" else 0)
