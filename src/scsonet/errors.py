"""User-facing errors: one line that names the offending file or value."""


class ScsonetError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""
