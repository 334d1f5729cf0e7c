"""Exceptions the engine raises to its callers (torch-free, so light modules can catch them)."""


class Cancelled(Exception):
    """The caller's `should_stop` turned true; its unfinished requests were dropped."""


class EngineBroken(RuntimeError):
    """Steps keep failing whatever runs in them: the fault is the engine's (a broken device), not a request's,
    so the work should go to another worker."""
