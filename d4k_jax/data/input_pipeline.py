"""grain input pipeline over `aesthetic4k.build` datasets: square uint8 crops keyed by record index.

Per record (REFERENCE.md §3): decode -> RGB -> bilinear resize of the shorter side to S (torchvision's
`Resize(S)` sizes, upsampling small images) -> random S x S crop -> horizontal flip p=0.5. The crops stay
uint8 on the host and on their way to the device (a 4096² crop is 50 MB, not 201 MB as float32): the train
step maps them to [-1, 1] there (`train_step.to_unit_range`, x / 127.5 - 1 in float32, bit-identical to
doing it here).
Crop and flip come from grain's per-record RNG, so a given (seed, epoch, position) always gets the same crop and
restoring the iterator state replays the exact stream.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain.python as grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from PIL import Image

from d4k_jax.data.aesthetic4k import config_name, dataset_dir


def data_source(data_dir: str | Path, split: str) -> Any:
    """The TFDS array_record data source of a built split (record i: image bytes, text, file_name, width, height)."""
    path = dataset_dir(data_dir, split)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"no dataset at {path}: build it with python -m d4k_jax.data.build --split={split}")
    return tfds.builder_from_directory(str(path)).as_data_source(split=config_name(split))


def captions(data_dir: str | Path, split: str) -> list[str]:
    """Captions in record order (caption i belongs to record / batch key i)."""
    path = dataset_dir(data_dir, split)
    meta = path / "metadata.json"  # written by the builder: avoids reading every image's bytes
    if meta.is_file() and "captions" in (m := json.loads(meta.read_text())):
        return list(m["captions"])
    src = data_source(data_dir, split)
    return [src[i]["text"].decode() for i in range(len(src))]


class _KeyedSource(grain.RandomAccessDataSource):
    """Image bytes plus the record index, which becomes the batch `key`."""

    def __init__(self, data_dir: str | Path, split: str):
        self._args = (str(data_dir), split)
        self._src = data_source(data_dir, split)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self._src[i]["image"], "key": np.int32(i)}

    def __reduce__(self):  # workers reopen the files instead of pickling open readers
        return _KeyedSource, self._args

    def __repr__(self) -> str:  # grain checks it against saved states: no path, so a moved data_dir still resumes
        return f"Aesthetic4k(split={self._args[1]!r}, records={len(self)})"


_ENDLESS = 2**48  # rows of a stream that repeats forever (num_epochs=None)


class _ProcessRows(grain.RandomAccessDataSource):
    """Process p's rows of the one-process record stream: its row k is position (k // b) B + p b + k % b of
    `order` (the unsharded sampler), so that the global batches (every process's rows, in process order) hold
    the same records in the same places as on one process."""

    def __init__(self, source: _KeyedSource, order: grain.IndexSampler, global_batch: int, process: tuple[int, int]):
        self.source, self.order, self.global_batch = source, order, global_batch
        self.index, count = process
        self.batch = global_batch // count
        epochs = order._num_epochs
        self.rows = (epochs * len(source)) // global_batch * self.batch if epochs else _ENDLESS

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, k: int) -> dict[str, Any]:
        position = (k // self.batch) * self.global_batch + self.index * self.batch + k % self.batch
        meta = self.order[position]
        return {**self.source[meta.record_key], "rng": meta.rng}  # the crop's randomness of that position

    def __repr__(self) -> str:  # grain checks it against saved states
        return f"{self.source!r}, process {self.index}'s {self.batch} rows of each batch of {self.global_batch}"


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so that the shorter side is `size`; the longer one is truncated as torchvision does."""
    w, h = image.size
    if min(w, h) == size:
        return image
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return image.resize((nw, nh), Image.BILINEAR)


def crop_flip(image: Image.Image, size: int, top: int, left: int, flip: bool) -> np.ndarray:
    """uint8 [size, size, 3] of the crop at (top, left), mirrored left-right if `flip`."""
    x = np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
    return np.ascontiguousarray(x[:, ::-1]) if flip else x


@dataclasses.dataclass
class RandomCropFlip(grain.RandomMapTransform):
    """Decode, resize, random crop, flip. Undecodable records get image=None (filtered next) and are counted."""

    resolution: int
    skipped: list[int] = dataclasses.field(default_factory=list)  # keys, in this process only

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        rng = element.pop("rng", rng)  # _ProcessRows: the one-process stream's generator for this record
        key = int(element["key"])
        try:
            image = resize_shorter(Image.open(io.BytesIO(element["image"])).convert("RGB"), self.resolution)
        except Exception as e:  # a corrupt record must not stop training
            self.skipped.append(key)
            logging.warning("skipping record %d: cannot decode its image (%s: %s)", key, type(e).__name__, e)
            return {"image": None, "key": element["key"]}
        w, h = image.size
        top, left = (int(v) for v in rng.integers(0, [h - self.resolution + 1, w - self.resolution + 1]))
        flip = bool(rng.random() < 0.5)
        return {"image": crop_flip(image, self.resolution, top, left, flip), "key": element["key"]}


class _Decoded(grain.FilterTransform):
    def filter(self, element: dict[str, Any]) -> bool:
        return element["image"] is not None


class Loader(Iterator[dict[str, np.ndarray]]):
    """Batches from a grain DataLoader, with JSON-able `get_state()` / `set_state()` for the trainer's checkpoint
    (exact, for the same process count, global batch and worker count) and `seek(records)` for any other."""

    def __init__(self, loader: grain.DataLoader, transform: RandomCropFlip, global_batch_size: int, processes: int):
        self._loader, self._transform = loader, transform
        self.global_batch_size, self._processes = global_batch_size, processes
        self._it = iter(loader)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return json.loads(self._it.get_state())

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        if isinstance(state, dict):
            state = json.dumps(state)
        self._it.set_state(state.encode() if isinstance(state, str) else state)

    def seek(self, records: int) -> int:
        """Continue after the first `records` records of the run's global order, which does not depend on the
        process count (see make_loader), so a checkpoint of another process count or global batch resumes
        here. Returns the records skipped: whole global batches of this loader (a position inside one is
        rounded down, and those records are read again). Records dropped as undecodable are not counted by
        the caller (the trainer counts batch rows), so after k of them the stream restarts k records early."""
        batches = records // self.global_batch_size
        state = self.get_state()
        state["last_seen_indices"], state["last_worker_index"] = _positions(
            batches, self.global_batch_size // self._processes, state["worker_count"]
        )
        self.set_state(state)
        return batches * self.global_batch_size

    @property
    def skipped(self) -> list[int]:
        """Keys skipped as undecodable so far in this process (with workers, each worker logs its own)."""
        return list(self._transform.skipped)


def _positions(batches: int, batch: int, workers: int) -> tuple[dict[str, int], int]:
    """grain DataLoader state (last_seen_indices, last_worker_index) after `batches` batches of `batch` rows
    with nothing filtered: one stream without workers; with W workers, worker w reads sampler indices w, w + W,
    ... and batches them itself, and the batches come from the workers in turn."""
    if not workers:
        return {"0": batches * batch - 1}, -1
    made = [batches // workers + (w < batches % workers) for w in range(workers)]
    return {str(w): w - workers + made[w] * batch * workers for w in range(workers)}, batches % workers - 1


def make_loader(
    data_dir: str | Path,
    split: str,
    *,
    resolution: int,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Loader:
    """Iterator of {"image": uint8 [b, S, S, 3], "key": int32 [b]}, b = global_batch_size / processes.

    The record order is one process's: with several, each reads its rows of every global batch (`_ProcessRows`),
    so batch i holds the same records in the same places on any number of processes (a one-process run reads
    the sampler directly, as checkpoints written before this expect); incomplete batches are dropped;
    `num_epochs=None` repeats forever. With `worker_count` > 0 grain batches within each worker, so the stream
    depends on `worker_count`, and a saved state restores only into a loader with the same one and the same
    number of processes.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    if worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags; outside app.run take the defaults
    source = _KeyedSource(data_dir, split)
    batch = global_batch_size // process_count
    shard = grain.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)
    sampler = grain.IndexSampler(len(source), shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    if process_count > 1:  # one record order for the run; each process reads its rows of every global batch
        source = _ProcessRows(source, sampler, global_batch_size, (process_index, process_count))
        sampler = grain.IndexSampler(len(source), shard, shuffle=False, num_epochs=1, seed=seed)
    transform = RandomCropFlip(resolution)
    batch = global_batch_size // process_count
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform, _Decoded(), grain.Batch(batch, drop_remainder=True)],
        worker_count=worker_count,
        shard_options=shard,
        # grain's default read-ahead (500 records) would hold gigabytes of 4K image bytes per worker.
        read_options=grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(2 * batch, 8)),
    )
    return Loader(loader, transform, global_batch_size, process_count)
