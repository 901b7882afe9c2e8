"""User-facing errors: one line naming the file or node and the fix; the CLI exits 2."""


class UserError(Exception):
    """A problem with the user's input that the user can fix (not a bug in onnxquant)."""
