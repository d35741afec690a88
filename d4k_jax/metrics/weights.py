"""What a metric whose network weights are not at hand raises: the report says "not computed" and why."""

from __future__ import annotations

import os
from pathlib import Path


class MissingWeights(FileNotFoundError):
    """A metric network's weights are not configured or not found. Never replaced by random weights."""


def require(path: str | os.PathLike | None, what: str, flag: str) -> Path:
    """`path` as a Path if it exists; else MissingWeights naming `what` the file is and the `flag` that sets it."""
    if not path:
        raise MissingWeights(f"no {what} configured (set {flag})")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingWeights(f"{what} not found at {str(p)!r} (set {flag})")
    return p
