"""Orbax save / restore of parameter pytrees."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint._src.metadata import array_metadata_store

# TensorStore reports a failed write as a ValueError whose text ends in "[os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

MIN_REPLICA_SLICE_BYTES = 1 << 20  # see write_small_arrays_whole


@functools.cache
def write_small_arrays_whole() -> None:
    """Orbax writes a replicated array cooperatively ("replica-parallel"): each replica slices its share out on device
    and writes it. Every slice is one eagerly dispatched program, compiled the first time its shape is met: a FLUX.1
    train state has about a thousand small leaves (biases, norm scales, modulation), and on 8 CPU devices one save of
    a tiny model dispatched 8,856 slices (420 compiles: a third of a test's time) to write kilobytes. Below
    MIN_REPLICA_SLICE_BYTES a replica's share costs less to write than to slice, so this makes one replica write such
    arrays whole; larger ones stay replica-parallel. It sets orbax's global type-handler registry (its
    StandardCheckpointHandler takes no per-handler option), for every save in the process; the files read back the
    same either way. Called before each save here (idempotent)."""
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES, array_metadata_store=array_metadata_store.Store()
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a parameter pytree as an orbax checkpoint at `path` (which must not exist); a full disk
    raises OSError (see disk_full_errors)."""
    path = os.path.abspath(path)
    write_small_arrays_whole()
    with disk_full_errors(path), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params)


@contextlib.contextmanager
def disk_full_errors(path: str | os.PathLike) -> Iterator[None]:
    """Around orbax saves (save_params, a CheckpointManager's): a full disk (or file size limit) raises
    OSError(ENOSPC / EFBIG) naming `path`, as a plain file write does, which d4k_jax.cli reports in one line;
    TensorStore raises it as a ValueError, and orbax logs the tracebacks of its writer threads, which are
    held back until the block ends (and logged then, unless the disk was full)."""
    logger, held = logging.getLogger("absl"), _Held()  # orbax logs through absl
    logger.addFilter(held)
    unraisable = sys.unraisablehook
    sys.unraisablehook = _without_closed_loop_noise(unraisable)
    try:
        yield
    except Exception as e:
        code = _os_error_code(e)
        if code not in _DISK_FULL:
            raise
        held.records.clear()
        logging.getLogger("asyncio").addFilter(_unretrieved_disk_full)  # stays: they come at exit
        raise OSError(code, os.strerror(code), os.fspath(path)) from None
    else:
        sys.unraisablehook = unraisable  # after a failure the noise can come later: the filter stays
    finally:
        logger.removeFilter(held)
        held.release()


def restore_params(path: str | os.PathLike, target: Any) -> Any:
    """Read the pytree saved at `path`. `target` gives structure, shapes, dtypes (and shardings):
    arrays, or `jax.ShapeDtypeStruct`s from `jax.eval_shape`, so nothing is allocated twice."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no orbax checkpoint at {path}")
    abstract = jax.tree.map(_abstract, target)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, abstract)


def stored_shapes(path: str | os.PathLike) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the pytree saved at `path`, read from its metadata (no array is read)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no orbax checkpoint at {path}")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(path)
        tree = meta.item_metadata.tree
    except (FileNotFoundError, ValueError, AttributeError) as e:  # no or unreadable _METADATA: not a finished save
        raise ValueError(f"{path} is not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
    return {p: tuple(m.shape) for p, m in traverse_util.flatten_dict(tree).items()}


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _os_error_code(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    match = _OS_ERROR_CODE.search(str(e))
    return int(match[1]) if match else None


class _Held(logging.Filter):
    """Holds back orbax's ERROR records until `release()`."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        records, self.records = self.records, []
        for r in records:
            logging.getLogger(r.name).handle(r)


def _unretrieved_disk_full(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" of a write that found the disk full: orbax's
    other writer tasks of a failed save, garbage-collected (often at exit) after the error was reported."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _os_error_code(exc) in _DISK_FULL and "never retrieved" in record.getMessage())


def _without_closed_loop_noise(hook):
    """`hook` (sys.unraisablehook) less one noise: when a save fails, TensorStore's pending write callbacks
    find orbax's event loop closed, and each reports RuntimeError("Event loop is closed") with a traceback,
    before and after the error itself is raised."""

    def filtered(u):
        if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    return filtered
