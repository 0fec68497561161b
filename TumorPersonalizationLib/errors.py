"""User-facing errors.

An ``InputError`` is a problem with what the user gave us (a missing file, a seed outside the brain, parameters out of
bounds). The CLI prints its message on one line and exits with a non-zero code; anything else is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """Bad input from the user; the message says what is wrong and how to fix it."""
