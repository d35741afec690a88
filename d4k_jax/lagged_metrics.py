"""A training step's metrics read one step late, so that the accelerator does not wait for the host.

Reading a step's metrics (`jax.device_get`) blocks until the step is done. Read right after dispatching it,
the device idles while the host checks them, logs, and fetches and places the next batch. The loop of
d4k_jax.trainer instead dispatches step N, then reads step N-1's (`add`): step N is queued by then, so the
host's work overlaps it. A step whose state is about to be used (a checkpoint, an evaluation hook) is read
at once (`read_pending`), so that nothing uses the state of a step not yet checked.

`seconds` of a step: the wall time from reading the previous step's metrics to reading this one's, less the
time the loop spent `paused()` in between (hooks, checkpoint saves), which is not the step's. In a steady run
that is one step of whichever is slower, the device or the host (batch fetch and placement included); the
first step after a start also holds the compilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

from jax import device_get


@dataclasses.dataclass
class StepMetrics:
    step: int
    metrics: Any  # the step's metrics: device arrays until read, then numpy
    context: dict  # what the caller needs with them (batch size, FLOPs, the hooks' metrics)
    seconds: float | None = None  # set when read (see the module doc)


class LaggedMetrics:
    """At most one step pending: dispatched, its metrics not yet read or not yet written. Each step's metrics,
    once on the host, go to `check(step, metrics)` (which may raise: the step is then dropped) and, once the
    step is taken, to `write(StepMetrics)`, in step order. Leaving the `with` block writes the pending step
    (also when an Exception ends it, so that the steps taken are logged)."""

    def __init__(self, check: Callable[[int, dict], None], write: Callable[[StepMetrics], None]):
        self.check, self.write = check, write
        self.pending: StepMetrics | None = None
        self._last, self._paused = time.perf_counter(), 0.0

    def __enter__(self) -> LaggedMetrics:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None or issubclass(kind, Exception):  # not on KeyboardInterrupt: that one should end at once
            self.take()

    def add(self, step: int, metrics: Any, **context) -> None:
        """Step `step` was just dispatched with these (device) metrics: the step pending before is read (this
        blocks until it is done, while `step` stays queued) and written; `step` becomes the pending one."""
        self.take()
        self.pending = StepMetrics(step, metrics, context)

    def read_pending(self) -> None:
        """Read (and check) the pending step now; it stays pending until `take`."""
        entry, self.pending = self.pending, None
        if entry is not None and entry.seconds is None:
            self._read(entry)  # a raise leaves nothing pending
        self.pending = entry

    def take(self) -> None:
        """Read the pending step if it is not yet, and write it; nothing is pending after."""
        self.read_pending()
        entry, self.pending = self.pending, None
        if entry is not None:
            self.write(entry)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in this block counts for no step's `seconds`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def _read(self, entry: StepMetrics) -> None:
        entry.metrics = device_get(entry.metrics)
        now = time.perf_counter()
        entry.seconds, self._last, self._paused = now - self._last - self._paused, now, 0.0
        self.check(entry.step, entry.metrics)
