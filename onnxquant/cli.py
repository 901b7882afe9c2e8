"""Command line: parse, load, call the API, save, summarize. No quantization logic here.

    onnxquant IN.onnx OUT.onnx [--calib DIR|FILE.npy] [--target paper|ort|tensorrt] ...
    onnxquant inspect IN.onnx [--plots DIR --calib ...]
    onnxquant eval MODEL.onnx --images DIR [--compare QUANT.onnx] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from . import __version__, api
from .config import (CALIB_METHODS, INT8_KINDS, DEFAULT_LOG2_EPS, PARTS, RECONSTRUCT_DEVICES,
                     RECONSTRUCT_METHODS, SEARCH_METRICS, SOFTMAX_QUANTIZERS, LOG2_BODIES,
                     TARGET_PARTS, TARGETS, WEIGHT_FORMATS, QuantConfig)
from .errors import UserError
from .model_io import check_output_path, load_model, save_model
from .report import canonical_line
from .wording import count
from .preprocess_args import (add_preprocess_arguments, guessed_normalization,
                              preprocess_from_args)

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "reference"
if not BUNDLED.is_dir():  # installed (not editable): the models package carries it
    from . import models as _models

    BUNDLED = Path(_models.__file__).resolve().parent / "reference"
BUNDLED_CALIB = BUNDLED / "calib"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per QuantConfig field; dest == field name (config_from_args relies on it)."""
    d = QuantConfig()
    g = p.add_argument_group("recipe (QuantConfig)")
    g.add_argument("--target", choices=TARGETS, default=d.target,
                   help="paper: EfficientQuant as published (default); ort: int8 where "
                        "onnxruntime CPU is faster; tensorrt: symmetric INT8 Q/DQ + log2 plugin op")
    g.add_argument("--weight-bits", type=int, default=d.weight_bits, help="2..8 (default 8)")
    g.add_argument("--weight-symmetric", action="store_true", help="int8, zero point 0")
    grain = g.add_mutually_exclusive_group()
    grain.add_argument("--per-channel", dest="per_channel", action="store_true",
                       default=d.per_channel, help="one weight scale per output channel (default)")
    grain.add_argument("--per-tensor", dest="per_channel", action="store_false",
                       help="one weight scale per tensor: the EfficientQuant paper's exact recipe "
                            "(loses 20 points of line accuracy on a real OCR recognizer)")
    g.add_argument("--weight-format", choices=WEIGHT_FORMATS, default=d.weight_format,
                   help="qdq: DequantizeLinear (standard); folded: Cast/Sub/Mul, which "
                        "onnxruntime folds at load: same small file, float speed")
    g.add_argument("--weight-block-size", type=int, default=d.weight_block_size, metavar="B",
                   help="MatMul/Gemm weights: one scale per B input channels (e.g. 32) instead "
                        "of per output channel; weight-only, opset 21 (needs 'linear' in --parts)")
    g.add_argument("--softmax-bits", type=int, default=d.softmax_bits, help="log2 bits (default 8)")
    g.add_argument("--log2-eps", type=float, default=d.log2_eps,
                   help=f"floor for post-Softmax values before log2 (default {DEFAULT_LOG2_EPS:g})")
    g.add_argument("--softmax-quantizer", choices=SOFTMAX_QUANTIZERS, default=d.softmax_quantizer,
                   help="post-Softmax quantizer: log2 (the paper's, default), log_sqrt2 "
                        "(RepQ-ViT), adalog (searched log base), uniform (onnxruntime's)")
    g.add_argument("--log2-body", choices=LOG2_BODIES, default=d.log2_body,
                   help="body of the log2 op: bitcast (one lookup on the float bits, 2.7-4x "
                        "cheaper on onnxruntime CPU, opset 26), table (Log + lookups, the "
                        "model's opset); auto (default): bitcast unless --target tensorrt or "
                        "its checks fail")
    g.add_argument("--parts", default=None,
                   help=f"comma list of parts to quantize, from {','.join(PARTS)} (default: "
                        f"the target's, paper: {','.join(sorted(TARGET_PARTS['paper']))})")
    g.add_argument("--ort-int8-kinds", type=lambda v: tuple(k for k in v.split(",") if k),
                   default=d.ort_int8_kinds,
                   help=f"--target ort: what runs in int8, from {','.join(INT8_KINDS)} "
                        "(default: measured on this CPU by timing the model)")
    g.add_argument("--num-calib", type=int, default=d.num_calib,
                   help="calibration samples (default 32; 64 with --reconstruct)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--act-bits", type=int, default=d.act_bits,
                   help="activation bits, targets ort/tensorrt (default 8; W6A6: "
                        "--weight-bits 6 --act-bits 6)")
    g.add_argument("--calib-method", choices=CALIB_METHODS, default=None,
                   help="activation range estimator (default: mse with --weight-bits <= 4, "
                        "else minmax)")
    g.add_argument("--auto", action="store_true",
                   help="search weight granularity/scheme and activation ranges per layer "
                        "by the error of its block (Q-HyViT)")
    g.add_argument("--search-metric", choices=SEARCH_METRICS, default=d.search_metric,
                   help="--auto: block error as plain relative MSE (default) or weighted by "
                        "the output's sensitivity (fisher; needs torch)")
    g.add_argument("--reconstruct", choices=RECONSTRUCT_METHODS, default=d.reconstruct,
                   help="choose weight codes by reconstruction on the calibration samples: "
                        "gptq (NumPy, seconds), adaround/brecq/qdrop/mgrq (torch); "
                        "default none (round to nearest)")
    g.add_argument("--reconstruct-iters", type=int, default=d.reconstruct_iters, metavar="N",
                   help="iterations per layer/block of the torch methods")
    g.add_argument("--reconstruct-holdout", type=float, default=d.reconstruct_holdout,
                   metavar="F", help="fraction of calibration samples kept out of fitting to "
                   "judge each block's codes (torch methods 0.25, gptq 0: judged on the fitted "
                   "samples)")
    g.add_argument("--reconstruct-device", choices=RECONSTRUCT_DEVICES,
                   default=d.reconstruct_device, help="where the torch methods run: auto "
                   "(CUDA when torch sees a device, default), cpu or cuda")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of reconstruction (0)")
    g.add_argument("--exclude", action="append", default=[], metavar="NODE|PATTERN",
                   help="keep these nodes float (names or fnmatch patterns such as '*attn*'; "
                        "repeat or comma-separate)")
    g.add_argument("--fold-batchnorm", choices=("auto", "yes", "no"), default="auto",
                   help="fold BatchNormalization into the Conv before quantizing (auto: "
                        "where conv weights are per channel)")
    g.add_argument("--bias-correction", choices=("auto", "yes", "no"), default="auto",
                   help="move each quantized layer's bias by the mean output error of its "
                        "rounded weight on the calibration samples (auto: 4-bit weights "
                        "rounded to nearest, without --reconstruct)")


