"""The torch side of ``--reconstruct`` on an NVIDIA GPU (``gpu`` tier; skipped without CUDA).

reconstruct_torch runs on CUDA whenever torch sees a device. Here: the executor on CUDA
gives the CPU's values on graphs that compute shapes at run time (Shape, Range,
ConstantOfShape feeding Concat/Reshape beside constants that moved to the device), every
method really steps on CUDA and is no worse than round-to-nearest, and the same seed gives
the same bytes there too.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from graphs import calibration, mixed_model, quantize, sdpa_model  # noqa: E402
from onnxquant import reconstruct_torch  # noqa: E402
from onnxquant.torch_graph import GraphModule  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")]


def shape_arithmetic_model() -> onnx.ModelProto:
    """x [N, C, H, W] -> reshape to [N, C, H*W] through Shape/Gather/Concat with a constant,
    plus Range and ConstantOfShape made from the run-time shape."""
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i01"], ["nc"], axis=0),
        helper.make_node("Concat", ["nc", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["last"], start=2),
        helper.make_node("Squeeze", ["last", "axis0"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["ramp"], to=TensorProto.FLOAT),
        helper.make_node("ConstantOfShape", ["last"], ["halves"],
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Mul", ["ramp", "halves"], ["scaled"]),
        helper.make_node("Add", ["flat", "scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 15])],
        [ints("i01", [0, 1]), ints("minus1", [-1]), ints("axis0", [0]), ints("zero", 0),
         ints("one", 1)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make", [shape_arithmetic_model, mixed_model,
                                  lambda: sdpa_model("levit", head=True), "bundled"])
def test_executor_on_cuda_gives_the_cpu_values(make):
    from conftest import BUNDLED

    if make == "bundled":
        model = onnx.load(BUNDLED / "mobilevit_xxs.imagenette.onnx")
        x = np.random.default_rng(0).random((2, 3, 128, 128), dtype=np.float32)
    else:
        model = make()
        x = np.random.default_rng(2).standard_normal((3, 4, 3, 5) if make is shape_arithmetic_model
                                                     else (3, 4, 4, 4)).astype(np.float32)
    name = model.graph.input[0].name
    with torch.no_grad():
        want = GraphModule(model).run({name: torch.from_numpy(x)})
        with reconstruct_torch._cuda_settings(torch.device("cuda")):  # no TF32
            got = GraphModule(model).to("cuda").run({name: torch.from_numpy(x).to("cuda")})
    for k, w in want.items():
        assert got[k].device.type == "cuda"
        np.testing.assert_allclose(got[k].cpu().numpy(), w.numpy(), rtol=0,
                                   atol=1e-5 * max(float(w.abs().max()), 1.0))


@pytest.mark.parametrize("method", reconstruct_torch.METHODS)
def test_each_method_steps_on_cuda_and_is_no_worse_than_round_to_nearest(method,
                                                                         rounding_devices):
    res = quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4,
                   per_channel=True, weight_symmetric=True, reconstruct=method,
                   reconstruct_iters=50)
    assert rounding_devices and set(rounding_devices) == {"cuda"}
    blocks = res.plan.reconstruction
    assert blocks and all(r.error <= r.rtn_error for r in blocks)
    check = res.plan.reconstruction_check
    assert check.kept and min(check.error, check.gptq_error) <= check.rtn_error


@pytest.mark.parametrize("method", reconstruct_torch.METHODS)
def test_same_seed_same_bytes_on_cuda(method):
    model, calib = mixed_model(seed=4), calibration(16, seed=1)
    cfg = dict(target="tensorrt", weight_bits=4, reconstruct=method, reconstruct_iters=20)
    a, b = quantize(model, calib, **cfg), quantize(model, calib, **cfg)
    assert a.model.SerializeToString() == b.model.SerializeToString()
