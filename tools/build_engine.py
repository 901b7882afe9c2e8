"""Build a TensorRT engine from an onnxquant output model and print what it contains.

    python tools/build_engine.py model.onnx [-o model.engine] [--compute-capability SM89]

Works without a GPU for TensorRT-RTX (ahead-of-time build for the given compute capability;
"none" builds for the GPU present). The log2 plugin is registered first unless --no-plugin,
in which case each Log2QuantDequant node is built from its ONNX function body.
"""

from __future__ import annotations

import argparse
import sys

from onnxquant import tensorrt as qt


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", help="ONNX model (onnxquant output or float)")
    ap.add_argument("-o", "--engine", help="engine file (default: beside the model, .engine)")
    ap.add_argument("--compute-capability", default="SM89",
                    help='target GPU for an ahead-of-time build, e.g. SM86, SM89, SM120; '
                         '"none": the GPU present (default: SM89)')
    ap.add_argument("--no-plugin", action="store_true",
                    help="do not register the log2 plugin (build its function body instead)")
    ap.add_argument("--no-int8", action="store_true",
                    help="do not set TensorRT's INT8 flag (TensorRT-RTX has none)")
    ap.add_argument("--batch", type=int, default=1, help="largest batch for a dynamic batch")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cc = None if args.compute_capability.lower() == "none" else args.compute_capability
    try:
        report = qt.build_engine(args.onnx, args.engine, int8=not args.no_int8,
                                 compute_capability=cc, use_plugin=not args.no_plugin,
                                 batch=args.batch)
    except qt.TensorRTError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
