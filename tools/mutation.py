"""Mutation testing of the quantizer math, emission and functions (a benchmark, not CI).

    python tools/mutation.py --before --max-mutants 100   # score of the tests as they were
    python tools/mutation.py --survivors                   # re-test last run's survivors
    python tools/mutation.py --config-fields               # each QuantConfig field is tested
    options: --modules quantizers,emit,... --tests FILE... --seed 0 --workdir DIR

mutmut 3 (pinned below; docs/mutation.md says why) mutates one module at a time and runs, per
mutant, only the tests of that module's fast selection (``MODULES``) that execute the
mutated function, fastest first, with ``-x``. mutmut wants ``[mutmut]`` in setup.cfg and runs
from a copy in ``mutants/``, so each module gets a scratch tree under ``--workdir``:

    WORKDIR/venv                 mutmut + the project's venv (a .pth, nothing reinstalled)
    WORKDIR/<module>/setup.cfg   generated [mutmut] + the project's [tool:pytest]
    WORKDIR/<module>/onnxquant   the package, passes/ copied in as onnxquant/passes
    WORKDIR/<module>/tests       the tests; models/ and shared/ (conftest's ../shared) beside

The working tree is only read. The per-mutant timeout is CPU time, mutmut's
``(test time + 1 s) * 2 * --timeout-multiplier``, so a loaded machine does not turn slow
mutants into timeouts. ``--max-mutants N`` tests an evenly spaced, seeded sample of N
mutants per module. ``--survivors`` keeps the scratch trees, copies the current sources and
tests in again and re-tests only the mutants that survived last time (new tests are picked
up by mutmut's incremental stats). Prints one row per module; writes WORKDIR/results.json
and each module's surviving diffs to WORKDIR/<module>/survivors.diff.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = "mutmut==3.8.1"
MARKERS = "not torch and not tensorrt and not accuracy and not gpu"
# modules whose code only the torch tier executes: their selection runs torch-marked tests too
TORCH_MARKERS = "not tensorrt and not accuracy and not gpu"
# 12 s of kernel timing on every run; its decision is timing-dependent, so not a mutant killer
DESELECT = ("tests/test_targets.py::test_ort_target_measures_by_default",)

_MATH = ("test_quantizers", "test_log2_function", "test_spec", "test_softmax_quantizers")
_EMIT = ("test_passes", "test_spec", "test_softmax_quantizers", "test_targets", "test_exclude",
         "test_canonicalize", "test_log2_function")
_GPTQ = ("test_gptq", "test_gptq_shrinkage", "test_reconstruct_driver", "test_block_weights",
         "test_blocks", "test_storage4")
_RECON = (*_GPTQ, "test_reconstruct_torch")
_TORCH = ("test_reconstruct_torch", "test_reconstruct_driver", "test_blocks", "test_torch_ops")
_PLAN = ("test_passes", "test_spec", "test_targets", "test_exclude", "test_config",
         "test_softmax_quantizers")
MODULES = {  # name -> (path in the scratch tree, fast test selection; test_mutants is added)
    "quantizers": ("onnxquant/quantizers.py", _MATH),
    "emit": ("onnxquant/emit.py", _EMIT),
    "emit_qdq": ("onnxquant/emit_qdq.py", _EMIT),
    "functions": ("onnxquant/functions.py", ("test_log2_function", "test_softmax_quantizers",
                                             "test_spec", "test_log2_body")),
    "log2_body": ("onnxquant/log2_body.py", ("test_log2_body",)),
    "spec": ("onnxquant/spec.py", ("test_spec", "test_softmax_quantizers", "test_targets")),
    "decide": ("onnxquant/decide.py", _PLAN),
    "softmax_quantizers": ("onnxquant/softmax_quantizers.py",
                           ("test_softmax_quantizers", "test_spec")),
    "select_sites": ("onnxquant/passes/select_sites.py", _PLAN),
    "gptq": ("onnxquant/gptq.py", _GPTQ),
    "layers": ("onnxquant/layers.py", _GPTQ),
    "storage4": ("onnxquant/storage4.py", ("test_storage4", "test_spec", "test_gptq")),
    "reconstruct": ("onnxquant/reconstruct.py", _RECON),
    "block_runs": ("onnxquant/block_runs.py", (*_RECON, "test_search")),
    # torch tier (TORCH_MODULES): the methods, their quantizers and the ONNX-to-torch executor
    "reconstruct_torch": ("onnxquant/reconstruct_torch.py", _TORCH),
    "torch_quant": ("onnxquant/torch_quant.py", _TORCH),
    "torch_ops": ("onnxquant/torch_ops.py", _TORCH),
    "torch_graph": ("onnxquant/torch_graph.py", _TORCH),
}
TORCH_MODULES = ("reconstruct", "block_runs", "reconstruct_torch", "torch_quant", "torch_ops",
                 "torch_graph")
DEFAULT_MODULES = ("quantizers", "emit", "emit_qdq", "functions", "spec", "decide",
                   "softmax_quantizers")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no_tests", 33: "no_tests",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          None: "not_checked"}
COLUMNS = ("mutants", "killed", "survived", "timeout", "no_tests", "other")

# Every QuantConfig field -> a test that fails when the field is ignored (--config-fields
# checks it: the field is reset to its default after validation, the test must then fail).
CONFIG_TESTS = {
    "target": "tests/test_passes.py::test_tensorrt_target_is_symmetric_int8_on_every_conv",
    "weight_bits": "tests/test_spec.py::test_weight_bits_and_scheme_reach_the_codes",
    "weight_symmetric": "tests/test_spec.py::test_weight_bits_and_scheme_reach_the_codes",
    "per_channel": "tests/test_spec.py::test_per_tensor_weights_get_one_scale_each",
    "weight_format": "tests/test_spec.py::test_weight_format_folded_writes_cast_sub_mul",
    "softmax_bits": "tests/test_spec.py::test_softmax_bits_and_eps_reach_the_log2_node",
    "log2_eps": "tests/test_spec.py::test_softmax_bits_and_eps_reach_the_log2_node",
    "softmax_quantizer": "tests/test_softmax_quantizers.py::"
                         "test_each_quantizer_builds_a_valid_close_model",
    "log2_body": "tests/test_log2_body.py::"
                 "test_default_paper_file_gets_the_bitcast_body_at_opset_26",
    "parts": "tests/test_passes.py::test_parts_ablation",
    "ort_int8_kinds": "tests/test_mutants.py::test_ort_int8_kinds_choose_the_int8_convs",
    "num_calib": "tests/test_spec.py::test_num_calib_limits_the_samples",
    "batch_size": "tests/test_mutants.py::test_batch_size_sets_the_calibration_batches",
    "fold_batchnorm": "tests/test_canonicalize.py::"
                      "test_batchnorm_is_folded_where_weights_are_per_channel",
    "bias_correction": "tests/test_bias_correction.py::"
                       "test_first_layer_has_no_mean_error_after_correction[6]",
    "exclude": "tests/test_exclude.py::test_excluded_conv_keeps_its_float_weight",
    "act_bits": "tests/test_mutants.py::test_act_bits_set_the_activation_grid",
    "calib_method": "tests/test_mutants.py::test_calib_method_sets_the_activation_ranges",
    "auto": "tests/test_mutants.py::test_auto_runs_the_per_layer_search",
    "search_metric": "tests/test_fisher.py::"
                     "test_fisher_search_is_no_worse_than_rounding_and_differs_from_mse",
    "weight_block_size": "tests/test_block_weights.py::"
                         "test_block_wise_linears_dequantize_as_the_reference_in_onnxruntime[4]",
    "reconstruct": "tests/test_gptq.py::test_emitted_codes_are_the_reconstructed_ones",
    "reconstruct_iters": "tests/test_reconstruct_torch.py::"
                         "test_iters_and_seed_reach_the_torch_methods",
    "reconstruct_holdout": "tests/test_reconstruct_driver.py::"
                           "test_holdout_zero_fits_and_judges_every_sample[adaround-0.0]",
    "reconstruct_device": "tests/test_reconstruct_torch.py::"
                          "test_reconstruct_device_reaches_every_method_and_the_summary[brecq]",
    "seed": "tests/test_reconstruct_torch.py::test_iters_and_seed_reach_the_torch_methods",
}
_IGNORE_PLUGIN = """
import dataclasses, os
from onnxquant.config import QuantConfig
_field = os.environ["ONNXQUANT_IGNORED_FIELD"]
_default = {f.name: f.default for f in dataclasses.fields(QuantConfig)}[_field]
_post_init = QuantConfig.__post_init__
def _ignoring(self):
    _post_init(self)  # validation sees the value; everything after it sees the default
    object.__setattr__(self, _field, _default)
