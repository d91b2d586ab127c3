"""Errors sdsurgery raises. The CLI turns them into one-line messages; the library raises them
where the problem is known, with a message that says what is wrong and how to fix it."""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class of sdsurgery's own errors."""


class TraceError(SurgeryError):
    """torch.fx could not trace the model (or a block of it).

    ``module`` is the qualified name of the module whose forward failed ('' for the root).
    """

    def __init__(self, message: str, module: str = ""):
        super().__init__(message)
        self.module = module


class NoResidualsError(SurgeryError):
    """The model has no residual connection to gate."""


class FoldError(SurgeryError):
    """A branch's survival scale cannot be folded into the weights."""


class NotConvertedError(SurgeryError, ValueError):
    """The model carries no stochastic-depth gates (it was not converted)."""
