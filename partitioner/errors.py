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
