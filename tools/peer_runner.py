"""Quantize one model with one peer (or onnxquant) at its default recipe; run by
tools/bench_quant_peers.py in that peer's own venv, one process per quantization.

    python tools/peer_runner.py RECIPE MODEL.onnx CALIB.npy OUT.onnx

CALIB.npy holds the calibration inputs (N x C x H x W float32), fed one sample at a time.
Prints ``RESULT {"peak_rss_mb": ...}`` (VmHWM of this process) on success; on failure,
``ERROR <type>: <first line of the message>`` and exit status 1. Imports only numpy, onnx and
the recipe's own package, so it runs in any peer's venv.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx


def input_name(model_path: str) -> str:
    graph = onnx.load(model_path, load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def samples(calib: str, name: str) -> list[dict]:
    return [{name: x[None]} for x in np.load(calib)]


class Reader:
    """onnxruntime-style CalibrationDataReader over the samples (duck-typed: get_next, rewind)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0

    def __len__(self):
        return len(self.feeds)


# ---- recipes: (model, feeds, out) -> None --------------------------------------------

def ort(model, feeds, out, per_channel=False):
    from onnxruntime.quantization import quantize_static

    quantize_static(model, out, Reader(feeds), per_channel=per_channel)  # QDQ, S8S8, MinMax


def nncf_default(model, feeds, out, model_type=None):
    import nncf

    q = nncf.quantize(onnx.load(model), nncf.Dataset(feeds), subset_size=len(feeds),
                      model_type=model_type)
    onnx.save(q, out)


def nncf_transformer(model, feeds, out):
    import nncf

    nncf_default(model, feeds, out, nncf.ModelType.TRANSFORMER)


def inc(model, feeds, out):
    from onnx_neural_compressor.quantization import config, quantize

    class IncReader(Reader):  # INC checks isinstance against its own abstract class
        pass

    from onnx_neural_compressor import data_reader
    data_reader.CalibrationDataReader.register(IncReader)
    quantize(model, out, config.StaticQuantConfig(
        calibration_data_reader=IncReader(feeds), calibration_sampling_size=len(feeds)))


def quark(model, feeds, out, name="A8W8"):
    from quark.onnx import ModelQuantizer, QConfig

    ModelQuantizer(QConfig.get_default_config(name)).quantize_model(model, out, Reader(feeds))


def aimet(model, feeds, out):
    from aimet_onnx.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(onnx.load(model))  # its defaults: W8A8, its default scheme
    sim.compute_encodings(feeds)
    save_aimet_qdq(sim, out)


def aimet_adaround_w4(model, feeds, out, iterations=100):
    """4-bit weights, 8-bit activations, AdaRound (the order of aimet-onnx's docs)."""
    from aimet_onnx import apply_adaround
    from aimet_onnx.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(onnx.load(model), param_type="int4", activation_type="int8")
    if iterations:
        apply_adaround(sim, feeds, num_iterations=iterations)
    sim.compute_encodings(feeds)
    save_aimet_qdq(sim, out)


def save_aimet_qdq(sim, out):
    onnx.save(sim.to_onnx_qdq(), out)


def onnxquant_recipe(model, feeds, out, target="tensorrt", **options):
    import onnxquant
    from onnxquant.model_io import save_model

    calib = np.concatenate([next(iter(f.values())) for f in feeds])
    if target == "ort":  # int8 on every conv kind and linear, as docs/int8.md's ort rows
        options["ort_int8_kinds"] = ("dense", "pointwise", "grouped", "depthwise", "stem",
                                     "linear")
    cfg = onnxquant.QuantConfig(target=target, num_calib=len(calib), **options)
    save_model(onnxquant.run(model, cfg, calib, None, progress=False).model, out)


RECIPES = {
    "ort-qdq": ort,
    "ort-qdq-perchannel": lambda m, f, o: ort(m, f, o, per_channel=True),
    "nncf": nncf_default,
    "nncf-transformer": nncf_transformer,
    "inc": inc,
    "quark-a8w8": quark,
    "quark-xint8": lambda m, f, o: quark(m, f, o, "XINT8"),
    "aimet": aimet,
    "aimet-w4a8": lambda m, f, o: aimet_adaround_w4(m, f, o, iterations=0),
    "aimet-adaround-w4a8": aimet_adaround_w4,
    "onnxquant-tensorrt": onnxquant_recipe,
    "onnxquant-tensorrt-auto": lambda m, f, o: onnxquant_recipe(m, f, o, auto=True),
    "onnxquant-ort": lambda m, f, o: onnxquant_recipe(m, f, o, target="ort"),
    "onnxquant-tensorrt-w4a8": lambda m, f, o: onnxquant_recipe(m, f, o, weight_bits=4),
    "onnxquant-tensorrt-w4a8-adaround": lambda m, f, o: onnxquant_recipe(
        m, f, o, weight_bits=4, reconstruct="adaround", reconstruct_iters=100),
    "onnxquant-tensorrt-w4a8-gptq": lambda m, f, o: onnxquant_recipe(
        m, f, o, weight_bits=4, reconstruct="gptq"),
    "onnxquant-tensorrt-w4a8-mgrq": lambda m, f, o: onnxquant_recipe(
        m, f, o, weight_bits=4, reconstruct="mgrq"),
}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) / 1024


def main(argv) -> int:
    recipe, model, calib, out = argv[0], *(str(Path(a).resolve()) for a in argv[1:])
    feeds = samples(calib, input_name(model))
    # some peers leave temporary files in the working directory: give them their own
    os.chdir(tempfile.mkdtemp(prefix=f"{recipe}.", dir=Path(out).parent))
    try:
        RECIPES[recipe](model, feeds, out)
    except Exception as exc:  # noqa: BLE001 - the driver records it as the peer's row
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"ERROR {type(exc).__name__}: {first[:200]}", flush=True)
        raise
    print("RESULT " + json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
