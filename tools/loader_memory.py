"""Host memory of the training loader: peak RSS of one process reading 4096² batches and placing them on its
devices as the Trainer does (`jax.make_array_from_process_local_data`). Results go to BENCHMARKS.md.

  python -m tools.loader_memory --batch=8 --steps=2 [--resolution=4096] [--images=16] [--workdir=/tmp/loader_memory]

The dataset (`--images` procedural demo images of resolution², PNG, built with d4k_jax.data.build) is made
once in WORKDIR; the measurement runs in a fresh subprocess so that its peak RSS (`ru_maxrss`) counts only
the imports, the loader and the batches.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build(workdir: Path, images: int, resolution: int) -> Path:
    """The built dataset's data_dir (made once)."""
    from d4k_jax.data import aesthetic4k, demo

    data_dir = workdir / f"tfds_{images}x{resolution}"
    if not (data_dir / "done").is_file():
        root = demo.write_folder(workdir / f"folder_{images}x{resolution}", images, resolution)
        aesthetic4k.build(root, "train", data_dir, num_threads=2)
        (data_dir / "done").write_text("")
    return data_dir


def measure(data_dir: str, resolution: int, batch: int, steps: int) -> dict:
    """Peak RSS while reading `steps` batches of `batch` images and placing each on the devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from d4k_jax.data import input_pipeline

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    start = rss()
    loader = input_pipeline.make_loader(data_dir, "train", resolution=resolution, global_batch_size=batch, seed=0)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    t0, shipped = time.perf_counter(), None
    for _ in range(steps):
        host = next(loader)["image"]
        on_device = jax.make_array_from_process_local_data(sharding, host)
        on_device.block_until_ready()
        shipped = (str(host.dtype), host.nbytes)
        del host, on_device
    return dict(
        dtype=shipped[0],
        batch_bytes=shipped[1],
        rss_after_imports=start,
        peak_rss=rss(),
        seconds=time.perf_counter() - t0,
        devices=jax.device_count(),
        backend=jax.default_backend(),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="images per batch in this process")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/loader_memory")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # the subprocess: data_dir
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.resolution, args.batch, args.steps)))
        return
    data_dir = build(Path(args.workdir), args.images, args.resolution)
    cmd = [sys.executable, "-m", "tools.loader_memory", f"--measure={data_dir}"]
    cmd += [f"--resolution={args.resolution}", f"--batch={args.batch}", f"--steps={args.steps}"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    print(
        f"{args.batch} x {args.resolution}² per batch, {args.steps} batches, {out['devices']} {out['backend']} "
        f"device(s): batch {out['dtype']} {gib(out['batch_bytes'])}; RSS after imports "
        f"{gib(out['rss_after_imports'])}, peak {gib(out['peak_rss'])} "
        f"(+{gib(out['peak_rss'] - out['rss_after_imports'])}); {out['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
