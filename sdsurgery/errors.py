"""Errors sdsurgery raises. The CLI turns them into one-line messages; the library raises them
where the problem is known, with a message that says what is wrong and how to fix it."""
from __future__ import annotations

__all__ = ["SurgeryError", "TraceError", "NoResidualsError", "FoldError", "NotConvertedError",
           "first_line"]


def first_line(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message, for one-line errors (``Type: line`` with
    ``with_type``; the type's name when the message is empty)."""
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        return type(e).__name__
    return f"{type(e).__name__}: {line}" if with_type else line


class SurgeryError(Exception):
    """Base class of sdsurgery's own errors."""


class TraceError(SurgeryError):
    """torch.fx could not trace the model (or a block of it).

    ``module`` is the qualified name of the module whose forward failed ('' for the root);
    ``reason`` what fx said, with the file and line of the failing code when known.
    """

    def __init__(self, message: str, module: str = "", reason: str = ""):
        super().__init__(message)
        self.module = module
        self.reason = reason or message


class NoResidualsError(SurgeryError):
    """The model has no residual connection to gate."""


class FoldError(SurgeryError):
    """A branch's survival scale cannot be folded into the weights."""


class NotConvertedError(SurgeryError, ValueError):
    """The model carries no stochastic-depth gates (it was not converted)."""
