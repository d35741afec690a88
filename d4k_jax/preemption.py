"""Preemption during training: a SIGTERM to any one process -> every process stops at the same step (the trainer
saves that step's checkpoint first)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp


class Preemption:
    """SIGTERM (a preemption notice) -> `stop(step)`: True at the step at which to save and stop, the same
    step on every process. Ask it at every step on every process, with the step number.

    One process: a Python handler sets a flag for the duration of the `with` block (main thread only), then
    the previous handler is restored. Several: JAX's preemption sync manager (orbax's `reached_preemption`),
    which jax.distributed.initialize starts. Its C++ handler owns SIGTERM and only records it (the process
    carries on); a thread notices within a second and tells the coordinator, and all processes agree on the
    step after the furthest one any has asked about. A Python handler would replace the C++ one (the notice
    would reach no process), so none is installed. Its step counts start at 0: a notice during start-up,
    before the resumed step is asked about, names step 1 and is not acted on (the last checkpoint stands).
    With jax_enable_preemption_service off there is no handler: SIGTERM ends the processes.
    """

    def __enter__(self) -> Callable[[int], bool]:
        self.previous = None
        if jax.process_count() > 1:
            return self._synced
        event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
        return lambda step: event.is_set()

    @staticmethod
    def _synced(step: int) -> bool:
        return ocp.multihost.reached_preemption(step)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
