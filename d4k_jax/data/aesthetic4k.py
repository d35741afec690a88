"""TFDS builder for Aesthetic-4K-style imagefolders: one split -> array_record shards of the original image bytes.

A source split is `<src>/<split>/metadata.jsonl` (Hugging Face imagefolder: `{"file_name": ..., "text": ...}` per
line, paths relative to the metadata file's folder). Each split becomes its own builder config, so splits can be
built one at a time into `<data_dir>/aesthetic4k/<config>/<version>/`, `<config>` being the split with `/` -> `_`.

TFDS 4.9.10 writes and reads array_record without TensorFlow: its example serializer/parser and the array_record
writer have NumPy paths, which it takes when TF is not importable. The image is a scalar bytes Tensor feature (not
`tfds.features.Image`) so that nothing is re-encoded or decoded by TFDS.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
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


def _load(path: Path) -> tuple[bytes, int, int] | str:
    """(file bytes, width, height) when PIL can fully decode the bytes, else the reason it cannot."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            im.convert("RGB")  # full decode: truncated or corrupt files fail here, as they would in training
        return data, w, h
    except Exception as e:  # any failure means "not usable", whatever PIL or the OS raised
        return f"{type(e).__name__}: {e}"


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
                results = pool.map(_load, [meta.parent / f for f, _ in part])
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
    """Builds (or, unless `overwrite`, reuses) `dataset_dir(data_dir, split)` from `<src>/<split>/metadata.jsonl`."""
    builder = Aesthetic4k(src=src, split=split, num_threads=num_threads, data_dir=str(data_dir))
    mode = "force_redownload" if overwrite else "reuse_dataset_if_exists"
    config = tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode(mode))
    with tempfile.TemporaryDirectory() as tmp:  # nothing is downloaded; keeps TFDS's downloads/ out of data_dir
        builder.download_and_prepare(download_dir=tmp, file_format="array_record", download_config=config)
    info = tfds.builder_from_directory(str(dataset_dir(data_dir, split))).info
    skipped = [tuple(s) for s in info.metadata.get("skipped", [])]
    return BuildStats(dataset_dir(data_dir, split), info.splits[config_name(split)].num_examples, skipped)
