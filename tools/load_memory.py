"""Host memory of loading a 2B-parameter transformer across processes: each process's peak RSS while it
reads an SD3-medium-sized random bf16 checkpoint, sharded (each process reads its slices) or whole (every
process reads all of it, as loading did before issue 13). Results go to BENCHMARKS.md.

  python -m tools.load_memory make /tmp/sd3m          # transformer/{config.json, *.safetensors}, 4.2 GB, random
  python -m tools.launch --processes=2 --devices_per_process=4 --prefix=distributed. -- \\
      python -m tools.load_memory measure /tmp/sd3m --mode=sharded      # or --mode=whole

`make` writes the diffusers tensor names and shapes of SD3-medium (the d4k_jax key map run backwards on
zero-stride stand-ins, so no model is built) and streams random bf16 values into the file tensor by tensor.
On CPU devices the device buffers are host memory, so the RSS counts what the devices hold too.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import threading
import time
from pathlib import Path

from d4k_jax.models.mmdit_keys import SD3_MEDIUM


def torch_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{diffusers tensor name: shape} of an SD3 transformer with this config.json."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from d4k_jax.models import mmdit_keys
    from d4k_jax.models.keymap import param_shapes, to_torch
    from d4k_jax.models.mmdit import MMDiT

    cfg = mmdit_keys.config_from_diffusers(config)
    small = (jnp.zeros((1, 4, 4, 16)), jnp.zeros((1,)), jnp.zeros((1, 2, 4096)), jnp.zeros((1, 2048)))
    shapes = param_shapes(MMDiT(cfg), small)
    stand_ins = {p: np.broadcast_to(np.zeros((), np.float32), s) for p, s in shapes.items()}
    del jax
    return {k: tuple(v.shape) for k, v in to_torch(stand_ins, mmdit_keys.rules(cfg, shapes)).items()}


def make(folder: Path, seed: int = 0) -> None:
    """folder/transformer: config.json and a bf16 safetensors file of random values, written tensor by tensor."""
    import ml_dtypes
    import numpy as np

    out = folder / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "SD3Transformer2DModel", **SD3_MEDIUM}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shapes = torch_shapes(config)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(out / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            n = int(np.prod(shape))
            for start in range(0, n, 1 << 24):  # 16M values (32 MB of bf16) at a time
                chunk = rng.standard_normal(min(1 << 24, n - start), np.float32) * np.float32(0.02)
                f.write(chunk.astype(ml_dtypes.bfloat16).tobytes())
    print(f"wrote {out}: {len(shapes)} tensors, {offset / 1e9:.2f} GB, {offset // 2 / 1e9:.2f}B parameters")


def measure(folder: Path, mode: str, settings: dict) -> None:
    """Load the transformer onto an FSDP mesh over every process's devices (sharded) or whole onto this
    process's first device (whole); print this process's peak RSS and what its devices hold."""
    from d4k_jax import distributed

    distributed.initialize(settings)
    import jax
    import jax.numpy as jnp

    from d4k_jax import sharding
    from d4k_jax.io import load_component

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    before, t0 = rss(), time.perf_counter()
    mesh = sharding.make_mesh({"fsdp": -1})
    placement = (mesh, sharding.DEFAULT_RULES) if mode == "sharded" else None
    with _PeakRss() as peak:
        _, params = load_component(
            folder / "transformer", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, sharding=placement
        )
        jax.block_until_ready(params)
    held = sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    print(
        f"process {jax.process_index()}/{jax.process_count()} {mode}: model {gib(total)} bf16, this process's "
        f"devices hold {gib(held)}; RSS before loading {gib(before)}, peak {gib(rss())} (of which anonymous "
        f"{gib(peak.anon)}, file-backed {gib(peak.file)}: the safetensors file's mapped pages); "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    sharding.sync_processes("load_memory")  # no process exits (tearing down the coordinator) before the others


class _PeakRss:
    """The largest RssAnon and RssFile (/proc/self/status) seen every 20 ms while the block runs: the
    anonymous part is what the process allocated, the file-backed part mmap'd pages the kernel can drop."""

    def __enter__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
            anon, file = (int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
            self.anon, self.file = max(self.anon, anon), max(self.file, file)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["make", "measure"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mode", choices=["sharded", "whole"], default="sharded")
    for name, default in (("coordinator_address", ""), ("num_processes", 0), ("process_id", -1)):
        parser.add_argument(f"--distributed.{name}", dest=name, type=type(default), default=default)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.folder)
    else:
        keys = ("coordinator_address", "num_processes", "process_id")
        measure(args.folder, args.mode, {k: getattr(args, k) for k in keys})


if __name__ == "__main__":
    main()
