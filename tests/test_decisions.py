"""--report: what --auto and --reconstruct chose, and why, in a file a user can read."""

import json

import numpy as np
import onnx

from graphs import calibration, mixed_model
from onnxquant.cli import main
from test_cli import _fails


def _inputs(tmp_path):
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(mixed_model(seed=3), model)
    np.save(calib, calibration(16))
    return model, calib


def test_report_lists_every_choice_with_its_candidates_and_the_block_gains(tmp_path, capsys):
    model, calib = _inputs(tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "why.json"
    argv = [str(model), str(out), "--calib", str(calib), "-q", "--target", "tensorrt",
            "--weight-bits", "4", "--auto", "--reconstruct", "gptq", "--report", str(report)]
    assert main(argv) == 0
    got = json.loads(report.read_text())
    assert got["search_choices"] and got["reconstruction"]
    for choice in got["search_choices"]:  # the reason: the chosen candidate had the least error
        assert choice["errors"][choice["chosen"]] == min(choice["errors"].values())
    by_kind = {r["kind"]: r for r in got["search_by_kind"]}
    weights = [c for c in got["search_choices"] if c["role"] == "weight"]
    assert sum(r["weights"] for r in by_kind.values()) == len(weights)
    assert sum(r["per_channel"] for r in by_kind.values()) == \
        sum("per-channel" in c["chosen"] for c in weights)
    assert all(r["error"] <= r["rtn_error"] for r in got["reconstruction"])
    md = tmp_path / "why.md"
    assert main(argv[:-1] + [str(md)]) == 0
    text = md.read_text()
    assert "## --auto: choices per block kind" in text and "round to nearest" in text


def test_report_may_not_overwrite_the_output(tmp_path, capsys):
    model, calib = _inputs(tmp_path)
    out = tmp_path / "q.onnx"
    _fails(capsys, [str(model), str(out), "--calib", str(calib), "--report", str(out)],
           "--report", "output model")
    assert not out.exists()
