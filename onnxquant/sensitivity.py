"""Which layers cost accuracy: each site quantized alone, and left float, against float.

    calibrate once (the full recipe)  ->  float outputs once, cached
    per site    alone       only this site quantized, every other site float
                left float  every site quantized but this one (the top ``left_float_top``)
    per role    the same with a whole role: conv_block, transformer, bridge, softmax, linear
    recipe      the full recipe, then the top 1/3/5 sites kept float (what --exclude gains)

Every variant re-runs ``api.analyze`` (cheap), copies the full plan's flags minus the float
sites, reuses the one calibration and is built by ``api.build``: the same model as
``api.run`` with ``exclude=`` those sites. Score on the calibration samples against the float
model's first output: error = mean over samples of ||y_q - y||^2 / ||y||^2; agreement = the
argmax along the last axis equal to float's (top-1 of a classifier, per time step of an
N x T x C recognizer), in percent.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from . import api, opset
from .calibrate import batches, collect_stats, input_dtype, model_input
from .config import INT8_KINDS, PARTS, QuantConfig
from .errors import UserError
from .plots import _pyplot
from .report import _short

FLAGS = ("quantize", "int8_input", "int8_output", "dynamic")
EXCLUDE_TOPS = (1, 3, 5)


@dataclass
class Row:
    """One site: errors vs float when quantized alone / left float."""

    site: str
    kind: str  # conv / linear / softmax
    role: str
    alone: float
    agreement: float  # percent, alone
    left_float: float | None = None
    left_float_agreement: float | None = None


@dataclass
class RoleRow:
    """One role: errors vs float with only its sites quantized / only its sites float."""

    role: str
    sites: int
    alone: float
    agreement: float
    left_float: float
    left_float_agreement: float


@dataclass
class Report:
    rows: list  # Row per site, by error alone, worst first
    roles: list  # RoleRow per role present
    full: tuple  # (error, agreement) of the full recipe
    exclusions: list  # (k, error, agreement) with the top k sites kept float
    recipe: str = ""
    samples: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    excluded: tuple = ()  # the config's own exclude patterns

    def top(self, k: int) -> list:
        return [r.site for r in self.rows[:k]]

    def exclude_argument(self, k: int = 3) -> str:
        """The ``--exclude`` argument keeping the top ``k`` sites float (shell-quoted), with
        the patterns the recipe already excluded."""
        return "--exclude " + shlex.quote(",".join([*self.excluded, *self.top(k)]))

    def to_markdown(self, top: int | None = None) -> str:
        return "\n\n".join([_site_table(self.rows[:top]), _role_table(self.roles),
                            _recipe_table(self)])

    def to_text(self, top: int = 15) -> str:
        """What ``onnxquant inspect --sensitivity`` prints."""
        head = (f"sensitivity: {self.recipe}; {self.samples} calibration samples, "
                f"{len(self.rows)} sites, {self.seconds:.1f} s")
        lines = [head, "", self.to_markdown(max(top, 0)), "",
                 f"keep the top 3 float: {self.exclude_argument(3)}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def plot(self, path, top: int = 25) -> Path:
        """Horizontal bars of the ``top`` sites' error alone (log scale) -> PNG at ``path``."""
        plt = _pyplot()
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{path.parent}: cannot create the plots folder "
                            f"({exc.strerror})") from None
        rows = self.rows[:top][::-1]
        colors = {r: f"C{i}" for i, r in enumerate(PARTS)}
        fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
        ax.barh(range(len(rows)), [max(r.alone, 1e-12) for r in rows],
                color=[colors.get(r.role, "C9") for r in rows])
        ax.set_yticks(range(len(rows)), [_short(r.site, 50) for r in rows], fontsize=7)
        ax.set_xscale("log")
        ax.set(xlabel="output error quantized alone  (mean ||y_q - y||^2 / ||y||^2)",
               title=f"sensitivity: {self.recipe}"[:110])
        ax.title.set_fontsize(9)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in PARTS
                   if any(x.role == r for x in rows)]
        ax.legend(handles, [r for r in PARTS if any(x.role == r for x in rows)],
                  loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path


def sensitivity(model, config: QuantConfig | None = None, calibration=None, preprocess=None,
                progress: bool = True, left_float_top: int | None = 10) -> Report:
    """Rank the sites of ``config``'s recipe by the output error each costs (module doc).

    ``left_float_top``: how many of the worst sites (by error alone) also get the left-float
    variant; None = all. Cost: one build and one pass over the samples per variant.
    """
    start = time.perf_counter()
    study = _Study(model, config or QuantConfig(), calibration, preprocess)
    names = list(study.sites)
    if not names:
        raise UserError("the recipe quantizes no Conv/MatMul/Gemm/attention Softmax: "
                        "nothing to rank")
    k_left = len(names) if left_float_top is None else min(left_float_top, len(names))
    roles = [r for r in PARTS if r in study.sites.values()]
    total = 1 + len(names) + k_left + 2 * len(roles) + sum(k < len(names) for k in EXCLUDE_TOPS)
    with tqdm(total=total, desc="sensitivity", unit="variant", disable=not progress) as bar:
        full = study.score(set(), bar)
        rows = [Row(n, _kind(study.sites[n]), study.sites[n],
                    *study.score(set(names) - {n}, bar)) for n in names]
        rows.sort(key=lambda r: -r.alone)
        for r in rows[:k_left]:
            r.left_float, r.left_float_agreement = study.score({r.site}, bar)
        role_rows = []
        for role in roles:
            members = {n for n in names if study.sites[n] == role}
            role_rows.append(RoleRow(role, len(members), *study.score(set(names) - members, bar),
                                     *study.score(members, bar)))
        exclusions = [(k, *study.score(set(n.site for n in rows[:k]), bar))
                      for k in EXCLUDE_TOPS if k < len(names)]
    return Report(rows, role_rows, full, exclusions, study.recipe, study.samples,
                  time.perf_counter() - start, study.notes, study.config.exclude)


class _Study:
    """The one calibration, the float outputs and the variants built from them."""

    def __init__(self, model, config: QuantConfig, calibration, preprocess):
        if config.auto:
            raise UserError("--sensitivity ranks the recipe as configured; drop --auto (its "
                            "per-layer search runs after the sites are chosen)")
        original = api._as_model(model)
        self.source, note = opset.upgrade(original, api._model_name(model))
        self.notes = [note] if note else []
        self.config = config
        probing = api._probing(config)
        calib_cfg = replace(config, ort_int8_kinds=INT8_KINDS) if probing else config
        graph, plan = api.analyze(self.source, calib_cfg)
        self.x = _samples(self.source, calibration, config, preprocess)
        self.stats = collect_stats(api._calibration_model(self.source, graph, plan),
                                   plan.calibration_tensors(), self.x, config, progress=False,
                                   histograms=config.range_method != "minmax")
        if probing:  # as api.run: the kinds measured on this CPU re-mark the plan
            plan.stats = self.stats
            self.config = api._probe_int8_kinds(self.source, graph, plan, config)
        self.sites = {_site_name(s): _role(s) for s in _sites(plan) if s.quantize}
        self.samples = len(self.x)
        self.recipe = _recipe(self.config)
        self.input = model_input(self.source)[0]
        self.reference = [_Reference(y) for y in self._outputs(self.source)]

    def variant(self, floats: set) -> onnx.ModelProto:
        """The recipe with the sites named in ``floats`` left float (as ``exclude=``)."""
        graph, plan = api.analyze(self.source, self.config)
        for site in _sites(plan):
            if _site_name(site) in floats:
                for flag in FLAGS:
                    if hasattr(site, flag):
                        setattr(site, flag, False)
        int8_convs = {c.node for c in plan.convs if c.int8_input}
        for r in plan.residuals:  # as passes/select_sites.py: Q/DQ on the skip of int8 convs
            r.quantize = r.quantize and r.conv in int8_convs
        plan.stats = self.stats
        return api.build(graph, plan, self.config, self.source)[0]

    def score(self, floats: set, bar=None) -> tuple:
        """(error, agreement %) of the variant with ``floats`` left float."""
        errors, agree = [], []
        for ref, yq in zip(self.reference, self._outputs(self.variant(floats))):
            e, a = ref.compare(yq)
            errors.append(e)
            agree.append(a)
        if bar is not None:
            bar.update()
        return float(np.mean(np.concatenate(errors))), float(np.mean(np.concatenate(agree)) * 100)

    def _outputs(self, model: onnx.ModelProto) -> list:
        """First output per batch (onnxruntime CPU, spinning off: the machine may be shared)."""
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        first = session.get_outputs()[0].name
        return [session.run([first], {self.input: x})[0] for x in self._batches()]

    def _batches(self):
        size = model_input(self.source)[1][0] or self.config.batch_size
        return [self.x[i:i + size] for i in range(0, len(self.x), size)]


def _samples(model, calibration, config, preprocess) -> np.ndarray:
    """The calibration samples as one array, read once (a reader cannot be rewound)."""
    if calibration is None:
        raise UserError("sensitivity needs calibration data: pass --calib DIR (images) or a .npy")
    name, shape = model_input(model)
    got = [np.asarray(b) for _, b in batches(calibration, name, shape, config, preprocess,
                                             input_dtype(model))]
    if not got:
        raise UserError("calibration source gave no samples; pass a folder with images or a "
                        "non-empty .npy")
    return np.concatenate(got)[:config.calib_samples]


class _Reference:
    """One batch of float outputs, with what every comparison needs computed once."""

    def __init__(self, y: np.ndarray):
        self.y = np.asarray(y, np.float32)
        flat = self.y.reshape(len(y), -1)
        self.norm = np.maximum(np.einsum("ij,ij->i", flat, flat, dtype=np.float64),
                               np.finfo(np.float64).tiny)
        self.top = self.y.argmax(-1) if self.y.ndim >= 2 else None

    def compare(self, yq: np.ndarray) -> tuple:
        """Per sample: ||yq - y||^2 / ||y||^2, and argmax agreement along the last axis."""
        n = len(self.y)
        diff = (np.asarray(yq, np.float32) - self.y).reshape(n, -1)
        error = np.einsum("ij,ij->i", diff, diff, dtype=np.float64) / self.norm
        if self.top is None:
            return error, np.full(n, np.nan)
        return error, (self.top == yq.argmax(-1)).reshape(n, -1).mean(1)


def _sites(plan) -> list:
    return plan.attention + plan.convs + plan.linears


def _site_name(site) -> str:
    return getattr(site, "softmax", None) or site.node


def _role(site) -> str:
    if hasattr(site, "softmax"):
        return "softmax"
    return getattr(site, "role", None) or "linear"


def _kind(role: str) -> str:
    return role if role in ("softmax", "linear") else "conv"


def _recipe(cfg: QuantConfig) -> str:
    parts = ",".join(p for p in PARTS if p in cfg.active_parts)
    weights = f"W{cfg.weight_bits}"
    if cfg.target == "paper":
        weights += (" symmetric" if cfg.weight_symmetric else " asymmetric") + \
            (" per-channel" if cfg.per_channel else " per-tensor")
    if cfg.target == "ort":
        weights += f", int8 on {','.join(cfg.ort_int8_kinds or ()) or 'nothing'}"
    excluded = f", {len(cfg.exclude)} --exclude pattern(s)" if cfg.exclude else ""
    return f"target {cfg.target}, {weights}, parts {parts}{excluded}"


def _fmt(value, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.2f}" if pct else f"{value:.2e}"


def _site_table(rows) -> str:
    lines = ["| # | site | kind | role | error alone | agreement alone % | error left float "
             "| agreement left float % |", "|---:|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {i} | `{_short(r.site)}` | {r.kind} | {r.role} | {_fmt(r.alone)} | "
              f"{_fmt(r.agreement, True)} | {_fmt(r.left_float)} | "
              f"{_fmt(r.left_float_agreement, True)} |" for i, r in enumerate(rows, 1)]
    return "\n".join(lines)


def _role_table(roles) -> str:
    lines = ["| role | sites | error, only this role quantized | agreement % | error, this role "
             "left float | agreement % |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.role} | {r.sites} | {_fmt(r.alone)} | {_fmt(r.agreement, True)} | "
              f"{_fmt(r.left_float)} | {_fmt(r.left_float_agreement, True)} |" for r in roles]
    return "\n".join(lines)


def _recipe_table(report: Report) -> str:
    lines = ["| recipe | error | agreement % |", "|---|---:|---:|",
             f"| full recipe | {_fmt(report.full[0])} | {_fmt(report.full[1], True)} |"]
    lines += [f"| top {k} kept float | {_fmt(e)} | {_fmt(a, True)} |"
              for k, e, a in report.exclusions]
    return "\n".join(lines)
