"""The body the log2 op gets in the written file (functions.py): "table" or "bitcast".

The bitcast body reads the input's float bits with BitCast (opset 26) and costs one table
lookup per element instead of a Log and two lookups (2.7-4x cheaper on onnxruntime CPU,
docs/log2_body.md); without its Clip where every log2 op reads a Softmax output
(``bitcast_variant``). A model below opset 26 is converted first (checked_convert.py). Kept only
if, in onnxruntime on a calibration input:

- the converted model (table body) gives the original's outputs (float tolerance; where a
  kernel of the new opset rounds 1 ulp apart and a quantizer turns that into a step, again
  with the activation quantizers bypassed), and
- the bitcast body gives bit-identical outputs to the table body at the same opset (both
  compute ``quantizers.log2_fake_quant``), and runs with the session's optimizations on.

Otherwise the model keeps the table body at its own opset and the note says why ("auto"),
or the run stops with the reason (an explicit "bitcast").
"""

from __future__ import annotations

import onnx

from . import functions
from .checked_convert import at_least, copy_model, differs
from .config import QuantConfig
from .errors import UserError
from .functions import has_log2_ops
from .model_io import is_large
from .opset import model_opset


def chosen_body(config: QuantConfig) -> str:
    """"auto" -> "bitcast", except on target tensorrt (its plugin replaces the body)."""
    if config.log2_body != "auto":
        return config.log2_body
    return "table" if config.target == "tensorrt" else "bitcast"


def apply_body(model: onnx.ModelProto, config: QuantConfig, name: str, sample
               ) -> tuple[onnx.ModelProto, str | None]:
    """(model with the chosen body, note for the summary or None). ``model`` is not
    modified. ``sample()``: a calibration feed the checks run on."""
    if not has_log2_ops(model) or chosen_body(config) == "table":
        return model, None
    opset = model_opset(model)
    fast, why, how = (None, "the model needs external data (over 2 GB)", "") \
        if is_large(model) else _bitcast(model, sample())
    if why is None:
        ops = sum(functions.is_log2(n) for n in fast.graph.node)
        return fast, (f"log2 op: BitCast body, one lookup per element ({how}), up to 1 MB of "
                      f"table per op at load ({ops} ops); for a runtime without opset 26 or "
                      "less memory: --log2-body table")
    if config.log2_body == "bitcast":
        raise UserError(f"{name}: --log2-body bitcast: {why}; use --log2-body table")
    return model, f"log2 op kept its table body at opset {opset}: {why}"


def bitcast_variant(model: onnx.ModelProto) -> str:
    """"bitcast_nonnegative" (no Clip: 12-18 % less time in the op, a 1 MB table instead of
    0.5 MB per log2 op) when every log2 op reads a Softmax output, which is never negative
    (as in every file onnxquant writes); else "bitcast"."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    log2_inputs = [n.input[0] for n in model.graph.node if functions.is_log2(n)]
    fed = all(producer.get(name) == "Softmax" for name in log2_inputs)
    return "bitcast_nonnegative" if fed else "bitcast"


def _bitcast(model: onnx.ModelProto, feed: dict) -> tuple:
    """(model with the bitcast body at opset >= 26, None, how) or (None, why not, None)."""
    opset, least = model_opset(model), functions.BITCAST_OPSET
    rounding: list = []
    target, why = at_least(model, least, feed, rounding)
    if why is not None:
        return None, why, None
    fast = copy_model(target)
    functions.install(fast, bitcast_variant(target))
    why = (differs(target, fast, "the BitCast body gives other codes than the table body",
                   feed, exact=True)
           or differs(target, fast, "the optimized BitCast model gives other outputs", feed,
                      exact=False, optimized=True))
    if why is not None:
        return None, why, None
    how = f"opset {opset} converted to {least}" if opset < least else f"opset {opset}"
    if rounding:
        how += ("; float rounding moved log2 codes (opset change): outputs agree with the "
                "quantizers bypassed")
    return fast, None, how
