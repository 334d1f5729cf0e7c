"""Errors that refuse a whole job, and the one line a user sees for any refusal."""
from pydantic import ValidationError


class JobInputError(ValueError):
    """The input as a whole can't be used (missing, empty, unknown format, no prompt column, truncated):
    the job is refused before anything is enqueued. The message names the file."""


class JobOutputError(OSError):
    """The output location can't be written or read (unwritable, full, missing parts)."""


def one_line(exc: Exception) -> str:
    """An error as one line; a pydantic error as 'field: message; field: message'."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in error['loc']) or 'value'}: "
                         f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())
    return " ".join(str(exc).split())
