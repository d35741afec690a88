"""The training set on disk: the built array_record dataset a run reads, built the first time from an
Aesthetic-4K-style folder (`data.folder`) or from the embedded demo set (`data.demo_images`)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from absl import logging

from d4k_jax.data import aesthetic4k, demo
from d4k_jax.sharding import sync_processes


def prepare_data(c: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The built dataset's data_dir, building it from `data.folder` (or the demo set) the first time;
    process 0 builds, the others wait (the data_dir must be on a shared filesystem)."""
    data_dir = Path(c.data.data_dir or workdir / "data")
    if (aesthetic4k.dataset_dir(data_dir, c.data.split) / "dataset_info.json").is_file():
        return data_dir
    folder = c.data.folder
    if c.data.demo_images:
        folder = workdir / "demo_images"
        if jax.process_index() == 0 and not folder.exists():
            demo.write_folder(folder, c.data.demo_images, c.data.resolution, seed=c.seed, split=c.data.split)
    if not folder:
        raise ValueError(
            "set --config.data.folder (an Aesthetic-4K-style root) or --config.data.data_dir (a built dataset)"
        )
    if jax.process_index() == 0:
        stats = aesthetic4k.build(folder, c.data.split, data_dir)
        logging.info("dataset: %s", stats)
    sync_processes("dataset")
    return data_dir
