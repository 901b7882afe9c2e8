"""Quantize thousands of random valid hybrid graphs with every recipe and classify the results.

    python tools/fuzz.py --n 2000 [--seed 0] [--jobs 2] [--out DIR] [--recipes paper,tensorrt]

Graph ``seed + i`` comes from ``tests/fuzz_graphs.generate`` (the generator the hypothesis
tests use, with NumPy choices instead). Each (graph, recipe) is one of

    ok          the output passes the full checker, runs in onnxruntime, is close to float,
                keeps every Softmax and finds every generated attention block
    user_error  onnxquant's own one-line UserError
    crash       any other exception (or a UserError that is not one line)
    invalid     the output fails onnx.checker (full) or onnxruntime refuses/fails to run it
    wrong       silently wrong: not close to float, a Softmax dropped, attention missed, or
                the input model modified

It prints the count per class and the first examples of each distinct failure (seed, recipe,
exception line); failing input models are saved to ``--out`` as ``seed<N>.onnx`` with
``seed<N>.txt`` describing the graph and every failure on it. Exit status 1 if anything
crashed, was invalid or wrong.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAILURES = ("crash", "invalid", "wrong")
CLASSES = ("ok", "user_error") + FAILURES


def _fuzz_one(args):
    """(seed, recipes) -> (seed, description, [(recipe, kind, detail, error)], model bytes)."""
    seed, recipes = args
    import fuzz_graphs as fg

    try:
        gen = fg.generate(seed)
    except fg.GeneratorBug as exc:
        return seed, None, [("*", "generator_bug", str(exc).splitlines()[0], 0.0)], None
    with contextlib.redirect_stdout(io.StringIO()):  # graphsurgeon logs to stdout
        results = [(r, *_astuple(fg.check(gen, r))) for r in recipes]
    failed = any(kind in FAILURES for _, kind, _, _ in results)
    return seed, gen, results, gen.model.SerializeToString() if failed else None


def _astuple(outcome):
    return outcome.kind, outcome.detail, (outcome.error, outcome.bound)


def _signature(detail: str) -> str:
    """Group failures by message, not by the node/tensor names or numbers in it."""
    import re

    detail = re.sub(r"\b[\w.]*_[\w.]*\b", "<name>", detail)
    detail = re.sub(r"'[^']*'|\"[^\"]*\"", "<name>", detail)
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", detail)[:200]


def main(argv=None) -> int:
    import fuzz_graphs as fg

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of graphs (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for failing models (default: a new temp dir)")
    ap.add_argument("--recipes", default=",".join(fg.RECIPES),
                    help=f"comma-separated subset of {','.join(fg.RECIPES)}")
    ap.add_argument("--examples", type=int, default=3, help="examples shown per failure kind")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop after this long and report the graphs done so far")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = set(recipes) - set(fg.RECIPES)
    if unknown:
        ap.error(f"unknown recipes {sorted(unknown)}; choose from {list(fg.RECIPES)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="onnxquant-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    counts = collections.Counter()
    per_recipe = collections.defaultdict(collections.Counter)
    groups = collections.defaultdict(list)  # (kind, signature) -> [(seed, recipe, detail)]
    graphs = {}  # seed -> (node count, naming, opset, description) of failing graphs
    errors = collections.defaultdict(list)  # recipe -> relative errors (ok and wrong runs)
    t0 = time.perf_counter()
    work = [(args.seed + i, recipes) for i in range(args.n)]
    pool = multiprocessing.Pool(args.jobs) if args.jobs > 1 else None
    results = pool.imap_unordered(_fuzz_one, work, chunksize=4) if pool else map(_fuzz_one, work)
    for done, (seed, gen, outcomes, model) in enumerate(results, 1):
        for recipe, kind, detail, error in outcomes:
            counts[kind] += 1
            per_recipe[recipe][kind] += 1
            if kind in ("ok", "wrong") and error[1]:
                errors[recipe].append((*error, seed))
            if kind not in ("ok", "user_error"):
                groups[(kind, _signature(detail))].append((seed, recipe, detail))
        if model is not None:
            graphs[seed] = (len(gen.model.graph.node), gen.notes[1], gen.notes[0], gen.describe())
            (out / f"seed{seed}.onnx").write_bytes(model)
            lines = [gen.describe()] + [f"{r}: {k}: {d}" for r, k, d, _ in outcomes if k != "ok"]
            (out / f"seed{seed}.txt").write_text("\n".join(lines) + "\n")
        if done % 100 == 0:
            print(f"  {done}/{args.n} graphs, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.minutes is not None and time.perf_counter() - t0 > 60 * args.minutes:
            print(f"stopped after {args.minutes} minutes: {done} of {args.n} graphs")
            args.n = done
            break
    if pool:
        pool.terminate()
    _report(args, recipes, counts, per_recipe, groups, graphs, errors, out,
            time.perf_counter() - t0)
    return 1 if any(counts[k] for k in FAILURES + ("generator_bug",)) else 0


def _report(args, recipes, counts, per_recipe, groups, graphs, errors, out, seconds) -> None:
    total = sum(counts.values())
    print(f"{args.n} graphs (seeds from {args.seed}) x {len(recipes)} "
          f"recipes = {total} runs in {seconds:.0f} s")
    for kind in CLASSES + ("generator_bug",):
        if counts[kind] or kind in CLASSES:
            print(f"  {kind:13s} {counts[kind]}")
    print("per recipe: " + "; ".join(
        f"{r}: " + " ".join(f"{k}={per_recipe[r][k]}" for k in CLASSES if per_recipe[r][k])
        for r in recipes))
    if errors:
        import numpy as np

        print("relative output error ||y_q - y|| / ||y||, and its share of the bound "
              "(median / p90 / p99 / max):")
        for recipe, values in errors.items():
            err, bound, seeds = np.array(values).T
            q = np.percentile(err, [50, 90, 99, 100])
            r = np.percentile(err / bound, [50, 90, 99, 100])
            print(f"  {recipe:18s} error " + " / ".join(f"{v:.3g}" for v in q)
                  + "   share " + " / ".join(f"{v:.2f}" for v in r)
                  + f"   (closest: seed {int(seeds[np.argmax(err / bound)])})")
    for (kind, sig), cases in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        seeds = sorted({s for s, _, _ in cases})
        recipes_hit = sorted({r for _, r, _ in cases})
        print(f"\n[{kind}] x{len(cases)} ({len(seeds)} graphs; recipes {','.join(recipes_hit)})")
        for seed, recipe, detail in cases[:args.examples]:
            print(f"    seed {seed} {recipe}: {detail}")
        tally = collections.Counter(graphs[s][1] for s in seeds if s in graphs)
        tally.update(graphs[s][2] for s in seeds if s in graphs)
        print("    graphs: " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.items())))
        smallest = min((s for s in seeds if s in graphs), key=lambda s: graphs[s][0], default=None)
        if smallest is not None:
            recipe = next(r for s, r, _ in cases if s == smallest)
            print(f"    smallest: seed {smallest} {recipe} ({graphs[smallest][0]} nodes): "
                  f"{graphs[smallest][3]}")
    print(f"\nfailing models: {out}")


if __name__ == "__main__":
    sys.exit(main())
