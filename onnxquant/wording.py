"""Small helpers for the texts a user reads (summary lines, notes)."""


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1: "1 block", "3 blocks"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
