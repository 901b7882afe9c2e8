"""Peer quantizers against onnxquant at W8A8 on the same models, calibration inputs and images.

    python tools/bench_quant_peers.py [--peers ort,nncf,inc,quark,aimet,onnxquant]
        [--models mobilevit_xxs,mobilevitv2_050,PP-OCRv6_rec_small] [--limit 500]
        [--lines 300] [--work /tmp/onnxquant-peers] [--out docs/peers.md] [--w4]
        [--recipes aimet-adaround-w4a8,onnxquant-tensorrt-w4a8-gptq]

Each peer is installed from PyPI into its own venv (WORK/PEER: python -m venv, pip install the
peer + onnxruntime onnx numpy Pillow) and quantizes with tools/peer_runner.py run by that venv's
python, one process per model and recipe: whole-process wall time, peak RSS (/usr/bin/time's
maximum resident set of the process tree), output size.
onnxquant runs the same runner from this venv. Accuracy is scored here, in
onnxruntime: top-1 and agreement with float on imagenette/val for the reference checkpoints,
line/char accuracy and agreement on rendered lines for the PP-OCR recognizer. A recipe that
fails (or writes a model onnxruntime cannot run) is a row with the first line of its error,
then is retried on the model converted to opset 13 by onnx.version_converter.
``--w4`` (issue 12): AIMET AdaRound at 4-bit weights / 8-bit activations (100 iterations) and
onnxquant's W4A8 with round to nearest, AdaRound (100 iterations), GPTQ and MGRQ (their
defaults); Quark has no 4-bit integer type (a row says so).
Never run in CI: it installs packages and takes tens of minutes (an hour with ``--w4``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "peer_runner.py"
BASE = ["onnxruntime", "onnx", "numpy", "Pillow"]
# peer -> (pip packages, runner recipes); "onnxquant" runs in this venv
PEERS = {
    "ort": ([], ["ort-qdq", "ort-qdq-perchannel"]),
    "nncf": (["nncf"], ["nncf", "nncf-transformer"]),
    # undeclared imports: onnx-neural-compressor 1.0 needs prettytable + scipy, amd-quark torch
    "inc": (["onnx-neural-compressor", "prettytable", "scipy"], ["inc"]),
    "quark": (["amd-quark", "torch"], ["quark-a8w8", "quark-xint8"]),
    "aimet": (["aimet-onnx"], ["aimet"]),
    "onnxquant": (None, ["onnxquant-tensorrt", "onnxquant-tensorrt-auto", "onnxquant-ort"]),
}
# --w4 (issue 12): 4-bit weights, 8-bit activations, AdaRound at 100 iterations (DESIGN.md 6)
W4 = {"aimet": ["aimet-w4a8", "aimet-adaround-w4a8"], "quark": [],
      "onnxquant": ["onnxquant-tensorrt-w4a8", "onnxquant-tensorrt-w4a8-adaround",
                    "onnxquant-tensorrt-w4a8-gptq", "onnxquant-tensorrt-w4a8-mgrq"]}
W4_MISSING = {"quark": "no 4-bit integer weights in amd-quark 0.13 ONNX (int8/16/32, fp16/bf16, "
                       "BFP, MX; MATMUL_NBITS is MatMul weight-only): no AdaRound row"}
SHOWN = ("onnxruntime", "onnx", "numpy", "nncf", "onnx-neural-compressor", "amd-quark",
         "aimet-onnx", "torch")
RECOGNIZER = "PP-OCRv6_rec_small"


# ---- peer venvs ------------------------------------------------------------------------

def peer_python(peer: str, work: Path) -> Path:
    """The python of ``peer``'s venv, created and pip-installed on first use; RuntimeError
    with the last line of pip's output when the install fails."""
    if PEERS[peer][0] is None:
        return Path(sys.executable)
    venv, packages = work / peer, PEERS[peer][0] + BASE
    marker = venv / "installed.json"
    if marker.is_file() and json.loads(marker.read_text()) == packages:
        return venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = work / f"{peer}.install.log"
    print(f"installing {' '.join(packages)} into {venv} ...", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *packages],
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        last = log.read_text().strip().splitlines()[-1]
        raise RuntimeError(f"pip install {' '.join(packages)} failed: {last}")
    marker.write_text(json.dumps(packages))
    return venv / "bin" / "python"


def peer_versions(python: Path) -> dict:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                         capture_output=True, text=True).stdout
    found = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out or "[]")}
    return {k: found[k] for k in SHOWN if k in found}


# ---- one quantization ------------------------------------------------------------------

