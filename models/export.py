"""Export a timm hybrid model to ONNX (opset 17, legacy TorchScript exporter).

    timm.create_model(exportable=True, fused attention off) -> [local weights] -> eval
      -> torch.onnx.export(dynamo=False, opset 17, input "input", output "logits",
                           dynamic batch) -> temp file in the target folder -> os.replace

Why these settings (DESIGN.md section 5): the dynamo exporter silently emits opset 18, and
fused attention (`F.scaled_dot_product_attention`) hides the Softmax that the log2
activation quantizer anchors on. No timm 1.0.31 export here produced an ONNX `Attention` op.

`exporter="dynamo"` (CLI `--exporter dynamo`) uses `torch.onnx.export(dynamo=True)` at opset
18 instead (needs `onnxscript`; 4-25x slower to export here); `opset=` picks another opset for
either exporter. The default (TorchScript, opset 17) writes the same bytes as before these
options existed; other choices add `exporter`/`opset` metadata. docs/exporters.md: what
onnxquant finds in dynamo exports and in opsets 11-23 of the zoo.

Weights: `pretrained=True` is timm's normal hub path for users; here (no network) pass a
local `.safetensors` / `.pth` / `.pt` file instead. `num_classes` is read from the head
weight of that file when not given.

torch, timm and safetensors are imported inside functions so that `onnxquant.models`
imports without them.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from ..errors import UserError

OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
DYNAMO_OPSET = 18  # what torch.onnx.export(dynamo=True) writes when no opset is given
log = logging.getLogger("onnxquant")
_PREFIXES = ("module.", "model.")
_CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")  # timm's order


class ExportError(UserError):
    """A user error during export (unknown name, bad weights file); one-line message."""


def check_name(name: str) -> None:
    """Raise ExportError naming close timm models when `name` is not a timm model."""
    import timm

    if name.split(".")[0] in timm.list_models():  # "name.tag" selects pretrained weights
        return
    stem = name.split("_")[0].split(".")[0]
    pool = timm.list_models(f"*{stem}*") or timm.list_models()
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5) or pool[:5]
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ExportError(f"unknown timm model '{name}'{hint}")


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read a checkpoint file into a flat state dict, stripping 'module.'/'model.' prefixes."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"weights file not found: {path}")
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ExportError(f"{path}: unsupported weights format (use .safetensors, .pth or .pt)")
    try:
        sd = _read_checkpoint(path)
    except Exception as err:  # corrupt file, non-tensor pickle refused by weights_only
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise ExportError(f"{path}: cannot read weights ({type(err).__name__}: {first})") from None
    return {_strip_prefix(k): v for k, v in sd.items()}


def _read_checkpoint(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in _CONTAINER_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            return sd[key]
    return sd


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def infer_num_classes(name: str, state_dict: dict) -> int | None:
    """Class count from the head weight named by timm's pretrained cfg, None if absent."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    heads = cfg.classifier if cfg is not None else None
    heads = (heads,) if isinstance(heads, str) else tuple(heads or ())
    for head in heads:
        weight = state_dict.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


@contextlib.contextmanager
def _unfused_attention():
    """Turn timm's fused attention off while building, then restore the user's setting."""
    import timm.layers
    from timm.layers import config

    saved = getattr(config, "_USE_FUSED_ATTN", None)
    timm.layers.set_fused_attn(False)
    try:
        yield
    finally:
        if saved is not None:
            config._USE_FUSED_ATTN = saved


def build(name: str, weights=None, num_classes=None, pretrained=False, input_size=None):
    """Create the timm model in eval mode, loading local weights if given.

    Returns (model, input_size) where input_size is the square side used for export.
    """
    import timm

    check_name(name)
    state_dict = load_state_dict(weights) if weights is not None else None
    if num_classes is None and state_dict is not None:
        num_classes = infer_num_classes(name, state_dict)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    cfg = timm.models.get_pretrained_cfg(name)
    default_size = int(cfg.input_size[-1]) if cfg is not None else 224
    size = int(input_size or default_size)
    if size != default_size and cfg is not None and cfg.fixed_input_size:
        # Attention-bias tables follow img_size in LeViT and EfficientFormerV2; EfficientFormer
        # v1 ignores it and fails the forward check below.
        kwargs["img_size"] = size
    with _unfused_attention():
        model = timm.create_model(name, pretrained=pretrained, exportable=True, **kwargs)
    if state_dict is not None:
        _load_into(model, state_dict, weights)
    model.eval()
    _check_runs(model, name, size, default_size)
    return model, size


