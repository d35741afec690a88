"""Files written whole or not at all.

Everything the CLIs write for a user to read or resume from (reports, settings, configs, images, the
metrics log) goes through `replaced`: the content is written to PATH.tmp and renamed over PATH, so a crash,
a kill or a full disk leaves the previous file (or none), never half of one; a failed write removes the
temporary file and raises an OSError that names PATH, which d4k_jax.cli reports in one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replaced(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write; renames it over `path` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def remove_tree(path: str | os.PathLike, patience_s: float = 10.0) -> None:
    """Removes the folder `path` (if any) after a failed write into it, retrying while files still appear in it.

    A disk-full convert once left its DST.partial behind, under load in the full suite
    (tests/test_bad_inputs_convert.py; not reproduced alone): `rmtree(ignore_errors=True)` gave up silently. The
    likely cause, not proven: when an orbax save fails, its first error is raised while TensorStore's other writes
    of the save can still be running on their threads, and a file created during the removal keeps the folder.
    Such writes end moments after the error, so the removal is repeated until it holds."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def write_text(path: str | os.PathLike, text: str) -> None:
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, value: Any) -> None:
    """`value` as standard JSON (NaN and infinities as null, which the standard has instead)."""
    write_text(path, json.dumps(finite(value), indent=2, allow_nan=False) + "\n")


def finite(value: Any) -> Any:
    """`value` with every NaN / infinite float replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
