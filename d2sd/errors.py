"""The one error type D2SD raises for problems a user can fix (bad paths, checkpoints, options).

Its message is one line that says what is wrong and, where there is one, what to do about it;
callers (the CLI) print it without a traceback.
"""


class D2SDError(Exception):
    """A user-facing D2SD failure: missing file, unreadable checkpoint, unsupported model, ..."""
