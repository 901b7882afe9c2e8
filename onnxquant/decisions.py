"""The decisions report (``onnxquant ... --report FILE``): what the strategies chose and why.

    --auto         per block kind: layers searched, per-channel, asymmetric, clipped
                   activation ranges; then every choice with the block error of each
                   candidate (the reason: the smallest error won)
    --reconstruct  per block: output error with round-to-nearest codes and with the
                   reconstructed ones

Markdown, or JSON when the file name ends in ``.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan


def kind_summary(plan: Plan) -> list[dict]:
    """One row per block kind that the search touched."""
    kinds = {b.name: b.kind for b in plan.blocks}
    rows = {}
    for c in plan.choices:
        row = rows.setdefault(kinds.get(c.block, "?"), {
            "kind": kinds.get(c.block, "?"), "weights": 0, "per_channel": 0, "asymmetric": 0,
            "activations": 0, "clipped": 0})
        if c.role == "weight":
            row["weights"] += 1
            row["per_channel"] += "per-channel" in c.chosen
            row["asymmetric"] += c.chosen.startswith("asym")
        else:
            row["activations"] += 1
            row["clipped"] += c.chosen != "minmax"
    return list(rows.values())


def as_dict(plan: Plan, recipe: str) -> dict:
    return {
        "recipe": recipe,
        "search_by_kind": kind_summary(plan),
        "search_choices": [{"site": c.site, "block": c.block, "role": c.role, "chosen": c.chosen,
                            "errors": c.errors} for c in plan.choices],
        "reconstruction": [{"block": r.name, "layers": r.layers, "rtn_error": r.rtn_error,
                            "error": r.error, "kept": r.kept} for r in plan.reconstruction],
        "reconstruction_model_check": None if plan.reconstruction_check is None else {
            "rtn_error": plan.reconstruction_check.rtn_error,
            "error": plan.reconstruction_check.error, "kept": plan.reconstruction_check.kept,
            "gptq_error": plan.reconstruction_check.gptq_error,
            "kept_gptq": plan.reconstruction_check.kept_gptq,
            "sample_errors": plan.reconstruction_check.sample_errors},
        "notes": list(plan.notes),
    }


def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def as_markdown(report: dict) -> str:
    lines = ["# onnxquant decisions", "", f"Recipe: {report['recipe']}", ""]
    if report["search_choices"]:
        lines += ["## --auto: choices per block kind", ""]
        lines += _table(["block kind", "weights searched", "per-channel", "asymmetric",
                         "activations searched", "clipped"],
                        [[r["kind"], r["weights"], r["per_channel"], r["asymmetric"],
                          r["activations"], r["clipped"]] for r in report["search_by_kind"]])
        lines += ["", "## --auto: every choice (relative block output error per candidate; "
                  "the smallest wins)", ""]
        lines += _table(["site", "block", "role", "chosen", "candidates"],
                        [[c["site"], c["block"], c["role"], c["chosen"],
                          ", ".join(f"{k} {v:.2e}" for k, v in c["errors"].items())]
                         for c in report["search_choices"]])
        lines.append("")
    if report["reconstruction"]:
        lines += ["## --reconstruct: block output error on the judged samples, round-to-nearest -> kept codes", ""]
        lines += _table(["block", "layers", "round to nearest", "kept", "codes kept", "ratio"],
                        [[r["block"], r["layers"], f"{r['rtn_error']:.2e}", f"{r['error']:.2e}",
                          r["kept"], f"{r['error'] / max(r['rtn_error'], 1e-30):.2f}"]
                         for r in report["reconstruction"]])
        check = report["reconstruction_model_check"]
        if check:
            lines += ["", f"Whole model output error: round-to-nearest {check['rtn_error']:.2e}, "
                      f"reconstructed {check['error']:.2e}: codes "
                      + ("kept" if check["kept"] else "rejected (weights rounded to nearest)")
                      + ("" if check.get("gptq_error") is None else
                         f"; plain GPTQ {check['gptq_error']:.2e}"
                         + (": GPTQ's codes kept" if check.get("kept_gptq") else ""))]
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write(path: Path, plan: Plan, recipe: str) -> None:
    report = as_dict(plan, recipe)
    text = (json.dumps(report, indent=1) + "\n" if path.suffix == ".json"
            else as_markdown(report))
    path.write_text(text, encoding="utf-8")
