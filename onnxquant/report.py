"""Human-readable block map (``onnxquant inspect``); the Figure-3 histograms are in plots.py."""

from __future__ import annotations

from .plan import Plan


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def canonical_line(plan: Plan) -> str:
    """What canonicalization changed before matching (passes/canonicalize.py, fold_batchnorm.py)."""
    c = plan.canonical
    return (f"{c.get('bypassed', 0)} Identity/Dropout/no-op Cast bypassed, "
            f"{c.get('bn_folded', 0)} BatchNormalization folded into Convs, "
            f"{c.get('renamed', 0)} unnamed/duplicate nodes named")


def print_block_map(plan: Plan, verbose: bool = False) -> None:
    """Attention blocks, then convs grouped by role, then anything left in float."""
    print(f"canonical: {canonical_line(plan)}")
    print(f"attention blocks: {len(plan.attention)}")
    print(f"  {'#':>3}  {'pattern':<14} softmax node")
    for i, a in enumerate(plan.attention):
        print(f"  {i:>3}  {a.pattern:<14} {_short(a.softmax)}")
    for name, reason in plan.unmatched_softmax:
        print(f"    -  {'(float)':<14} {_short(name)}: {reason}")
    roles = plan.role_counts()
    print(f"convs: {len(plan.convs)}  conv_block {roles['conv_block']}, "
          f"transformer {roles['transformer']}, bridge {roles['bridge']}")
    kinds = {}
    for c in plan.convs:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    print("  kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    if verbose:
        print(f"  {'role':<12} {'kind':<10} {'kernel':<7} {'cin>cout':<11} node")
        for c in plan.convs:
            kernel = "x".join(map(str, c.kernel))
            print(f"  {c.role:<12} {c.kind:<10} {kernel:<7} {f'{c.cin * c.group}>{c.cout}':<11} "
                  f"{_short(c.node)}")
    print(f"linear layers: {len(plan.linears)} (MatMul/Gemm with a constant weight)")
    if verbose:
        for s in plan.linears:
            print(f"  {s.op:<12} {_short(s.node)}")
    for note in plan.notes:
        print(f"note: {note}")
