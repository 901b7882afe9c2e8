"""The hybrid CNN-transformer models onnxquant is tested on, with their ONNX shape.

Each entry records the attention topology (DESIGN.md section 2) and the op counts of a
`models.export.export` (timm 1.0.31, torch 2.14.1, opset 17, dynamo=False, fused
attention off) at the default input size. Measured by exporting every entry with seeded
random weights (`zoo_cache`) and counting nodes; onnxruntime matched torch on a seeded
batch of 2 for all of them (max abs diff <= 1.2e-6; <= 1.6e-6 for levit_128s and
mobilenetv4_hybrid_medium with all weights re-randomised, as their random-init logits are ~0).
Node counts depend on input size (mobilevit_xxs: 834 at 256 px, 739 at 128 px; op counts
of Softmax/Conv/MatMul are the same, and at 64 px, which the tests use). No export
contains a fused `Attention` op. Export s: wall time of `zoo_cache` (build, one check
forward, trace, save) on a 2-core CPU shared with other jobs (load ~7); an earlier run on
a quieter machine took 3-5x less (mobilevit_xxs 1.9 s, efficientformer_l7 8.3 s). The
first row also pays torch/timm first-use warm-up.

| model                     | nodes | Softmax | Conv | MatMul | MB    | export s |
|---------------------------|-------|---------|------|--------|-------|----------|
| mobilevit_xxs             |   834 |       9 |   35 |     54 |   5.0 |     10.2 |
| mobilevit_s               |   828 |       9 |   35 |     54 |  21.3 |      5.0 |
| mobilevitv2_050           |   712 |       9 |   64 |      0 |   5.3 |      1.5 |
| efficientformer_l1        |   334 |       1 |   33 |      6 |  46.8 |      2.9 |
| efficientformerv2_s0      |   645 |       5 |   83 |     10 |  13.8 |      2.6 |
| fastvit_t8                |   494 |       0 |   68 |      0 |  15.3 |      3.6 |
| fastvit_sa12              |   689 |       2 |   75 |      8 |  44.1 |      4.1 |
| tiny_vit_5m_224           |  1388 |      10 |   27 |     60 |  46.5 |      4.5 |
| edgenext_xx_small         |   767 |       3 |   20 |     36 |   5.2 |      1.7 |
| levit_128s                |   920 |      11 |    4 |     68 |  30.1 |      3.9 |
| mobilenetv4_hybrid_medium |  1022 |       8 |  120 |     16 |  42.1 |     11.3 |
| efficientvit_b0           |   454 |       0 |   50 |      9 |  13.1 |      3.0 |
| efficientformer_l7        |  1085 |       8 |   65 |     48 | 313.2 |     23.3 |

Other exporters and opsets (tools/zoo_exporters.py, docs/exporters.md; the 12 models above
but efficientformer_l7, 64 px, seed 0): attention found = this table's Softmax count, with
the same patterns and conv roles as the opset-17 export, in every variant produced; recipes:
paper, paper per-channel, ort (dense, linear), tensorrt, each passing the full checker and
running in onnxruntime with one log2 op per attention block.

| export                                     | opset          | produced | recipes pass  |
|--------------------------------------------|----------------|----------|---------------|
| torchscript (this table)                   | 17             | 12 / 12  | 48 / 48       |
| dynamo (`export(..., exporter="dynamo")`)  | 18             | 12 / 12  | 48 / 48       |
| onnx.version_converter from opset 17       | 18, 19, 21, 23 | 12 / 12  | 48 / 48 each  |
| onnx.version_converter from opset 17       | 11, 13, 14, 15 | 0 / 12   | -             |
| torchscript, `opset=N`                     | 13, 14, 15     | 12 / 12  | 48 / 48 each  |
| torchscript, `opset=11`                    | 11             | 12 / 12  | 18 / 48 (*)   |

(*) the opset 11 -> 13 upgrade inside onnxquant.run wraps each Softmax in Flatten/Reshape,
so no log2 op is inserted although `inspect` finds the attention (docs/exporters.md).

Importing this module needs neither torch nor timm.
"""
from __future__ import annotations

from dataclasses import dataclass

# Attention topologies (DESIGN.md section 2); the value names what sits around Softmax.
QK_SOFTMAX_AV = "MatMul(q,kT) -> Softmax -> MatMul(.,v)"
QK_SCALE_SOFTMAX_AV = "MatMul -> Mul(scale) -> Softmax -> MatMul"
QK_BIAS_SOFTMAX_AV = "MatMul -> Add(bias) -> Softmax -> MatMul"
QK_SCALE_BIAS_SOFTMAX_AV = "MatMul -> Mul(scale) -> Add(attention bias) -> Softmax -> MatMul"
TALKING_HEADS = "MatMul -> Mul -> Add -> Conv1x1 -> Softmax -> Conv1x1 -> MatMul (talking heads)"
SEPARABLE = "Conv1x1 -> Split -> Softmax(axis -1) -> Mul -> ReduceSum (separable, no MatMul)"
NO_SOFTMAX = "none (no Softmax: quantize the convs only)"


