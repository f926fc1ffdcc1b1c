"""Output paths, checked before any work: every command that writes a file calls this first.

A command that plans for a minute or trains for ten steps and only then finds that its
output folder is missing (or that it would overwrite a file the user kept) loses the
user's time or data. So each output path is checked up front: not an existing file
unless ``force``, not a directory, and its parent directory exists. The write itself
stays atomic (a temporary file, then ``replace``) where the command does it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import PlanError

__all__ = ["check_output_file"]


def check_output_file(path_text: str | Path | None, force: bool, flag: str, example: str) -> Path | None:
    """``path_text`` as a file to write, or a ``PlanError`` naming ``flag`` and the fix; None passes through."""
    if path_text is None:
        return None
    path = Path(path_text)
    if path.is_dir():
        raise PlanError(f"{flag} {path} is a directory; give a file path such as {path / example}")
    if path.exists() and not force:
        raise PlanError(f"{flag} {path} already exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise PlanError(f"{flag} {path}: directory {path.parent} does not exist; create it or choose another path")
    return path