def quantize(python: Path, recipe: str, model: Path, calib: Path, out: Path) -> dict:
    """One recipe in its own process: {seconds, rss_mb, mb} or {error}."""
    rss = out.parent / f"{out.name}.maxrss"  # /usr/bin/time: largest RSS of the process tree
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss)] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run([*timer, str(python), str(RUNNER), recipe, str(model), str(calib),
                           str(out)], capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not result:
        err = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR ")]
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
        return {"error": err[-1][6:] if err else tail}
    error = runs_in_ort(out, calib)
    if error:
        return {"error": f"quantized, but onnxruntime cannot run it: {error}"}
    peak = (int(rss.read_text().split()[-1]) / 1024 if timer
            else json.loads(result[-1][7:])["peak_rss_mb"])
    return {"seconds": seconds, "rss_mb": peak, "mb": model_mb(out)}


def model_mb(path: Path) -> float:
    """The .onnx file plus every external data file it names (INC writes ``OUT.onnx_data``)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in model.graph.initializer if uses_external_data(t)
             for e in t.external_data if e.key == "location"}
    return sum((path.parent / f).stat().st_size for f in files | {path.name}) / 2**20


def runs_in_ort(path: Path, calib: Path) -> str | None:
    """None when onnxruntime loads ``path`` and runs one calibration sample, else the error."""
    try:
        sess = benchlib.ort_session(path)
        sess.run(None, {sess.get_inputs()[0].name: np.load(calib)[:1]})
    except Exception as exc:  # noqa: BLE001 - reported as the row's error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return first.replace(str(path.parent) + "/", "")[:200]  # no machine paths in a report
    return None


def opset13(model: Path, work: Path) -> Path:
    import onnx
    from onnx import version_converter

    out = work / f"{model.stem}.opset13.onnx"
    if not out.is_file():
        onnx.save(version_converter.convert_version(onnx.load(str(model)), 13), str(out))
    return out


def run_recipes(model: Path, calib: Path, peers: dict, work: Path, tmp: Path,
                versions: dict) -> list:
    """Every recipe of every peer ({peer: recipes}) on ``model`` (venvs in ``work``, models
    written to ``tmp``); a failure is a row, then one retry at opset 13."""
    from onnxquant.opset import model_opset
    import onnx

    rows, opset = [], model_opset(onnx.load(str(model), load_external_data=False))
    for peer, recipes in peers.items():
        if peer in W4_MISSING and not recipes:
            rows.append({"tool": peer, "note": W4_MISSING[peer]})
            continue
        try:
            python = peer_python(peer, work)
            versions.setdefault(peer, peer_versions(python))
        except RuntimeError as exc:
            versions.setdefault(peer, {"install": str(exc)})
            rows.append({"tool": peer, "note": f"not installed: {exc}"})
            continue
        for recipe in recipes:
            out = tmp / f"{model.stem}.{recipe}.onnx"
            print(f"  {model.stem} {recipe} ...", flush=True)
            before = model.read_bytes()
            res = quantize(python, recipe, model, calib, out)
            rows.append({"tool": recipe, "path": out, "note": "", **res})
            if model.read_bytes() != before:  # the peer wrote into its input: note, restore
                rows[-1]["note"] = "rewrote its input model file"
                model.write_bytes(before)
            if "error" in res and opset < 13:
                rows[-1]["note"] = f"FAILED: {res['error']}"
                res = quantize(python, recipe, opset13(model, tmp), calib, out)
                rows.append({"tool": recipe, "path": out, "note": "on the model converted to "
                             "opset 13 (onnx.version_converter)", **res})
            if "error" in res:
                rows[-1]["note"] = (rows[-1]["note"] + "; " if rows[-1]["note"] else "") + \
                    f"FAILED: {res['error']}"
            print(f"    {rows[-1].get('seconds', 0):.1f} s {rows[-1]['note']}", flush=True)
    return rows


# ---- scoring (this venv) ---------------------------------------------------------------

def score_reference(ref: dict, rows: list, limit: int) -> dict:
    ok = [r for r in rows if "seconds" in r]
    fp32, results = benchlib.against_fp32(ref["path"], [r["path"] for r in ok],
                                          benchlib.IMAGE_SETS["imagenette/val"], ref, limit,
                                          ref["name"])
    for row, res in zip(ok, results):
        row.update(acc=res["top1"], change=res["change"], agree=res["agree"])
    return {"tool": "float", "acc": fp32["top1"], "change": 0.0, "agree": 100.0,
            "mb": benchlib.file_mb(ref["path"]), "note": f"{fp32['n']} images"}


def score_recognizer(model: Path, rows: list, n_lines: int) -> dict:
    from onnxquant import ocr

    ok = [r for r in rows if "seconds" in r]
    lines = ocr.render_lines(n_lines, seed=1)
    results = ocr.evaluate_many([str(model)] + [str(r["path"]) for r in ok], lines,
                                alphabet=ocr.load_alphabet(model))
    base = results[0]
    for row, res in zip(ok, results[1:]):
        row.update(acc=res.line_acc, change=res.line_acc - base.line_acc, char=res.char_acc,
                   agree=ocr.agreement(base, res))
    return {"tool": "float", "acc": base.line_acc, "change": 0.0, "char": base.char_acc,
            "agree": 100.0, "mb": benchlib.file_mb(model), "note": f"{base.n} lines"}


def calibration(name: str, work: Path) -> Path:
    """The 32 calibration inputs every tool gets, as a .npy file."""
    from onnxquant import images, ocr

    path = work / f"{name}.calib.npy"
    if name == RECOGNIZER:
        np.save(path, ocr.calibration_array(benchlib.NUM_CALIB, seed=1001))
    else:
        pre = benchlib.reference(name)["pre"]
        paths = images.take_evenly(images.list_images(benchlib.CALIB), benchlib.NUM_CALIB)
        np.save(path, np.concatenate(list(images.iter_batches(paths, pre, benchlib.CALIB_BATCH))))
    return path


# ---- report ----------------------------------------------------------------------------

COLUMNS = [("model", "model", ""), ("tool / recipe", "tool", ""),
           ("top-1 / line acc %", "acc", ".2f"), ("change (pts)", "change", "+.2f"),
           ("char acc %", "char", ".2f"), ("agreement %", "agree", ".1f"),
           ("quantize s", "seconds", ".1f"), ("peak RSS MB", "rss_mb", ".0f"),
           ("size MB", "mb", ".2f"), ("note", "note", "")]


def write_report(out: Path, rows: list, versions: dict, command: str, args) -> None:
    vers = "\n".join(f"- {peer}: " + ", ".join(f"{k} {v}" for k, v in v.items())
                     for peer, v in versions.items())
    title = "4-bit weights (W4A8), AdaRound" if args.w4 else "W8A8"
    text = f"""# Peer quantizers at {title}, side by side with onnxquant

{benchlib.measured_line(command)}; peers in their own venvs under `{args.work}`.

Every tool gets the same {benchlib.NUM_CALIB} calibration inputs (a .npy file, fed one sample
at a time): imagenette/train images evenly spread (reference checkpoints), rendered lines seed
1001 (recognizer). Each quantization runs as its own process (`tools/peer_runner.py RECIPE`):
*quantize s* is that process's whole wall time (interpreter start, imports, load, calibration,
save) on a shared 2-core machine, *peak RSS* the largest resident set in its process tree
(`/usr/bin/time -f %M`). Scored here in onnxruntime: top-1 on {args.limit} imagenette/val
images (reference checkpoints), exact-line and character accuracy on {args.lines} rendered
lines, seed 1 (recognizer); agreement = same top-1 class / same decoded line as the float
model. {benchlib.CHANGE}.

