"""A tiny multi-process program for tests/test_launch.py: start-up from flags, one global computation."""

import sys

import numpy as np


def main(argv: list[str]) -> None:
    settings = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--"))
    if settings.pop("fail", None) == settings.get("process_id"):
        sys.exit(3)  # this process fails before start-up; the launcher must stop the other one
    for k in ("num_processes", "process_id"):
        settings[k] = int(settings[k])
    from d4k_jax import distributed

    distributed.initialize(settings)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()  # this process's rows
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), local)
    total = float(jax.jit(lambda a: a.sum())(x))
    print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} sum {total}", flush=True)
    from d4k_jax import sharding

    hybrid = sharding.make_mesh({"fsdp": -1}, dcn={"data": -1})  # data across the processes, fsdp within each
    rows = [sorted({d.process_index for d in row.flat}) for row in hybrid.devices]
    print(f"process {jax.process_index()} hybrid {dict(hybrid.shape)} rows {rows}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