def config_from_args(args) -> QuantConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig)}
    for name in ("fold_batchnorm", "bias_correction"):
        values[name] = {"auto": None, "yes": True, "no": False}[values[name]]
    values["exclude"] = tuple(p.strip() for v in values["exclude"] for p in v.split(",")
                              if p.strip())
    if values["parts"] is not None:
        values["parts"] = frozenset(p.strip() for p in values["parts"].split(",") if p.strip())
    try:
        return QuantConfig(**values)
    except ValueError as exc:
        raise UserError(f"option: {exc}") from None


def _calibration(args, model):
    from .calibrate import image_dims, model_input

    _, shape = model_input(model)
    source = args.calib
    if source is None:
        source = BUNDLED_CALIB
    return source, preprocess_from_args(args, *image_dims(shape))[0]


def _calibration_line(args, model, cfg, pre) -> tuple | None:
    """(what calibration images went through, for the summary; how many), or None for a
    .npy source."""
    from .calibrate import image_paths, image_preprocess, model_input

    folder = Path(args.calib) if args.calib is not None else BUNDLED_CALIB
    if not folder.is_dir():
        return None
    paths = image_paths(folder, cfg)
    pre = image_preprocess(folder, paths, model_input(model)[1], pre)
    line = f"{args.calib or 'bundled ImageNet images'}: {len(paths)} images, {pre.describe()}"
    return line, len(paths)