def _check_runs(model, name: str, size: int, default_size: int) -> None:
    """Run one forward pass so a wrong input size fails with one line, not a trace dump."""
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except RuntimeError as err:
        raise ExportError(f"{name} does not run at {size} px (timm default {default_size}): "
                          f"{str(err).splitlines()[0][:160]}; try --input-size "
                          f"{default_size}") from None


def _load_into(model, state_dict: dict, source) -> None:
    """Load strictly; on a mismatch name the first differing key and the count."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = [f"{len(items)} {what} (first: {items[0]})" for what, items in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", shapes)) if items]
    if problems:
        raise ExportError(f"{source}: does not fit timm model {type(model).__name__}: "
                          f"{'; '.join(problems)}; check the model name and --num-classes")
    model.load_state_dict(state_dict, strict=True)


def export(name: str, out_path, weights=None, num_classes=None, pretrained=False,
           input_size=None, dynamic_batch=True, exporter="torchscript", opset=None) -> Path:
    """Export timm model `name` to `out_path` (ONNX opset 17) and return the path.

    The file appears atomically (temporary file in the same folder, then os.replace, via
    onnxquant.model_io.save_model); models over ~2 GiB keep weights in `<out name>.data`.
    `exporter`: "torchscript" (default, `dynamo=False`, opset 17) or "dynamo"
    (`dynamo=True`, opset 18); `opset` overrides either exporter's opset.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; choose from {', '.join(EXPORTERS)}")
    import torch

    if exporter == "dynamo":
        return _export_dynamo(name, out_path, weights, num_classes, pretrained, input_size,
                              dynamic_batch, opset or DYNAMO_OPSET)
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    model, size = build(name, weights, num_classes, pretrained, input_size)
    dummy = torch.zeros(1, 3, size, size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    source = Path(weights).name if weights else ("timm-pretrained" if pretrained else "random-init")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings concern spatial sizes (MobileViT patch resize, TinyViT window
            # padding); those are fixed by the export size, only the batch is dynamic.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deliberate
            warnings.filterwarnings("ignore", message="Constant folding")  # strided Slice
            torch.onnx.export(model, (dummy,), str(raw), opset_version=opset or OPSET,
                              dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes=axes)
        meta = {"timm_name": name, "weights": str(source)}
        if opset and opset != OPSET:  # the default export keeps its bytes
            meta.update(exporter="torchscript", opset=str(opset))
        _save_with_metadata(raw, out, meta)
    log.info("exported %s (%d px, weights: %s) -> %s", name, size, source, out)
    return out


def _export_dynamo(name, out_path, weights, num_classes, pretrained, input_size,
                   dynamic_batch, opset) -> Path:
    """export(exporter="dynamo"): torch.export -> ONNX at `opset` via onnxscript."""
    import torch

    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translation library)
    except ImportError:
        raise ExportError("the dynamo exporter needs onnxscript: pip install onnxscript") from None
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    model, size = build(name, weights, num_classes, pretrained, input_size)
    # torch.export specializes a dimension whose example is 1: with a batch-1 example the
    # export fails (edgenext_xx_small) or, after torch.onnx's fallbacks, silently comes out
    # with a fixed batch of 1 (levit_128s). A batch-2 example keeps the batch symbolic.
    dummy = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    source = Path(weights).name if weights else ("timm-pretrained" if pretrained else "random-init")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):  # "[torch.onnx] Obtain model graph"
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, (dummy,), str(raw), opset_version=opset, dynamo=True,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=shapes, verbose=False)
            except Exception as err:  # torch.export / onnxscript errors: many types, long texts
                first = (str(err).strip().splitlines() or [""])[0][:160]
                raise ExportError(f"dynamo export of {name} failed ({type(err).__name__}: "
                                  f"{first}); try --exporter torchscript") from None
        if dynamic_batch:
            _check_dynamic_batch(raw, name)
        _save_with_metadata(raw, out, {"timm_name": name, "weights": str(source),
                                       "exporter": "dynamo", "opset": str(opset)})
    log.info("exported %s (%d px, weights: %s, dynamo opset %d) -> %s", name, size, source,
             opset, out)
    return out


