"""Runs a command-line entry point as a user does (a subprocess) and checks how it answers bad input.

The bad-input tests (tests/test_bad_inputs_*.py) assert, for each case: a non-zero exit, no traceback, and
a message naming the bad value and what was expected. With D4K_BAD_INPUT_TABLE=FILE set, every checked
case appends a JSON line (case, command, what the user saw) to FILE: the table of the issue note.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _env(devices: int, extra: dict | None) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {os.environ.get('D4K_TEST_XLA_FLAGS', '')}",
        PYTHONPATH=str(ROOT),
    )
    env.pop("D4K_TRACEBACK", None)
    env.update(extra or {})
    return env


# A full disk, simulated: the child limits its own file size before running the module (no preexec_fn, which
# would run Python between fork and exec in a multithreaded parent), and ignores SIGXFSZ so that a write past
# the limit fails with EFBIG instead of killing it.
_LIMITED = (
    "import os, resource, runpy, signal, sys; n = int(os.environ.pop('D4K_TEST_FILE_SIZE')); "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def command(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def run_cli(
    module: str,
    *args,
    devices: int = 1,
    env: dict | None = None,
    file_size: int | None = None,
    timeout: float = 600,
) -> Result:
    """`python -m module args...` from the repository root on `devices` CPU devices; waits for it."""
    cmd, env = command(module, *args), _env(devices, env)
    if file_size is not None:
        env["D4K_TEST_FILE_SIZE"] = str(file_size)
        cmd = [sys.executable, "-c", _LIMITED, module, *cmd[3:]]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(_shown(command(module, *args)), p.returncode, p.stdout, p.stderr)


def start_cli(module: str, *args, devices: int = 1, env: dict | None = None, log: Path | None = None):
    """The same, started in the background (for SIGKILL tests); output goes to `log` (or is dropped)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process by the caller)
    return subprocess.Popen(
        command(module, *args), cwd=ROOT, env=_env(devices, env), stdout=out, stderr=subprocess.STDOUT
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600, poll: float = 0.02) -> None:
    """SIGKILL `proc` as soon as `ready()` is true; fails if it exits first or `timeout` passes."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before the moment to kill it")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill the process")
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_user_error(result: Result, *needles: str, case: str = "") -> str:
    """A non-zero exit, no traceback, and each of `needles` in the output; returns the message shown."""
    assert result.returncode != 0, f"{result.command} succeeded:\n{result.output}"
    assert "Traceback" not in result.output, f"{result.command} printed a traceback:\n{result.output}"
    for needle in needles:
        assert needle in result.output, f"{needle!r} not in the output of {result.command}:\n{result.output}"
    shown = _message(result.output)
    record(case, result.command, shown)
    return shown


def record(case: str, cmd: str, shown: str) -> None:
    """One row of the bad-input table (only when D4K_BAD_INPUT_TABLE names a file)."""
    table = os.environ.get("D4K_BAD_INPUT_TABLE")
    if table and case:
        with open(table, "a") as f:
            f.write(json.dumps({"case": case, "command": cmd, "shown": shown}) + "\n")


def _message(output: str) -> str:
    lines = [x for x in output.splitlines() if x.startswith(("error:", "FATAL"))]
    return lines[-1] if lines else output.strip().splitlines()[-1]


def _shown(cmd: list[str]) -> str:
    return "python " + shlex.join(cmd[1:]).replace(str(ROOT) + "/", "")