def _warn_guessed_normalization(args, pre) -> None:
    """Line and gray models are rarely ImageNet photos: say what was assumed, and the fix."""
    from .images import slashed

    if (pre.resize != "crop" or pre.channel_order == "gray") and guessed_normalization(args):
        print(f"onnxquant: warning: calibration images were normalized with a guessed mean "
              f"{slashed(pre.mean)} and std {slashed(pre.std)} ({pre.channel_order.upper()}); "
              "give --mean, --std and --channel-order as the model was trained (PaddleOCR: "
              "--mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --channel-order bgr)", file=sys.stderr)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _recipe(cfg: QuantConfig) -> str:
    from .targets import profile

    return profile(cfg).describe(cfg)


def print_summary(result: api.Result, cfg: QuantConfig, src: Path, dst: Path, seconds: float):
    plan = result.plan
    patterns = {}
    for a in plan.attention:
        patterns[a.pattern] = patterns.get(a.pattern, 0) + 1
    roles = plan.role_counts()
    quantized_convs = sum(c.quantize for c in plan.convs)
    print(f"onnxquant {__version__}: {src} -> {dst}")
    print(f"  recipe      {_recipe(result.config or cfg)}")
    print(f"  attention   {count(len(plan.attention), 'block')} {patterns or ''}"
          f"{'; ' + str(len(plan.unmatched_softmax)) + ' other Softmax left float' if plan.unmatched_softmax else ''}")
    print(f"  convs       {len(plan.convs)} (conv blocks {roles['conv_block']}, inside "
          f"transformer {roles['transformer']}, bridges {roles['bridge']})")
    print(f"  canonical   {canonical_line(plan)}")
    print(f"  quantized   {quantized_convs} conv weights"
          f" ({sum(c.int8_input for c in plan.convs)} with int8 inputs), "
          f"{result.counts.get('linears', 0)} linear weights "
          f"({sum(s.dynamic or s.int8_input for s in plan.linears)} with int8 inputs), "
          f"{result.counts.get('softmax', 0)} softmax outputs "
          f"({(result.config or cfg).softmax_quantizer})")
    for note in plan.notes:
        print(f"  note        {note}")
    print(f"  size        {_mb(src.stat().st_size)} -> {_mb(dst.stat().st_size)} "
          f"({dst.stat().st_size / src.stat().st_size:.2f}x)")
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    print(f"  time        {seconds:.2f} s ({parts})")


def cmd_quantize(args) -> int:
    cfg = config_from_args(args)
    dst = check_output_path(args.input, args.output)
    report = check_output_path(args.input, args.report) if args.report else None
    if report is not None and report.resolve() == dst.resolve():
        raise UserError(f"{report}: --report is the output model's path; choose another file")
    model = load_model(args.input)
    source, pre = _calibration(args, model)
    start = time.perf_counter()
    result = api.run(model, cfg, source, pre, progress=not args.quiet)
    save_model(result.model, dst)
    if report is not None:
        from . import decisions

        decisions.write(report, result.plan, _recipe(result.config or cfg))
    print_summary(result, cfg, Path(args.input), dst, time.perf_counter() - start)
    used = result.plan.calibration_tensors() or cfg.auto or cfg.reconstruct != "none"
    if used and (described := _calibration_line(args, model, cfg, pre)):
        line, images = described
        print(f"  calibration {line}")
        _warn_guessed_normalization(args, pre)
        if args.calib is None:
            _warn_bundled_calibration(images)
    return 0


