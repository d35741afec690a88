"""Multi-process start-up: the `distributed` settings of every CLI -> `jax.distributed.initialize`.

One process needs nothing. Several (the hosts of a TPU pod slice or a GPU cluster, or processes simulated on
one machine with `JAX_NUM_CPU_DEVICES` and `python -m tools.launch`) either give the coordinator, the process
count and this process's id, or set `auto` where JAX detects the cluster itself (SLURM, Open MPI, Kubernetes,
Cloud TPU). It must run before anything touches a device.

A process that cannot reach the coordinator would be aborted by JAX's C++ client after the timeout with a
bare DEADLINE_EXCEEDED; it is checked here first, so that the error names the address it tried. `barrier`
waits for the other processes with a timeout and says what was awaited (multihost_utils.sync_global_devices
has no timeout).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from jax._src import distributed as _jax_distributed
from jax.experimental import multihost_utils

DEFAULTS = dict(coordinator_address="", num_processes=0, process_id=-1, auto=False, timeout_s=300)


def problems(coordinator_address: str, num_processes: int, process_id: int, auto: bool, timeout_s: int) -> list[str]:
    """What is wrong with these settings (empty: they can start)."""
    out = []
    given = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    if auto and given:
        out.append("distributed.auto=True takes the cluster from the environment: leave the other fields unset")
    if given and not auto:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            out.append(f"distributed.coordinator_address={coordinator_address!r}: expected HOST:PORT")
        if num_processes < 1:
            out.append(f"distributed.num_processes={num_processes}: expected the number of processes (1 or more)")
        elif not 0 <= process_id < num_processes:
            out.append(f"distributed.process_id={process_id}: expected 0 to {num_processes - 1}")
    if timeout_s <= 0:
        out.append(f"distributed.timeout_s={timeout_s}: expected seconds, more than 0")
    return out


def initialize(settings: Mapping[str, Any] | None) -> None:
    """Start this process's part of a multi-process run as `settings` (the `distributed` fields) say; nothing
    for a single process. One ValueError lists every bad field; an unreachable coordinator is a ConnectionError
    naming it, raised within `timeout_s`."""
    s = {**DEFAULTS, **dict(settings or {})}
    unknown = sorted(set(s) - set(DEFAULTS))
    wrong = [f"distributed.{k} is not a setting (the settings: {sorted(DEFAULTS)})" for k in unknown]
    wrong += problems(**{k: s[k] for k in DEFAULTS})
    if wrong:
        raise ValueError("; ".join(wrong))
    if s["auto"]:
        jax.distributed.initialize(initialization_timeout=s["timeout_s"])
        return
    if not s["coordinator_address"]:
        return
    if s["process_id"] != 0:  # process 0 hosts the coordinator; the others must reach it
        wait_for(s["coordinator_address"], s["timeout_s"])
    logging.info(
        "process %d of %d: joining the coordinator at %s (timeout %d s)",
        s["process_id"],
        s["num_processes"],
        s["coordinator_address"],
        s["timeout_s"],
    )
    jax.distributed.initialize(
        s["coordinator_address"], s["num_processes"], s["process_id"], initialization_timeout=s["timeout_s"]
    )


def wait_for(address: str, timeout_s: float) -> None:
    """Return once a TCP connection to HOST:PORT succeeds; a ConnectionError naming it after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"distributed.coordinator_address={address}: no coordinator answered within {timeout_s} s "
                    f"({e.strerror or e}); start process 0 there, or check the host, port and firewall"
                ) from None
            time.sleep(0.5)


def barrier(name: str, timeout_s: float, waiting_for: str) -> None:
    """Every process waits here until all have reached `name`; nothing to wait for with one process. After
    `timeout_s` every process raises a TimeoutError that names the barrier, the wait and `waiting_for` (what
    the slow process is doing, and what to check). The wait is the coordination service's barrier (no device
    computation); a name may be used again once all have passed it."""
    if jax.process_count() == 1:
        return
    client = _jax_distributed.global_state.client
    if client is None:  # several processes without jax.distributed (none known): the device barrier, no timeout
        multihost_utils.sync_global_devices(name)
        return
    try:
        client.wait_at_barrier(name, int(timeout_s * 1000))
    except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
            raise
        report = " ".join(line for line in str(e).splitlines() if line.strip() and not line.startswith("RPC:"))
        raise TimeoutError(
            f"process {jax.process_index()} of {jax.process_count()}: the processes did not all reach the "
            f"barrier {name!r} within {timeout_s:g} s; {waiting_for}. JAX: {report}"
        ) from None