QuantConfig.__post_init__ = _ignoring
"""


def ensure_venv(workdir: Path) -> Path:
    """A venv with mutmut whose .pth adds this interpreter's site-packages (the project)."""
    venv = workdir / "venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mutmut").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", MUTMUT], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    project = sysconfig.get_paths()["purelib"]
    Path(site.stdout.strip(), "zz_onnxquant_project.pth").write_text(
        f"import site; site.addsitedir({project!r})\n")
    return venv


def _copy(src: Path, dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)


def prepare(scratch: Path, path: str, tests: list, multiplier: float, fresh: bool,
            before: bool = False, markers: str = MARKERS) -> None:
    """Scratch tree + setup.cfg for one module (the working tree is never written)."""
    if fresh and scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    _copy(ROOT / "onnxquant", scratch / "onnxquant")
    _copy(ROOT / "passes", scratch / "onnxquant" / "passes")
    _copy(ROOT / "tests", scratch / "tests")
    placeholder = scratch / "tests" / "test_mutants.py"
    if before or not placeholder.exists():  # same test selection (mutmut's cache key)
        placeholder.write_text('"""Placeholder: the working tree has no test_mutants.py."""\n')
    for name, target in (("models", ROOT / "models"), ("shared", ROOT.parent / "shared")):
        link = scratch / name
        if target.exists() and not link.exists():
            link.symlink_to(target)
    project = configparser.ConfigParser()
    project.read(ROOT / "setup.cfg")
    cfg = configparser.ConfigParser()
    pytest_args = ["-p", "no:cacheprovider", "-m", markers]
    for test in DESELECT:
        pytest_args += ["--deselect", test]
    cfg["mutmut"] = {
        "source_paths": "onnxquant", "only_mutate": path, "also_copy": "\nmodels",
        "pytest_add_cli_args": "\n" + "\n".join(pytest_args),
        "pytest_add_cli_args_test_selection": "\n" + "\n".join(tests),
        "timeout_multiplier": str(multiplier), "use_git_change_detection": "false",
        "on_dependency_change": "ignore",
    }
    cfg["tool:pytest"] = dict(project["tool:pytest"])
    with open(scratch / "setup.cfg", "w") as f:
        cfg.write(f)