{benchlib.table(rows, COLUMNS)}

Versions (each peer's venv):

{vers}
{benchlib.kept_notes(out, "")}"""
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default=",".join(PEERS), help=f"of {','.join(PEERS)}")
    p.add_argument("--models", default=f"mobilevit_xxs,mobilevitv2_050,{RECOGNIZER}")
    p.add_argument("--limit", type=int, default=500, help="imagenette/val images per checkpoint")
    p.add_argument("--lines", type=int, default=300, help="rendered lines for the recognizer")
    p.add_argument("--work", default="/tmp/onnxquant-peers", help="peer venvs live here")
    p.add_argument("--out", help="default: docs/peers.md, with --w4 /tmp/peers_w4.md (the "
                   "W4 table is quoted in docs/peers.md's notes)")
    p.add_argument("--w4", action="store_true", help="4-bit weight AdaRound rows (issue 12) "
                   "instead of W8A8")
    p.add_argument("--recipes", help="comma list of runner recipes to keep (default: all of "
                   "the chosen peers')")
    args = p.parse_args(argv)
    args.out = args.out or ("/tmp/peers_w4.md" if args.w4 else "docs/peers.md")
    peers = {x: (W4 if args.w4 else {k: v[1] for k, v in PEERS.items()}).get(x, [])
             for x in args.peers.split(",") if x}
    if args.w4:
        peers = {k: v for k, v in peers.items() if k in W4}
    if args.recipes:
        keep = set(args.recipes.split(","))
        unknown = keep - {r for v in peers.values() for r in v}
        if unknown:
            p.error(f"recipes {sorted(unknown)} are not among the chosen peers' recipes")
        peers = {k: [r for r in v if r in keep] for k, v in peers.items()}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = benchlib.command_line(__file__, argv)
    rows, versions = [], {"main venv": benchlib.versions("onnxquant", *BASE[:3])}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for name in args.models.split(","):
            calib = calibration(name, Path(tmp))
            model = (benchlib.ASSETS / "real" / f"{name}.onnx" if name == RECOGNIZER
                     else benchlib.reference(name)["path"])
            copy = Path(tmp) / model.name  # peers get a copy: some write beside or into it
            shutil.copyfile(model, copy)
            model_rows = run_recipes(copy, calib, peers, work, Path(tmp), versions)
            ref = benchlib.reference(name)
            base = (score_recognizer(model, model_rows, args.lines) if name == RECOGNIZER
                    else score_reference(ref, model_rows, args.limit))
            rows += [{"model": name, **r} for r in [base] + model_rows]
            write_report(Path(args.out), rows, versions, command, args)
    print(benchlib.table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
