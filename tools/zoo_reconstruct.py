"""Every --reconstruct method on every zoo export (64 px where it runs, seeded random
weights, standard-normal calibration): whether it runs, and the model's relative output
error on the calibration samples against round to nearest. A crash check across the
architectures the issue names (TinyViT, EdgeNeXt, LeViT, MobileNetV4 ...), not an accuracy
measure: random weights make the errors themselves meaningless.

    python tools/zoo_reconstruct.py [--methods gptq,adaround,qdrop,mgrq] [--recipes W4A8]
                                    [--models tiny_vit_5m_224,...] [--samples 8] [--iters 5]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np
import onnx

import onnxquant
from onnxquant import QuantConfig, block_runs
from onnxquant.config import PARTS
from onnxquant.errors import UserError
from onnxquant.models import zoo
from onnxquant.models.export import zoo_cache_small

RECIPES = {
    "W4": dict(weight_bits=4),
    "W4A8": dict(target="tensorrt", weight_bits=4),
    "W3": dict(weight_bits=3, weight_symmetric=True),
    "W2": dict(weight_bits=2),
    "W4-ort": dict(target="ort", weight_bits=4),
    "W4-lin-b32": dict(weight_bits=4, weight_symmetric=True, parts=frozenset(PARTS),
                       weight_block_size=32),
    "W4A8-b32": dict(target="tensorrt", weight_bits=4, weight_block_size=32),
    "W4-folded": dict(weight_bits=4, weight_format="folded"),
    "W4-auto": dict(weight_bits=4, auto=True),
}


def _export(name: str):
    return zoo_cache_small(name)[0]


def _calibration(model: onnx.ModelProto, samples: int) -> np.ndarray:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [samples] + [d.dim_value or 1 for d in dims[1:]]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _one(model, x, y, method: str, recipe: dict, iters: int) -> str:
    extra = {} if method in ("none", "gptq") else dict(reconstruct_iters=iters)
    start = time.perf_counter()
    try:
        res = onnxquant.run(model, QuantConfig(reconstruct=method, **extra, **recipe), x,
                            progress=False)
    except UserError as exc:
        return f"refused: {str(exc)[:160]}"
    except Exception:  # noqa: BLE001 - a crash is what this looks for
        traceback.print_exc(limit=4)
        return "CRASH"
    got = block_runs.run(res.model, {model.graph.input[0].name: x}, [model.graph.output[0].name])
    err = block_runs.relative_error(got, y)
    return f"ok, relative error {err:.3e}, {time.perf_counter() - start:.0f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="gptq,adaround,brecq,qdrop,mgrq")
    p.add_argument("--recipes", default="W4,W4A8", help=f"of {','.join(RECIPES)}")
    p.add_argument("--models", default=",".join(zoo.names()))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--iters", type=int, default=5, help="torch methods' steps per layer/block")
    args = p.parse_args(argv)
    crashes = 0
    for name in args.models.split(","):
        model = onnx.load(str(_export(name)))
        x = _calibration(model, args.samples)
        feed = {model.graph.input[0].name: x}
        y = block_runs.run(model, feed, [model.graph.output[0].name])
        for recipe in args.recipes.split(","):
            for method in ["none"] + args.methods.split(","):
                line = _one(model, x, y, method, RECIPES[recipe], args.iters)
                crashes += line == "CRASH"
                print(f"{name:28s} {recipe:5s} {method:9s} {line}", flush=True)
    print(f"{crashes} crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
