"""The one exception type oneword raises for bad input, with what to do next.

Two kinds of errors come as their libraries' own: a setting out of its range, refused by the config models
(`oneword.config`) as pydantic's `ValidationError` (a `ValueError`) when one is built; and an MLflow server's
or object store's failure met by the library functions (`mlflow.exceptions.MlflowException`, botocore's and
minio's errors), which the CLI words in one line.
"""

from __future__ import annotations


class OnewordError(Exception):
    """A user-facing error: says what is wrong (naming the file or value) and what to do.

    The CLI prints these without a traceback and exits with status 2.
    """

    # whether a batch records this failure as a FAILED MLflow run of the concept (not where the concept was erased)
    recorded = True

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")

    def __reduce__(self):
        # keeps the hint apart when the error crosses processes (`oneword.distributed.launch`)
        return type(self), (self.message, self.hint)


class NonFiniteLossError(OnewordError):
    """Training produced a NaN or inf loss; the last good checkpoint is kept."""


class TransientError(OnewordError):
    """An error a later attempt may not meet (a lost connection, a timeout), carried where its cause cannot go:
    across processes (`oneword.distributed`), whose pickles keep no `__cause__`."""
