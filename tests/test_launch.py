"""Multi-process start-up (d4k_jax.distributed) and the local launcher (tools.launch), as real processes."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d4k_jax import distributed
from tools.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
PROBE = str(ROOT / "tests" / "mp_probe.py")


def _launch(*extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tools.launch", "--processes=2", "--devices_per_process=4", "--prefix=", "--"]
    return subprocess.run([*cmd, sys.executable, PROBE, *extra], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_two_processes_of_four_devices_are_one_run_of_eight():
    out = _launch()
    assert out.returncode == 0, out.stdout + out.stderr
    lines = sorted(re.findall(r"\[(\d)\] process (\d)/2 devices (\d+) sum ([\d.]+)", out.stdout))
    assert lines == [("0", "0", "8", "28.0"), ("1", "1", "8", "28.0")], out.stdout  # 0 + 1 + ... + 7
    hybrid = "hybrid {'data': 2, 'fsdp': 4, 'sequence': 1, 'tensor': 1} rows [[0], [1]]"
    assert out.stdout.count(hybrid) == 2, out.stdout  # sharding.make_mesh's dcn: one row of the data axis per host


def test_one_failed_process_stops_the_run():
    t0 = time.monotonic()
    out = _launch("--fail=1")
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.monotonic() - t0 < 120  # process 0, waiting for process 1 at start-up, was stopped


def test_an_unreachable_coordinator_is_named_within_the_timeout():
    address = f"localhost:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=re.escape(address)):
        distributed.initialize({"coordinator_address": address, "num_processes": 2, "process_id": 1, "timeout_s": 2})
    assert time.monotonic() - t0 < 10


def test_settings_are_checked_all_at_once():
    bad = {"coordinator_address": "nohost", "num_processes": 2, "process_id": 5, "timeout_s": 0, "procs": 1}
    with pytest.raises(ValueError) as e:
        distributed.initialize(bad)
    for needle in ("distributed.procs is not a setting", "HOST:PORT", "process_id=5: expected 0 to 1", "timeout_s=0"):
        assert needle in str(e.value)
    with pytest.raises(ValueError, match="auto=True"):
        distributed.initialize({"auto": True, "num_processes": 2})
    distributed.initialize(None)  # one process: nothing to start
    distributed.initialize(distributed.DEFAULTS)