def _meta(scratch: Path, path: str) -> dict:
    meta = scratch / "mutants" / (path + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


_GENERATE = """
from pathlib import Path
from mutmut.__main__ import create_mutants, set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
set_mutant_under_test("mutant_generation")
Path("mutants").mkdir(exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(1)
"""


def sample(venv: Path, scratch: Path, path: str, n: int, seed: int) -> list:
    """Evenly spaced mutants (seeded offset), so every function of the module is sampled."""
    subprocess.run([str(venv / "bin" / "python"), "-c", _GENERATE], cwd=scratch, check=True,
                   capture_output=True)
    names = sorted(_meta(scratch, path))
    if n >= len(names):
        return []
    step = len(names) / n
    offset = random.Random(seed).random() * step
    return [names[int(offset + i * step)] for i in range(n)]


# mutmut forks each mutant from a process that already ran the tests: torch's autograd with
# a pool of intra-op threads hangs in the forked child (a backward never returns), so torch
# runs on one thread here (tests/test_reconstruct_torch.py reads the variable)
FORK_SAFE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "ONNXQUANT_TEST_TORCH_THREADS": "1"}


def run_mutmut(venv: Path, scratch: Path, names: list) -> tuple[float, int]:
    start = time.monotonic()
    with open(scratch / "mutmut.log", "w") as log:
        done = subprocess.run([str(venv / "bin" / "mutmut"), "run", "--max-children", "1",
                               *names], cwd=scratch, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **FORK_SAFE_ENV})
    return time.monotonic() - start, done.returncode


def tally(codes: dict, names: list | None) -> dict:
    keys = names or list(codes)
    row = dict.fromkeys(COLUMNS, 0)
    for key in keys:
        status = STATUS.get(codes.get(key), "other")
        if status == "not_checked":
            continue
        row["mutants"] += 1
        row[status if status in row else "other"] += 1
    tested = row["mutants"]
    row["score"] = round(100.0 * (row["killed"] + row["timeout"]) / tested, 1) if tested else None
    row["survivors"] = sorted(k for k in keys
                              if STATUS.get(codes.get(k)) in ("survived", "no_tests"))
    return row


_DIFFS = """
import sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
for name in sys.argv[1:]:
    print(f"# {name}"); print(get_diff_for_mutant(name))
"""


def write_diffs(venv: Path, scratch: Path, survivors: list) -> None:
    out = scratch / "survivors.diff"
    if not survivors:
        out.write_text("")
        return
    with open(out, "w") as f:
        subprocess.run([str(venv / "bin" / "python"), "-c", _DIFFS, *survivors], cwd=scratch,
                       stdout=f, stderr=subprocess.STDOUT, check=False)


