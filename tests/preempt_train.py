"""`python -m d4k_jax.train` with a preemption notice at a chosen step, for tests/test_multiprocess.py.

D4K_TEST_SIGTERM=PROCESS:STEP: once process PROCESS (and no other) has asked JAX's preemption sync about STEP,
it sends itself SIGTERM and holds back for HOLD_S before going on, while the others wait for it in the next
step's collectives. JAX's notifier sees the signal within a second, and the processes agree on the step to save
while every step count is STEP or STEP - 1: they save STEP + 1 (a later one, still the same on every process,
only if the machine stalls for longer than HOLD_S). A hold rather than an external `kill` on a metrics line:
the tiny steps take less than the notifier's one-second poll, so without one the saved step would vary.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

HOLD_S = 3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's d4k_jax, not an installed one


def main() -> None:
    import jax
    from jax.experimental import multihost_utils

    process, at = (int(v) for v in os.environ["D4K_TEST_SIGTERM"].split(":"))
    reached, sent = multihost_utils.reached_preemption_sync_point, []

    def reached_then_sigterm(step: int) -> bool:
        answer = reached(step)
        if step == at and jax.process_index() == process and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(HOLD_S)
        return answer

    multihost_utils.reached_preemption_sync_point = reached_then_sigterm  # what orbax's reached_preemption calls
    runpy.run_module("d4k_jax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
