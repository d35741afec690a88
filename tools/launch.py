"""Run one command as several JAX processes on this machine, as a cluster would (a local simulation).

  python -m tools.launch --processes=2 --devices_per_process=4 -- python -m d4k_jax.train --config=... --workdir=W

Process i gets `--config.distributed.coordinator_address=localhost:PORT --config.distributed.num_processes=N
--config.distributed.process_id=i` appended (`--prefix=` changes `config.distributed.`), and
`JAX_NUM_CPU_DEVICES` / `JAX_PLATFORMS=cpu` with `--devices_per_process`. Output lines are prefixed `[i]`.
When one process fails the others are stopped, and the launcher exits with the first failure's code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def commands(cmd: list[str], processes: int, port: int, prefix: str) -> list[list[str]]:
    """The command line of each process: `cmd` plus its distributed settings."""
    return [
        [
            *cmd,
            f"--{prefix}coordinator_address=localhost:{port}",
            f"--{prefix}num_processes={processes}",
            f"--{prefix}process_id={i}",
        ]
        for i in range(processes)
    ]


# XLA:CPU's default schedule lets a device run independent collectives in another order than its peers, which can
# deadlock a multi-device CPU program (rendezvous "may be stuck", then abort after 40 s); a sequential schedule
# keeps one order on every device.
CPU_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _relay(i: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[{i}] {line}")
        sys.stdout.flush()


def launch(cmd: list[str], processes: int, devices_per_process: int = 0, port: int = 0, prefix: str = "") -> int:
    """Run the processes to the end; 0 if all succeeded, else the first failure's exit code (others stopped)."""
    env = dict(os.environ)
    if devices_per_process:
        env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_per_process)}
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()
    procs, relays = [], []
    for i, line in enumerate(commands(cmd, processes, port or free_port(), prefix)):
        p = subprocess.Popen(line, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        relays.append(threading.Thread(target=_relay, args=(i, p.stdout), daemon=True))
        relays[-1].start()
        procs.append(p)
    code = 0
    while True:
        states = [p.poll() for p in procs]
        failed = [c for c in states if c not in (None, 0)]
        if failed or all(c == 0 for c in states):
            code = failed[0] if failed else 0
            break
        time.sleep(0.2)
    for p in procs:  # after a failure: the others would wait for it at a barrier until their timeout
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    for t in relays:
        t.join(timeout=5)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python -m tools.launch --processes=N [--devices_per_process=D] [--port=P] -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m tools.launch")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=0, help="CPU devices per process (simulation)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on localhost (default: a free one)")
    parser.add_argument("--prefix", default="config.distributed.", help="where the settings go in the flags")
    args = parser.parse_args(argv[:split])
    if args.processes < 1 or not argv[split + 1 :]:
        parser.error("--processes must be 1 or more and a command must follow --")
    return launch(argv[split + 1 :], args.processes, args.devices_per_process, args.port, args.prefix)


if __name__ == "__main__":
    sys.exit(main())