@dataclass(frozen=True)
class ZooEntry:
    """One timm model: what it is, its attention topology, and its measured ONNX shape."""

    name: str  # timm model name
    family: str
    topology: str
    softmax: int  # Softmax nodes in the export at input_size
    conv: int  # Conv nodes
    matmul: int  # MatMul nodes
    input_size: int  # square side of timm's default input
    params_m: float  # parameters, millions, 1000-class head
    notes: str = ""
    large: bool = False  # for scaling tests only; slow to export


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("mobilevit_xxs", "MobileViT v1", QK_SOFTMAX_AV, 9, 35, 54, 256, 1.272,
             "Paper model. Local/fusion convs sit inside each transformer block. "
             "Reference Imagenette checkpoint in shared/assets/reference (128 px)."),
    ZooEntry("mobilevit_s", "MobileViT v1", QK_SOFTMAX_AV, 9, 35, 54, 256, 5.579,
             "Paper model; same graph as xxs with wider channels."),
    ZooEntry("mobilevitv2_050", "MobileViT v2", SEPARABLE, 9, 64, 0, 256, 1.371,
             "Paper model. Separable linear attention: Softmax over tokens of a 1x1 Conv "
             "output, no MatMul at all. Reference Imagenette checkpoint (128 px)."),
    ZooEntry("efficientformer_l1", "EfficientFormer v1", QK_SCALE_BIAS_SOFTMAX_AV, 1, 33, 6,
             224, 12.290, "One attention block (last stage); fixed input size (bias table)."),
    ZooEntry("efficientformerv2_s0", "EfficientFormer v2", TALKING_HEADS, 5, 83, 10, 224,
             3.600, "4 of 5 attentions use talking heads (Conv1x1 around Softmax); the "
             "downsampling attention is plain MatMul -> Mul -> Add -> Softmax."),
    ZooEntry("fastvit_t8", "FastViT", NO_SOFTMAX, 0, 68, 0, 256, 4.026,
             "Pure conv (RepMixer everywhere); exported unreparameterised."),
    ZooEntry("fastvit_sa12", "FastViT-SA", QK_SOFTMAX_AV, 2, 75, 8, 256, 11.581,
             "Attention only in the last stage (2 blocks)."),
    ZooEntry("tiny_vit_5m_224", "TinyViT", QK_BIAS_SOFTMAX_AV, 10, 27, 60, 224, 12.083,
             "Windowed attention with relative-position bias; MBConv first stage."),
    ZooEntry("edgenext_xx_small", "EdgeNeXt", QK_SCALE_SOFTMAX_AV, 3, 20, 36, 256, 1.327,
             "Transposed (channel) attention, temperature Mul before Softmax."),
    ZooEntry("levit_128s", "LeViT", QK_SCALE_BIAS_SOFTMAX_AV, 11, 4, 68, 224, 7.777,
             "Conv stem only (4 Conv); token Linear layers export as MatMul + Add (only the "
             "2 heads are Gemm). Fixed input size. "
             "Random-init logits are ~1e-4 (measured): compare exports relatively."),
    ZooEntry("mobilenetv4_hybrid_medium", "MobileNetV4-hybrid", QK_SOFTMAX_AV, 8, 120, 16,
             256, 11.075, "Mobile MQA (multi-query attention), 4 blocks each in blocks.2 and "
             "blocks.3. Random-init logits are ~1e-15 (measured): compare exports relatively."),
    ZooEntry("efficientvit_b0", "EfficientViT (MIT)", NO_SOFTMAX, 0, 50, 9, 224, 3.410,
             "ReLU linear attention: MatMul without Softmax; only the convs are quantized."),
    ZooEntry("efficientformer_l7", "EfficientFormer v1", QK_SCALE_BIAS_SOFTMAX_AV, 8, 65, 48,
             224, 82.229, "Large model for scaling tests: 313 MB export, 8 attention blocks "
             "in the last stage.", large=True),
)


def names(include_large: bool = False) -> tuple[str, ...]:
    """timm names of the zoo, in table order; large models only when asked."""
    return tuple(e.name for e in ZOO if include_large or not e.large)


def get(name: str) -> ZooEntry:
    """The zoo entry for a timm name; KeyError listing the known names otherwise."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"{name!r} is not in the zoo; known: {', '.join(names(True))}")
