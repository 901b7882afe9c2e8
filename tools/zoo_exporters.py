"""The timm zoo through other exporters and opsets: does onnxquant find attention and quantize?

For each timm model of the zoo (models/zoo.py, seeded random init, pretrained=False):

  ts17       torchscript export (dynamo=False, opset 17): the zoo's export, the baseline
  dynamo18   torch.onnx.export(dynamo=True), opset 18 (models/export.py exporter="dynamo")
  convN      ts17 converted with onnx.version_converter.convert_version to opset N
  tsN        torchscript export at opset_version=N, only where convN fails (converter error,
             checker error, onnxruntime error or changed float outputs)

and for each produced model:

  float      onnxruntime output vs torch on a seeded N(0,1) batch (relative L2 error)
  inspect    onnxquant.analyze (what `onnxquant inspect` prints): attention sites by pattern
             vs the Softmax count, unmatched Softmax, conv roles
  recipes    onnxquant.run with 8 seeded N(0,1) calibration samples: paper, paper
             per_channel=True, ort with ort_int8_kinds=("dense", "linear"), tensorrt; the
             output must pass onnx.checker full_check and run in onnxruntime; top-1 agreement
             and relative L2 error vs the same model in float on the seeded batch

Usage (the full run writes docs/exporters.md; --models/--opsets for a subset):

    python tools/zoo_exporters.py --work /tmp/zoo_exporters --out docs/exporters.md
    python tools/zoo_exporters.py --models mobilevit_xxs,levit_128s --opsets 11,18 --no-dynamo

Exports and per-cell results are cached in --work (default: a temporary folder, removed at
the end): a rerun with the same --work reuses them; --retry-errors recomputes cells that had
an error, --force recomputes everything. Needs torch, timm and onnxscript
(pip install -e '.[torch]' onnxscript). Models run at 64 px (efficientformer_l1 at its fixed
224 px): op counts equal those at timm's default size (models/zoo.py).
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter

import onnxquant
from onnxquant.models import get, names

OPSETS = (11, 13, 14, 15, 18, 19, 21, 23)
BASE_OPSET = 17
TS_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET (torch 2.14)
DYNAMO_OPSET = 18
SIZE = 64
SIZES = {"efficientformer_l1": 224}  # fixed input size: its attention bias is built for 224
EVAL_N, CALIB_N = 8, 8
FLOAT_RTOL = 1e-4  # relative L2 error a float conversion may add (kernel rounding)
RECIPES = {  # key: (table heading, QuantConfig arguments)
    "paper": ("paper", dict(per_channel=False)),
    "paper_pc": ("paper per_channel", dict()),
    "ort": ("ort (dense, linear)", dict(target="ort", ort_int8_kinds=("dense", "linear"))),
    "tensorrt": ("tensorrt", dict(target="tensorrt")),
}
log = logging.getLogger("zoo_exporters")


def first_line(exc: BaseException) -> str:
    """'Type: first line of the message', without the C++ source location of onnx asserts."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"^/\S+:\d+: \w+: Assertion `[^`]*` failed: ", "", line)
    return f"{type(exc).__name__}: {line[:200]}" if line else type(exc).__name__


def size_of(name: str) -> int:
    return SIZES.get(name, SIZE)


def inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(eval batch, calibration array), both seeded N(0,1)."""
    x = np.random.default_rng(0).standard_normal((EVAL_N, 3, size, size)).astype(np.float32)
    calib = np.random.default_rng(1).standard_normal((CALIB_N, 3, size, size)).astype(np.float32)
    return x, calib


def session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def model_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# ---------------------------------------------------------------- producing the models

class Producer:
    """Exports (torch) and conversions of one model, cached in work/<model>/."""

    def __init__(self, name: str, work: Path):
        self.name, self.dir = name, work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = size_of(name)

    def path(self, variant: str) -> Path:
        return self.dir / f"{variant}.onnx"

    def torch_reference(self) -> np.ndarray:
        """torch output of the seed-0 model on the eval batch (cached as .npy)."""
        ref = self.dir / "torch_out.npy"
        if not ref.is_file():
            import torch

            from onnxquant.models.export import build

            torch.manual_seed(0)
            model, _ = build(self.name, input_size=self.size)
            with torch.no_grad():
                out = model(torch.from_numpy(inputs(self.size)[0])).numpy()
            np.save(ref, out)
        return np.load(ref)

    def export(self, exporter: str, opset: int) -> tuple[Path, float]:
        """(path, seconds) of the seed-0 export; seconds 0 when cached."""
        variant = f"{'dynamo' if exporter == 'dynamo' else 'ts'}{opset}"
        out = self.path(variant)
        if out.is_file():
            return out, 0.0
        import torch

        from onnxquant.models.export import export

        torch.manual_seed(0)
        start = time.perf_counter()
        export(self.name, out, input_size=self.size, exporter=exporter, opset=opset)
        return out, time.perf_counter() - start

    def convert(self, opset: int) -> tuple[Path, float]:
        """ts17 -> opset with onnx.version_converter; raises what the converter raises."""
        out = self.path(f"conv{opset}")
        if out.is_file():
            return out, 0.0
        base, _ = self.export("torchscript", BASE_OPSET)
        start = time.perf_counter()
        converted = version_converter.convert_version(onnx.load(str(base)), opset)
        onnx.save(converted, str(out))
        return out, time.perf_counter() - start


# ---------------------------------------------------------------- evaluating one model

def check_float(model: onnx.ModelProto, torch_out: np.ndarray, x: np.ndarray) -> dict:
    """checker + onnxruntime + output vs torch: raises on checker/runtime errors."""
    onnx.checker.check_model(model, full_check=True)
    out = session(model).run(None, {"input": x})[0]
    err = rel_err(out, torch_out)
    return {"rel_err": err, "max_abs": float(np.abs(out - torch_out).max()),
            "ok": bool(out.shape == torch_out.shape and err <= FLOAT_RTOL), "out": out}


def inspect(model: onnx.ModelProto) -> dict:
    _, plan = onnxquant.analyze(model)
    patterns = collections.Counter(site.pattern for site in plan.attention)
    return {
        "nodes": len(model.graph.node),
        "softmax": sum(n.op_type == "Softmax" for n in model.graph.node),
        "attention": len(plan.attention),
        "patterns": dict(sorted(patterns.items())),
        "unmatched": [list(u) if isinstance(u, (tuple, list)) else str(u)
                      for u in plan.unmatched_softmax],
        "roles": plan.role_counts(),
        "convs": len(plan.convs),
        "conv_nodes": sum(n.op_type == "Conv" for n in model.graph.node),
        "notes": list(plan.notes),
    }


def quantize_one(model: onnx.ModelProto, recipe: dict, calib: np.ndarray, x: np.ndarray,
                 float_out: np.ndarray) -> dict:
    start = time.perf_counter()
    cell = {"ok": False}
    try:
        stage = "quantize"
        result = onnxquant.run(model, onnxquant.QuantConfig(**recipe), calibration=calib,
                               progress=False)
        stage = "checker"
        onnx.checker.check_model(result.model, full_check=True)
        stage = "onnxruntime"
        out = session(result.model).run(None, {"input": x})[0]
        cell.update(ok=bool(np.isfinite(out).all() and out.shape == float_out.shape),
                    rel_err=rel_err(out, float_out),
                    top1=float(np.mean(out.argmax(1) == float_out.argmax(1))),
                    log2=int(result.counts.get("softmax", 0)), counts=dict(result.counts),
                    notes=[n for n in result.plan.notes if "opset" in n])
        if not cell["ok"]:
            cell["error"] = f"{stage}: non-finite output or wrong shape {out.shape}"
    except Exception as exc:  # noqa: BLE001 - every failure is a table entry
        cell.update(error=f"{stage}: {first_line(exc)}",
                    trace=traceback.format_exc(limit=-3))
    cell["seconds"] = time.perf_counter() - start
    return cell


def evaluate(path: Path, torch_out: np.ndarray, size: int, recipes: dict) -> dict:
    """Float check, block map, each recipe; the float check failing skips the rest."""
    model = onnx.load(str(path))
    x, calib = inputs(size)
    cell = {"opset": model_opset(model), "ir": int(model.ir_version)}
    try:
        flt = check_float(model, torch_out, x)
    except Exception as exc:  # noqa: BLE001
        cell["float"] = {"ok": False, "error": first_line(exc)}
        return cell
    float_out = flt.pop("out")
    cell["float"] = flt
    try:
        cell["inspect"] = inspect(model)
    except Exception as exc:  # noqa: BLE001
        cell["inspect"] = {"error": first_line(exc), "trace": traceback.format_exc(limit=-3)}
    cell["recipes"] = {key: quantize_one(model, recipe, calib, x, float_out)
                       for key, (_, recipe) in recipes.items()}
    return cell


# ---------------------------------------------------------------- the grid

def variants(opsets, dynamo: bool) -> list:
    out = [("ts17", "torchscript", BASE_OPSET)]
    if dynamo:
        out.append((f"dynamo{DYNAMO_OPSET}", "dynamo", DYNAMO_OPSET))
    out += [(f"conv{n}", "convert", n) for n in opsets if n != BASE_OPSET]
    return out


def has_error(cell: dict) -> bool:
    if "produce_error" in cell or "error" in cell.get("float", {}):
        return True
    if "error" in cell.get("inspect", {}):
        return True
    return any(recipe_issue(cell, key) for key in cell.get("recipes", {}))


def run_cell(prod: Producer, variant: str, how: str, opset: int, recipes: dict) -> dict:
    torch_out = prod.torch_reference()
    cell = {"model": prod.name, "variant": variant, "size": prod.size}
    start = time.perf_counter()
    try:
        if how == "convert":
            path, secs = prod.convert(opset)
            cell["source"] = f"version_converter {BASE_OPSET} -> {opset}"
        else:
            path, secs = prod.export(how, opset)
            cell["source"] = (f"torch.onnx.export(dynamo=True, opset {opset})" if how == "dynamo"
                              else f"torch.onnx.export(dynamo=False, opset {opset})")
        cell["produce_s"] = secs
    except Exception as exc:  # noqa: BLE001
        cell["produce_error"] = first_line(exc)
        cell["seconds"] = time.perf_counter() - start
        return cell
    cell.update(evaluate(path, torch_out, prod.size, recipes))
    cell["seconds"] = time.perf_counter() - start
    return cell


def converter_failed(cell: dict) -> str | None:
    """Why a convN cell cannot stand for opset N (None: it can)."""
    if "produce_error" in cell:
        return f"converter: {cell['produce_error']}"
    flt = cell.get("float", {})
    if "error" in flt:
        return f"converted model: {flt['error']}"
    if not flt.get("ok"):
        return f"converted model changes the float outputs (rel. error {flt.get('rel_err'):.1e})"
    return None


def newer_ops(model: onnx.ModelProto, target: int) -> dict:
    """Op types of `model` whose version at its opset is newer than `target`: what a
    conversion down to `target` must adapt ({op: version})."""
    opset = model_opset(model)
    found = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in found:
            continue
        since = onnx.defs.get_schema(node.op_type, opset).since_version
        if since > target:
            found[node.op_type] = since
    return dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))


def _bypass_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `model` without Identity nodes (consumers read the Identity's input)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    outputs = {o.name for o in model.graph.output}
    alias, keep = {}, []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    for node in keep:
        node.input[:] = [alias.get(name, name) for name in node.input]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def blockers(model: onnx.ModelProto, target: int) -> list:
    """Ops that stop version_converter going down to `target`, in the order it meets them:
    an Identity blocker is bypassed (an exact rewrite) and the conversion retried, any other
    blocker ends the search. ["Identity: No Adapter From Version $16 ...", "Shape: ..."]."""
    found = []
    for _ in range(4):
        try:
            version_converter.convert_version(model, target)
            return found + ["converts once Identity is bypassed"] if found else found
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError
            why = first_line(exc).split(": ", 1)[-1]
            match = re.search(r"(?:for|of) (\w+)(?: exists)?$", why)
            op = match.group(1) if match else "?"
            found.append(f"{op}: {why}")
            if op != "Identity":
                return found
            model = _bypass_identity(model)
    return found


def run_model(name: str, work: Path, opsets, dynamo: bool, recipes: dict, force: bool,
              retry: bool) -> list:
    prod = Producer(name, work)
    cells = []
    todo = variants(opsets, dynamo)
    while todo:
        variant, how, opset = todo.pop(0)
        cache = prod.dir / f"{variant}.json"
        cell = json.loads(cache.read_text()) if cache.is_file() and not force else None
        if cell is not None and retry and has_error(cell):
            log.info("%s %s: retrying (had an error)", name, variant)
            cell = None
        if cell is not None and "recipes" in cell and not set(recipes) <= set(cell["recipes"]):
            cell = None  # cached with fewer recipes
        if cell is None:
            log.info("%s %s ...", name, variant)
            cell = run_cell(prod, variant, how, opset, recipes)
            log.info("%s %s: %s (%.1f s)", name, variant, summary(cell), cell["seconds"])
        if how == "convert" and opset < BASE_OPSET and "newer_ops" not in cell:
            base = onnx.load(str(prod.export("torchscript", BASE_OPSET)[0]),
                             load_external_data=False)
            cell["newer_ops"] = newer_ops(base, opset)
            if "produce_error" in cell:
                cell["blockers"] = blockers(base, opset)
        cache.write_text(json.dumps(cell, indent=1))
        if "recipes" in cell:  # report the recipes asked for only
            cell = {**cell, "recipes": {k: cell["recipes"][k] for k in recipes}}
        cells.append(cell)
        why = converter_failed(cell) if how == "convert" else None
        if why is not None and opset <= TS_MAX_OPSET:
            cell["fallback"] = f"ts{opset}"
            todo.insert(0, (f"ts{opset}", "torchscript", opset))
    return cells


# ---------------------------------------------------------------- reporting

def summary(cell: dict) -> str:
    if "produce_error" in cell:
        return f"not produced ({cell['produce_error']})"
    if "error" in cell.get("float", {}):
        return f"float model fails ({cell['float']['error']})"
    ins = cell.get("inspect", {})
    att = "?" if "error" in ins else f"{ins['attention']}/{get(cell['model']).softmax}"
    recipes = " ".join("ok" if recipe_issue(cell, k) is None else "ERR"
                       for k in cell.get("recipes", {}))
    return f"attention {att}, recipes {recipes}"


def _attention(cell: dict, base: dict | None) -> str:
    ins = cell.get("inspect", {})
    if "error" in ins:
        return f"inspect error: {ins['error']}"
    expected = get(cell["model"]).softmax
    pat = " + ".join(f"{n} {p}" for p, n in ins["patterns"].items()) or "none"
    text = f"{ins['attention']}/{expected} ({pat})"
    if ins["softmax"] != expected:
        text += f", {ins['softmax']} Softmax"
    if ins["unmatched"]:
        text += f", {len(ins['unmatched'])} unmatched"
    if ins["attention"] != expected:
        text = f"**{text}**"
    return text


def _roles(cell: dict, base: dict | None) -> str:
    ins = cell.get("inspect", {})
    if "error" in ins:
        return "-"
    text = " / ".join(str(ins["roles"][r]) for r in ("conv_block", "transformer", "bridge"))
    base_roles = (base or {}).get("inspect", {}).get("roles")
    if base_roles and base_roles != ins["roles"]:
        text = f"**{text}** (ts17: {' / '.join(str(v) for v in base_roles.values())})"
    return text


def expected_log2(cell: dict, key: str) -> int:
    """log2 ops the recipe must insert: one per attention found, if it quantizes Softmax."""
    parts = onnxquant.QuantConfig(**RECIPES[key][1]).active_parts
    return cell["inspect"].get("attention", 0) if "softmax" in parts else 0


def recipe_issue(cell: dict, key: str) -> str | None:
    """Why a recipe cell does not pass: its error, or a silent miss (no exception, but
    fewer log2 ops than attention blocks found by inspect); None when it passes."""
    r = cell["recipes"][key]
    if "error" in r:
        return r["error"]
    want = expected_log2(cell, key)
    if r.get("log2") != want:
        return (f"silent: {r.get('log2')} log2 ops inserted for {want} attention blocks "
                f"found by inspect")
    return None if r["ok"] else "failed"


def _recipe(cell: dict, key: str) -> str:
    r = cell["recipes"][key]
    if "error" in r:
        return f"**error** {r['error'].split(':', 1)[0]}: {r['error'].split(': ', 1)[-1][:60]}"
    text = f"{r['rel_err']:.1e}, {r['top1'] * 100:.0f} %"
    issue = recipe_issue(cell, key)
    if issue and issue.startswith("silent"):
        return f"**log2 {r.get('log2')}/{expected_log2(cell, key)}** {text}"
    return f"ok {text}" if issue is None else f"**{issue}** {text}"


def _how(cell: dict) -> str:
    v = cell["variant"]
    if v == "ts17":
        return "torchscript 17 (zoo)"
    if v.startswith("dynamo"):
        return f"dynamo {v[6:]}"
    if v.startswith("conv"):
        return f"convert 17->{v[4:]}"
    return f"torchscript {v[2:]} (direct)"


def table(cells: list, recipes: dict) -> list:
    head = ["model", "exporter / opset", "nodes", "float rel. err",
            "attention found/expected (patterns)",
            "convs cb / tr / br"] + [label for label, _ in recipes.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {c["model"]: c for c in cells if c["variant"] == "ts17"}
    for c in cells:
        if "produce_error" in c and c["variant"].startswith("conv"):
            continue  # in the conversion table
        row = [c["model"], _how(c)]
        if "produce_error" in c:
            row += ["", f"not produced: {c['produce_error'][:120]}"] + [""] * (len(head) - 4)
        elif "error" in c.get("float", {}):
            row += ["", f"float model fails: {c['float']['error'][:120]}"] + [""] * (len(head) - 4)
        else:
            flt = c["float"]
            ftxt = f"{flt['rel_err']:.1e}" + ("" if flt["ok"] else " **changed**")
            ref = base.get(c["model"])
            row += [str(c.get("inspect", {}).get("nodes", "?")), ftxt, _attention(c, ref),
                    _roles(c, ref)]
            row += [_recipe(c, k) if k in c.get("recipes", {}) else "-" for k in recipes]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def matrix(cells: list) -> list:
    """Compact: model x variant -> attention found/expected and recipes ok count."""
    cols = list(dict.fromkeys(c["variant"] for c in cells))
    by = {(c["model"], c["variant"]): c for c in cells}
    models = list(dict.fromkeys(c["model"] for c in cells))
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in models:
        row = [m]
        for v in cols:
            c = by.get((m, v))
            if c is None:
                row.append("")
            elif "produce_error" in c:
                row.append("-")
            elif "error" in c.get("float", {}) or "error" in c.get("inspect", {}):
                row.append("float fails" if "error" in c.get("float", {}) else "inspect err")
            else:
                n_ok = sum(recipe_issue(c, k) is None for k in c["recipes"])
                mark = "" if c["float"]["ok"] else "!"
                row.append(f"{c['inspect']['attention']}/{get(m).softmax} {n_ok}/"
                           f"{len(c['recipes'])}{mark}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _blocker(text: str) -> str:
    """'LayerNormalization: No Previous Version ...' -> 'LayerNormalization-17 (no previous
    version)'; 'Identity: No Adapter From Version $16 ...' -> 'Identity-16 (no adapter)'."""
    op, why = text.split(": ", 1) if ": " in text else ("?", text)
    version = re.search(r"\$(\d+)", why)
    if "Previous Version" in why:
        return f"{op} (no previous version)"
    return f"{op}-{version.group(1)} (no adapter)" if version else f"{op} ({why})"


def conversions(cells: list) -> list:
    """model x target opset: why version_converter could not go down there."""
    failed = [c for c in cells if c["variant"].startswith("conv") and "produce_error" in c]
    if not failed:
        return ["none"]
    opsets = sorted({int(c["variant"][4:]) for c in failed})
    by = {(c["model"], int(c["variant"][4:])): c for c in failed}
    lines = ["First op the converter stops at; then, in italics, the next one once the "
             "Identity nodes are bypassed (an exact rewrite). Every failed conversion was "
             "replaced by a direct `torch.onnx.export(dynamo=False, opset_version=N)`.", "",
             "| model | " + " | ".join(f"17 -> {n}" for n in opsets) + " |",
             "|---|" + "---|" * len(opsets)]
    for model in dict.fromkeys(c["model"] for c in failed):
        row = [model]
        for n in opsets:
            c = by.get((model, n))
            if c is None:
                row.append("converts")
                continue
            chain = c.get("blockers") or [c["produce_error"].split(": ", 1)[-1]]
            text = _blocker(chain[0])
            if len(chain) > 1:
                then = chain[1]
                text += ", _" + ("then converts" if then.startswith("converts")
                                 else "then " + _blocker(then)) + "_"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def failures(cells: list) -> list:
    """Everything else that did not pass: float checks, inspect, recipes (errors and silent
    misses), with a reproducer."""
    lines = []
    for c in cells:
        where = f"{c['model']} {c['variant']}"
        if "produce_error" in c and not c["variant"].startswith("conv"):
            lines.append(f"- {where}: not produced: `{c['produce_error']}`")
        elif "error" in c.get("float", {}):
            lines.append(f"- {where}: float model: `{c['float']['error']}`")
        elif not c.get("float", {}).get("ok", True):
            lines.append(f"- {where}: float outputs changed, "
                         f"rel. error {c['float']['rel_err']:.1e}")
        if "error" in c.get("inspect", {}):
            lines.append(f"- {where}: inspect: `{c['inspect']['error']}`")
        issues = {key: recipe_issue(c, key) for key in c.get("recipes", {})}
        issues = {k: v for k, v in issues.items() if v}
        for text in dict.fromkeys(issues.values()):
            keys = ", ".join(k for k, v in issues.items() if v == text)
            lines.append(f"- {where} ({keys}): `{text}`")
    return lines


def write_report(cells: list, recipes: dict, out: Path | None, argv: list, seconds: float):
    computed = sum(c.get("seconds", 0.0) for c in cells)
    text = "\n".join(
        ["## Summary", "",
         "Attention blocks found / expected (the zoo's Softmax count), then recipes that pass "
         "(no exception, full checker, runs in onnxruntime, one log2 op per attention block "
         "for the recipes that quantize Softmax); `!`: float outputs changed; `-`: not "
         "produced (see the conversion table).", "", *matrix(cells), "",
         "## Every model and recipe", "",
         "Recipe cells: relative L2 error of the logits vs the same model in float, and top-1 "
         f"agreement, on {EVAL_N} seeded N(0,1) images. `log2 a/b`: a log2 ops inserted for "
         "b attention blocks. Conversions the converter could not do are left out (next "
         "section).", "", *table(cells, recipes), "",
         "## Down-conversions onnx.version_converter could not do", "", *conversions(cells), "",
         "## Failures (other than down-conversions)", "", *(failures(cells) or ["none"]), "",
         f"Command: `python tools/zoo_exporters.py {' '.join(argv)}`; this run {seconds:.0f} s, "
         f"the cells' own times (exports, checks, quantization) add up to {computed:.0f} s.", ""])
    if out is None:
        print(text)
        return
    out = Path(out)
    marker = "<!-- zoo_exporters: generated below -->"
    head = out.read_text().split(marker)[0] if out.is_file() and marker in out.read_text() else ""
    out.write_text((head or "# Exporters\n\n") + marker + "\n\n" + text)
    print(f"wrote {out}")


def parse_list(text: str, kind=str) -> tuple:
    return tuple(kind(t) for t in text.split(",") if t.strip()) if text else ()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(names()),
                   help="comma-separated timm names (default: the 12 zoo models)")
    p.add_argument("--opsets", default=",".join(map(str, OPSETS)),
                   help="opsets to convert the torchscript export to ('' for none)")
    p.add_argument("--no-dynamo", action="store_true", help="skip the dynamo exports")
    p.add_argument("--recipes", default=",".join(RECIPES), help="recipes to run")
    p.add_argument("--work", help="folder caching exports and results (default: temporary)")
    p.add_argument("--out", help="markdown file to write the tables into (default: stdout); "
                                 "text above the generated marker is kept")
    p.add_argument("--json", help="also write every cell as JSON here")
    p.add_argument("--force", action="store_true", help="recompute cached cells")
    p.add_argument("--retry-errors", action="store_true", help="recompute cells with errors")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")  # onnxscript's optimizer logs every initializer
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    models = parse_list(args.models)
    for name in models:
        try:
            get(name)
        except KeyError as err:
            p.error(err.args[0])
    unknown = [k for k in parse_list(args.recipes) if k not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    recipes = {k: RECIPES[k] for k in parse_list(args.recipes)}
    try:
        opsets = parse_list(args.opsets, int)
    except ValueError:
        p.error(f"--opsets takes comma-separated integers, got {args.opsets!r}")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        print("error: exporting needs torch and timm: pip install -e '.[torch]' onnxscript",
              file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zoo_exporters."))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cells = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in models:
                cells += run_model(name, work, opsets, not args.no_dynamo, recipes, args.force,
                                   args.retry_errors)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    write_report(cells, recipes, args.out, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