def run_module(venv: Path, workdir: Path, name: str, args) -> dict:
    path, tests = MODULES[name]
    tests = args.tests or [f"tests/{t}.py" for t in tests] + ["tests/test_mutants.py"]
    scratch = workdir / name
    previous = _meta(scratch, path) if args.survivors else {}
    prepare(scratch, path, tests, args.timeout_multiplier, fresh=not args.survivors,
            before=args.before, markers=TORCH_MARKERS if name in TORCH_MODULES else MARKERS)
    if args.survivors:
        names = tally(previous, None)["survivors"]
        if not names:
            return {**tally(previous, None), "seconds": 0.0}
    else:
        names = sample(venv, scratch, path, args.max_mutants, args.seed) if args.max_mutants else []
    seconds, rc = run_mutmut(venv, scratch, names)
    codes = _meta(scratch, path)
    row = tally(codes, list(previous) if args.survivors else names or None)
    row["seconds"] = round(seconds, 1)
    if rc != 0:  # e.g. the clean test run failed: the counts are stale
        row["error"] = f"mutmut exited {rc}, see {scratch / 'mutmut.log'}"
    write_diffs(venv, scratch, row["survivors"])
    return row


def _pytest(tests: list, env: dict | None = None) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    if env is not None:
        cmd[3:3] = ["-p", "onnxquant_ignore_field"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode


def check_config_fields(workdir: Path) -> int:
    """Each field of CONFIG_TESTS: its test passes, and fails with the field ignored."""
    import dataclasses
    import os

    from onnxquant.config import QuantConfig

    missing = {f.name for f in dataclasses.fields(QuantConfig)} - set(CONFIG_TESTS)
    (workdir / "onnxquant_ignore_field.py").write_text(_IGNORE_PLUGIN)
    baseline = _pytest(sorted(set(CONFIG_TESTS.values())))
    print(f"config-field tests pass as they are: {baseline == 0}")
    bad = sorted(missing) + ([] if baseline == 0 else ["(baseline)"])
    for field, test in CONFIG_TESTS.items():
        path = [str(workdir)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        env = dict(os.environ, ONNXQUANT_IGNORED_FIELD=field, PYTHONPATH=os.pathsep.join(path))
        rc = _pytest([test], env)
        print(f"  {field:<18} ignored -> {'fails (caught)' if rc == 1 else f'rc {rc} (MISSED)'}"
              f"  {test}", flush=True)
        if rc != 1:
            bad.append(field)
    print("fields without a test that catches them:", ", ".join(bad) or "none")
    return 1 if bad else 0


def print_table(rows: dict) -> None:
    head = ("module",) + COLUMNS + ("score %", "seconds")
    print(("{:<20}" + "{:>9}" * (len(head) - 1)).format(*head))
    for name, row in rows.items():
        cells = [row[c] for c in COLUMNS] + [row["score"], row["seconds"]]
        print(("{:<20}" + "{:>9}" * len(cells)).format(name, *map(str, cells)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", default=",".join(DEFAULT_MODULES),
                    help=f"comma-separated, from {', '.join(MODULES)}")
    ap.add_argument("--tests", nargs="+", help="test files instead of each module's selection")
    ap.add_argument("--max-mutants", type=int, default=0, help="per module; 0: all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-multiplier", type=float, default=3.0)
    ap.add_argument("--survivors", action="store_true",
                    help="re-test only last run's survivors (keeps the scratch trees)")
    ap.add_argument("--before", action="store_true",
                    help="score the tests as they were: tests/test_mutants.py left out")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/onnxquant-mutation"))
    ap.add_argument("--config-fields", action="store_true",
                    help="only check that every QuantConfig field has a test catching it")
    args = ap.parse_args(argv)
    if args.config_fields:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return check_config_fields(args.workdir)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = set(modules) - set(MODULES)
    if unknown:
        ap.error(f"unknown modules {sorted(unknown)}; choose from {', '.join(MODULES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    venv = ensure_venv(args.workdir)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    rows = {}
    for name in modules:
        rows[name] = results[name] = run_module(venv, args.workdir, name, args)
        print(f"{name}: {rows[name]['score']} % killed of {rows[name]['mutants']} "
              f"({rows[name]['seconds']} s) {rows[name].get('error', '')}", flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    print_table(rows)
    return 1 if any("error" in row for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