def _warn_bundled_calibration(n: int) -> None:
    """The ``n`` bundled images stood in for the user's (ranges, --auto or --reconstruct)."""
    print(f"onnxquant: warning: no --calib given, calibrated on {n} bundled ImageNet "
          "images; pass --calib DIR with your own images (and their preprocessing) for "
          "best accuracy", file=sys.stderr)


def cmd_inspect(args) -> int:
    from .report import print_block_map

    cfg = config_from_args(args)
    if args.calib and not (args.plots or args.sensitivity):
        raise UserError("--calib is used by --plots and --sensitivity only; add one or drop --calib")
    if cfg != QuantConfig() and not args.sensitivity:
        raise UserError("recipe options (--target, ...) are used by --sensitivity only; add it")
    if args.plots:
        try:
            import matplotlib  # noqa: F401 - checked before any work is printed
        except ImportError:
            raise UserError("--plots needs matplotlib: pip install 'onnxquant[plots]'") from None
    model = load_model(args.input)
    graph, plan = api.analyze(model)
    print_block_map(plan, verbose=args.verbose)
    if args.plots:
        from .plots import write_plots

        source, pre = _calibration(args, model)
        for path in write_plots(model, plan, source, pre, QuantConfig(), Path(args.plots)):
            print(f"wrote {path}")
    if args.sensitivity:
        from .sensitivity import sensitivity

        report = sensitivity(model, cfg, *_calibration(args, model))
        print(report.to_text(args.sensitivity_top))
        if args.plots:
            print(f"wrote {report.plot(Path(args.plots) / 'sensitivity.png')}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Argument errors in two lines (the error, where to look), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n  see '{self.prog} --help'\n")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "inspect":
        p = _Parser(prog="onnxquant inspect",
                                    description="Print the block map of a model")
        p.add_argument("input")
        p.add_argument("-v", "--verbose", action="store_true", help="list every conv")
        p.add_argument("--plots", help="write Figure-3 histograms (PNG) into this folder")
        p.add_argument("--calib", help="calibration images/.npy for --plots and --sensitivity")
        p.add_argument("--sensitivity", action="store_true", help="rank layers by the output "
                       "error each costs quantized alone / left float (recipe options below)")
        p.add_argument("--sensitivity-top", type=int, default=15, metavar="N", help="rows shown")
        add_config_arguments(p)
        add_preprocess_arguments(p)
        p.set_defaults(func=cmd_inspect)
        return p
    if command == "eval":
        from . import evaluate

        p = _Parser(prog="onnxquant eval",
                                    description="Top-1/top-5 on labelled images")
        evaluate.add_arguments(p)
        p.set_defaults(func=evaluate.run)
        return p
    p = _Parser(
        prog="onnxquant", description="EfficientQuant post-training quantization of an ONNX "
        "hybrid vision model. Other commands: 'onnxquant inspect', 'onnxquant eval'.")
    p.add_argument("input", help="float ONNX model")
    p.add_argument("output", help="where to write the quantized model")
    p.add_argument("--calib", help="folder of images or .npy (N x C x H x W float32); "
                                   "default: the 32 bundled ImageNet images")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log every pass")
    p.add_argument("--report", metavar="FILE", help="write what --auto / --reconstruct chose "
                   "and why (Markdown; JSON if FILE ends in .json)")
    p.add_argument("--version", action="version", version=__version__)
    add_config_arguments(p)
    add_preprocess_arguments(p)
    p.set_defaults(func=cmd_quantize)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("inspect", "eval") else "quantize"
    args = build_parser(command).parse_args(argv[1:] if command != "quantize" else argv)
    logging.basicConfig(format="onnxquant: %(levelname)s: %(message)s",
                        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"onnxquant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
