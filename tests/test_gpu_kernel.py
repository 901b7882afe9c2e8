"""The plugin's CUDA kernel against the NumPy reference, code for code.

The source is compiled with NVRTC wherever the CUDA bindings are installed (no GPU needed);
running it needs an NVIDIA GPU and CuPy (``gpu`` tier).
"""

import re
from types import SimpleNamespace

import numpy as np
import pytest

from onnxquant import quantizers as Q
from onnxquant import trt_plugin


def _gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "skip"
        return None


cp = _gpu()
needs_gpu = pytest.mark.skipif(cp is None, reason="no NVIDIA GPU/CuPy")


def test_kernel_source_compiles_with_nvrtc():
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="no CUDA bindings (NVRTC)")
    err, prog = nvrtc.nvrtcCreateProgram(trt_plugin.KERNEL_SOURCE.encode(), b"k.cu", 0, [], [])
    opts = [b"--gpu-architecture=compute_75"] + [o.encode() for o in trt_plugin.KERNEL_OPTIONS]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    ptx = ptx.decode()
    assert f".entry {trt_plugin.KERNEL_NAME}" in ptx
    assert re.search(r"cvt\.rmi\.f32\.f32", ptx)  # floorf: the code estimate
    assert "ld.global" in ptx  # table lookups (thresholds, levels)


def _inputs(rng):
    flat = rng.random(100_000, dtype=np.float32)
    flat[:100] = 0.0
    flat[100:200] = np.float32(2.0**-16)  # exactly eps
    flat[200:300] = rng.random(100, dtype=np.float32) * 1e-9  # below eps
    flat[300:400] = 1.0 + rng.random(100, dtype=np.float32)  # above calibrated max
    logits = rng.normal(0, 4, (8, 4, 64, 64)).astype(np.float32)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return {"uniform": flat, "softmax": (e / e.sum(-1, keepdims=True)).astype(np.float32)}


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["uniform", "softmax"])
def test_codes_match_numpy_reference(rng, bits, kind):
    x = _inputs(rng)[kind]
    p = Q.log2_params(float(x.min()), float(x.max()), bits=bits)
    codes, y = trt_plugin.log2_qdq_cuda(cp.asarray(x), p)
    expected = Q.log2_quantize(x, p)
    np.testing.assert_array_equal(cp.asnumpy(codes), expected)
    np.testing.assert_allclose(cp.asnumpy(y), Q.log2_dequantize(expected, p), rtol=1e-6, atol=0)


@needs_gpu
@pytest.mark.gpu
def test_enqueue_path_on_raw_pointers(rng):
    x = _inputs(rng)["softmax"]
    p = Q.log2_params(float(x.min()), float(x.max()))
    src, dst = cp.asarray(x), cp.empty(x.shape, cp.float32)
    stream = cp.cuda.Stream()
    desc = SimpleNamespace(dims=x.shape)
    trt_plugin._enqueue(p, desc, src.data.ptr, dst.data.ptr, stream.ptr)
    stream.synchronize()
    np.testing.assert_allclose(cp.asnumpy(dst), Q.log2_fake_quant(x, p), rtol=1e-6, atol=0)