def _check_dynamic_batch(path: Path, name: str) -> None:
    """ExportError when the exporter fixed the batch that was asked to be dynamic."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if dim and not dim[0].dim_param:
        raise ExportError(f"dynamo export of {name} fixed the batch at {dim[0].dim_value}; "
                          "use --static-batch or --exporter torchscript")


def _save_with_metadata(raw: Path, out: Path, meta: dict) -> None:
    """Re-save the exporter's file with provenance metadata, atomically (model_io)."""
    import onnx
    import timm
    import torch

    from ..model_io import save_model

    proto = onnx.load(str(raw))  # the exporter splits >2 GiB weights beside raw; load joins them
    meta = {**meta, "timm_version": timm.__version__, "torch_version": torch.__version__}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    save_model(proto, out)


def cache_dir() -> Path:
    """Folder for zoo exports: $ONNXQUANT_ZOO_CACHE or ~/.cache/onnxquant/zoo."""
    env = os.environ.get("ONNXQUANT_ZOO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxquant" / "zoo"


def zoo_cache(name: str, input_size=None, exporter="torchscript", opset=None) -> Path:
    """Path to a random-init (seed 0, pretrained=False) export of `name`, exporting once.

    Files are keyed by timm version, so a timm upgrade re-exports instead of reusing; a
    non-default exporter/opset adds e.g. `.dynamo18` to the name (same weights: seed 0).
    """
    import timm
    import torch

    suffix = f".{input_size}" if input_size else ""
    if exporter != "torchscript" or (opset and opset != OPSET):
        suffix += f".{exporter}{opset or (DYNAMO_OPSET if exporter == 'dynamo' else OPSET)}"
    out = cache_dir() / f"timm-{timm.__version__}" / f"{name}{suffix}.seed0.onnx"
    if not out.is_file():
        torch.manual_seed(0)
        export(name, out, pretrained=False, input_size=input_size, exporter=exporter,
               opset=opset)
    return out


def zoo_cache_small(name: str, size: int = 64) -> tuple[Path, int]:
    """(``zoo_cache`` at ``size`` px where the model exports at it, else at its own size;
    the size): small exports for crash sweeps and tests. Models with a fixed input size
    (EfficientFormer v1's position biases) raise at another size."""
    from .zoo import get

    try:
        return zoo_cache(name, input_size=size), size
    except Exception:  # noqa: BLE001 - timm/torch raise many types for a size a model lacks
        return zoo_cache(name), get(name).input_size


def main(argv=None) -> int:
    """CLI: python -m onnxquant.models.export NAME OUT.onnx [options]."""
    parser = argparse.ArgumentParser(prog="python -m onnxquant.models.export",
                                     description="Export a timm model to ONNX (opset 17; "
                                                 "--exporter dynamo: opset 18).")
    parser.add_argument("name", help="timm model name, e.g. mobilevit_xxs")
    parser.add_argument("out", help="output .onnx path")
    parser.add_argument("--weights", help="local .safetensors/.pth/.pt weights file")
    parser.add_argument("--num-classes", type=int, help="classes (default: from the weights)")
    parser.add_argument("--pretrained", action="store_true", help="timm hub weights (network)")
    parser.add_argument("--input-size", type=int, help="square input side (default: timm cfg)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch at 1")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                        help="torch.onnx exporter: torchscript (dynamo=False, default) or "
                             "dynamo (dynamo=True, needs onnxscript)")
    parser.add_argument("--opset", type=int,
                        help=f"ONNX opset (default {OPSET}; dynamo: {DYNAMO_OPSET})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = export(args.name, args.out, weights=args.weights, num_classes=args.num_classes,
                     pretrained=args.pretrained, input_size=args.input_size,
                     dynamic_batch=not args.static_batch, exporter=args.exporter,
                     opset=args.opset)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.name} -> {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
