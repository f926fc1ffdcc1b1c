"""Errors that autopart raises on purpose.

Every error here is meant to be read by a person: it names the model node,
module, plan field or cluster field at fault and says what to do. The CLI
prints ``str(error)`` on one line and exits non-zero; it never prints a
traceback for these.
"""

from __future__ import annotations


class AutopartError(Exception):
    """Base class: a problem with the user's input that they can fix."""


class CaptureError(AutopartError):
    """The model could not be traced or annotated."""


class ClusterError(AutopartError):
    """A cluster description is malformed (bad field, unknown preset)."""


class PlanError(AutopartError):
    """A plan is malformed, inconsistent, or does not match the model/cluster."""


class InfeasibleError(AutopartError):
    """No plan fits the constraints (usually device memory)."""


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception with a message in ``exc``'s chain (``__cause__``, else an unsuppressed
    ``__context__``); ``exc`` itself when nothing in the chain says more.

    Wrappers often say nothing: ``torch.distributed.pipelining`` re-raises a stage's failure as a
    ``RuntimeError`` whose text starts with a blank line, and the reason is in its cause."""
    seen = {id(exc)}
    best, cur = exc, exc
    while True:
        nxt = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
        if nxt is None or id(nxt) in seen:
            return best
        seen.add(id(nxt))
        cur = nxt
        if _first_line(cur):
            best = cur


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of ``exc``, never empty: a wrapper's cause is appended
    (``... (caused by Type: line)``), and a wrapper with no message of its own is replaced by it."""
    root = root_cause(exc)
    own = _first_line(exc)
    text = f"{type(exc).__name__}: {own}" if own else f"{type(root).__name__}: {_first_line(root) or '(no message)'}"
    if own and root is not exc:
        text += f" (caused by {type(root).__name__}: {_first_line(root)})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
