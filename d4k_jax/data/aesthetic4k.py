"""TFDS builder for Aesthetic-4K-style imagefolders: one split -> array_record shards of the original image bytes.

A source split is `<src>/<split>/metadata.jsonl` (Hugging Face imagefolder: `{"file_name": ..., "text": ...}` per
line, paths relative to the metadata file's folder). Each split becomes its own builder config, so splits can be
built one at a time into `<data_dir>/aesthetic4k/<config>/<version>/`, `<config>` being the split with `/` -> `_`.
Lines whose image cannot be decoded, or whose file_name leaves the split's folder (absolute, `..`, a symlink out),
are skipped and named in the build's summary. A build writes into `<data_dir>/.aesthetic4k-<config>.partial/` and
replaces the dataset only when complete (`--overwrite` keeps the old one until then).

TFDS 4.9.10 writes and reads array_record without TensorFlow: its example serializer/parser and the array_record
writer have NumPy paths, which it takes when TF is not importable. The image is a scalar bytes Tensor feature (not
`tfds.features.Image`) so that nothing is re-encoded or decoded by TFDS.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tqdm import tqdm

NAME = "aesthetic4k"
VERSION = tfds.core.Version("1.0.0")


def config_name(split: str) -> str:
    """TFDS name of a source split: `eval/size_2048` -> `eval_size_2048` (TFDS names allow no `/`)."""
    return re.sub(r"\W+", "_", split).strip("_")


def dataset_dir(data_dir: str | Path, split: str) -> Path:
    """Where `build(..., split, data_dir)` puts the dataset (the folder `tfds.builder_from_directory` reads)."""
    return Path(data_dir) / NAME / config_name(split) / str(VERSION)


@dataclasses.dataclass
class BuildStats:
    path: Path
    written: int
    skipped: list[tuple[str, str]]  # (file_name or metadata line, reason): bad lines first, then files in order

    def __str__(self) -> str:
        lines = [f"{self.written} records written to {self.path}, {len(self.skipped)} skipped"]
        return "\n".join(lines + [f"  skipped {name}: {why}" for name, why in self.skipped])


_BYTES_IO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # PIL names the buffer; the file is named already


def outside(split_dir: Path, file_name: str) -> str | None:
    """Why `file_name` does not name a file inside `split_dir` (None when it does): an absolute path, a `..`,
    or a symlink that resolves out of the split would let a metadata line read any file into the dataset."""
    name = Path(file_name)
    if name.is_absolute():
        return f"absolute file_name (expected a path relative to {split_dir})"
    if ".." in name.parts:
        return f"file_name with '..' (expected a path inside {split_dir})"
    real = (split_dir / name).resolve()
    if not real.is_relative_to(split_dir.resolve()):
        return f"file_name resolves to {real}, outside {split_dir} (a symlink out of the split)"
    return None


def _load(split_dir: Path, file_name: str) -> tuple[bytes, int, int] | str:
    """(file bytes, width, height) when PIL can fully decode the file, else the reason it cannot."""
    if why := outside(split_dir, file_name):
        return why
    path = split_dir / file_name
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            im.convert("RGB")  # full decode: truncated or corrupt files fail here, as they would in training
        return data, w, h
    except Exception as e:  # any failure means "not usable", whatever PIL or the OS raised
        return f"{type(e).__name__}: {_BYTES_IO.sub('', str(e))}"


class Aesthetic4k(tfds.core.GeneratorBasedBuilder):
    """Original encoded image bytes, caption, file name, width and height of every decodable image of one split."""

    VERSION = VERSION
    # TFDS's generic `code_path` needs the `importlib_resources` backport, which it only declares for Python < 3.9.
    code_path: ClassVar[epath.Path] = epath.Path(__file__)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Original image bytes, caption, file name, width, height."}

    def __init__(self, *, src: str | Path | None = None, split: str = "train", num_threads: int = 8, **kwargs: Any):
        self._src, self._split, self._num_threads = src and Path(src), split, num_threads
        config = tfds.core.BuilderConfig(name=config_name(split), description=f"source split {split!r}")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Aesthetic-4K-style imagefolder split, original encoded image bytes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_, doc="original encoded file bytes"),
                    "text": tfds.features.Text(doc="caption (metadata.jsonl `text`)"),
                    "file_name": tfds.features.Text(doc="path relative to the split's metadata.jsonl"),
                    "width": tfds.features.Scalar(dtype=np.int32),
                    "height": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            disable_shuffling=True,  # record i = i-th usable metadata line; the loader shuffles
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager
        if self._src is None:
            raise ValueError(f"building {self.name}/{self.builder_config.name} needs src=<imagefolder root>")
        return {config_name(self._split): self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        meta = self._src / self._split / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} not found: expected <src>/<split>/metadata.jsonl")
        entries, skipped, captions = [], [], []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append((str(entry["file_name"]), str(entry["text"])))
            except (ValueError, KeyError, TypeError) as e:
                skipped.append((f"{meta.name}:{n}", f"bad metadata line ({type(e).__name__}: {e})"))
        chunk = 4 * self._num_threads  # bounded look-ahead: pool.map would otherwise load the whole split at once
        with ThreadPoolExecutor(self._num_threads) as pool, tqdm(total=len(entries), desc="Checking images") as bar:
            for start in range(0, len(entries), chunk):
                part = entries[start : start + chunk]
                results = pool.map(_load, [meta.parent] * len(part), [f for f, _ in part])
                for i, ((name, text), res) in enumerate(zip(part, results, strict=True), start):
                    bar.update()
                    if isinstance(res, str):
                        logging.warning("skipping %s: %s", name, res)
                        skipped.append((name, res))
                        bar.set_postfix(skipped=len(skipped))
                        continue
                    captions.append(text)
                    data, w, h = res
                    yield i, {"image": data, "text": text, "file_name": name, "width": w, "height": h}
        if not captions:
            raise ValueError(f"no decodable image listed in {meta} ({len(skipped)} skipped)")
        # Written with dataset_info after generation; `captions` lets the embedding cache skip reading image bytes.
        self.info.metadata.update(source=str(meta), skipped=skipped, captions=captions)


def build(
    src: str | Path, split: str, data_dir: str | Path, *, overwrite: bool = False, num_threads: int = 8
) -> BuildStats:
    """Builds (or, unless `overwrite`, reuses) `dataset_dir(data_dir, split)` from `<src>/<split>/metadata.jsonl`.

    The dataset is built in `partial_dir(data_dir, split)` (a TFDS data_dir of its own) and moved into place
    when complete, so an existing dataset stays whole until then, whatever happens to the build (a full
    disk, a kill); a rerun removes a stale partial folder (and finishes a swap a kill interrupted)."""
    final, partial = dataset_dir(data_dir, split), partial_dir(data_dir, split)
    _finish_swap(final, partial)
    if partial.exists():
        logging.warning("removing %s, left by an interrupted build", partial)
        shutil.rmtree(partial)
    if final.is_dir() and not overwrite:
        return _stats(final, split)
    if not Path(src).is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder (expected an imagefolder root holding <split>/)")
    try:
        builder = Aesthetic4k(src=src, split=split, num_threads=num_threads, data_dir=str(partial))
        with tempfile.TemporaryDirectory() as tmp:  # nothing is downloaded; keeps TFDS's downloads/ out of data_dir
            builder.download_and_prepare(download_dir=tmp, file_format="array_record")
        _swap(dataset_dir(partial, split), final, partial / _PREVIOUS)
    except RuntimeError as e:  # array_record reports a failed write as a RuntimeError with the OS's words
        code = next((c for c in _DISK_FULL if os.strerror(c) in str(e)), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(partial)) from None
    finally:
        _finish_swap(final, partial)  # a failed second rename of the swap must not delete the old dataset
        shutil.rmtree(partial, ignore_errors=True)
    return _stats(final, split)


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_PREVIOUS = "previous"  # inside the partial folder: the replaced dataset, between the two renames of a swap


def partial_dir(data_dir: str | Path, split: str) -> Path:
    """Where `build` writes before moving the dataset into `dataset_dir(data_dir, split)`."""
    return Path(data_dir) / f".{NAME}-{config_name(split)}.partial"


def _swap(new: Path, final: Path, previous: Path) -> None:
    """Move `new` to `final`; an existing `final` goes to `previous` first and is deleted after."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        final.rename(previous)
    new.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def _finish_swap(final: Path, partial: Path) -> None:
    """A build killed between the two renames of `_swap` left no `final` and the old dataset in the partial
    folder: put it back (the rerun then reuses or rebuilds it as asked)."""
    previous = partial / _PREVIOUS
    if previous.is_dir() and not final.exists():
        logging.warning("restoring %s from %s (an interrupted build)", final, previous)
        previous.rename(final)


def _stats(final: Path, split: str) -> BuildStats:
    info = tfds.builder_from_directory(str(final)).info
    skipped = [tuple(s) for s in info.metadata.get("skipped", [])]
    return BuildStats(final, info.splits[config_name(split)].num_examples, skipped)
