"""Refuse graphs the method cannot handle, with the fix, before any work is done.

- already quantized (QuantizeLinear/DequantizeLinear/QLinear*/our log2 op): quantize the float model
- fused attention (an ``Attention``-type op hides the Softmax): re-export unfused
- neither Softmax nor Conv: nothing this method quantizes
- float16/bfloat16 weights or image input: export in float32 and quantize that (the 8-bit
  weights replace the float ones either way; half-precision Q/DQ needs opset 19 scales)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.errors import UserError
from onnxquant.functions import OP_TYPE

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
             "ConvInteger", OP_TYPE}
FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention",
                   "PackedMultiHeadAttention", "ScaledDotProductAttention"}
REEXPORT = ("re-export with fused attention off: timm.create_model(..., exportable=True) or "
            "timm.layers.set_fused_attn(False), then torch.onnx.export(..., opset_version=17, "
            "dynamo=False)")


def _is_half(dtype) -> bool:
    return dtype is not None and (dtype == np.float16 or "bfloat16" in str(dtype))


def _refuse_half(graph: gs.Graph) -> None:
    for tensor in list(graph.inputs) + [t for n in graph.nodes for t in n.inputs[1:2]]:
        if _is_half(getattr(tensor, "dtype", None)):
            raise UserError(f"tensor {tensor.name!r} is float16/bfloat16: quantize the model's "
                            "float32 export instead (torch: model.float() before "
                            "torch.onnx.export)")


def run(graph: gs.Graph, ctx) -> int:
    """Raise UserError for unsupported graphs; returns the number of nodes checked."""
    for node in graph.nodes:
        if node.op in QUANT_OPS or node.op.startswith("QLinear"):
            raise UserError(f"node {node.name!r} ({node.op}): the model is already quantized; "
                            "pass the float model")
        if node.op in FUSED_ATTENTION:
            raise UserError(f"node {node.name!r} is a fused {node.op} op with no Softmax to "
                            f"quantize; {REEXPORT}")
    _refuse_half(graph)
    ops = {n.op for n in graph.nodes}
    if "Softmax" not in ops and "Conv" not in ops:
        raise UserError(f"graph {graph.name!r} has no Softmax and no Conv: nothing for "
                        "EfficientQuant to quantize (is this a vision model export?)")
    return len(graph.nodes)
