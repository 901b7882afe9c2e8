"""W4A8 (tensorrt target) with min-max vs MSE activation ranges, RTN and GPTQ, on both
reference checkpoints (1000 imagenette/val images) and the real recognizer (300 lines):
the measurement behind QuantConfig's calib_method default for 4-bit weights.

    python tools/w4a8_ranges.py [--work /tmp/w4a8_ranges]

Prints one markdown row per model and recipe: top-1 / line accuracy, change, agreement.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnxquant import QuantConfig, api, ocr  # noqa: E402

CONFIGS = {f"{m} {r}": QuantConfig(target="tensorrt", weight_bits=4, calib_method=m,
                                   reconstruct=r)
           for m in ("minmax", "mse") for r in ("none", "gptq")}


def quantized(source, calib, pre, out: Path, prefix: str) -> list:
    paths = []
    for label, cfg in CONFIGS.items():
        t = time.perf_counter()
        model = api.run(str(source), cfg, str(calib), pre, progress=False).model
        paths.append(out / f"{prefix}.{label.replace(' ', '_')}.onnx")
        onnx.save(model, paths[-1])
        print(prefix, label, f"{time.perf_counter() - t:.1f} s", flush=True)
    return paths


def reference_rows(name: str, out: Path) -> None:
    ref = benchlib.reference(name)
    paths = quantized(ref["path"], benchlib.CALIB, ref["pre"], out, name)
    _, rows = benchlib.against_fp32(ref["path"], paths, benchlib.IMAGE_SETS["imagenette/val"],
                                    ref, 1000, name)
    for label, r in zip(CONFIGS, rows):
        print(f"| {name} | {label} | {r['top1']:.2f} | {r['change']:+.2f} | {r['agree']:.1f} |")


def recognizer_rows(out: Path) -> None:
    rec = benchlib.ASSETS / "real" / "PP-OCRv6_rec_small.onnx"
    calib = out / "rec_calib.npy"
    np.save(calib, ocr.calibration_array(benchlib.NUM_CALIB, seed=1001))
    paths = quantized(rec, calib, None, out, "rec")
    res = ocr.evaluate_many([str(rec)] + [str(p) for p in paths], ocr.render_lines(300, seed=1),
                            alphabet=ocr.load_alphabet(rec))
    for label, r in zip(CONFIGS, res[1:]):
        print(f"| PP-OCRv6_rec_small | {label} | {r.line_acc:.2f} | "
              f"{r.line_acc - res[0].line_acc:+.2f} | {ocr.agreement(res[0], r):.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/w4a8_ranges")
    out = Path(p.parse_args(argv).work)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("mobilevit_xxs", "mobilevitv2_050"):
        reference_rows(name, out)
    recognizer_rows(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
