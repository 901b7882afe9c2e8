"""User-facing errors: one line naming the file or node and the fix; the CLI exits 2."""


class UserError(Exception):
    """A problem with the user's input that the user can fix (not a bug in onnxquant)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), for the
    one-line errors and notes that quote a library's reason."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
