"""Builds one split of an Aesthetic-4K-style imagefolder into TFDS array_record shards.

python -m d4k_jax.data.build --src=ROOT --split=train --data_dir=DIR [--overwrite] [--num_threads=8]

Prints how many records were written and names every skipped line (undecodable image, file_name outside the
split's folder, bad JSON). The dataset is replaced only once the new one is complete (see aesthetic4k.build).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from d4k_jax import cli
from d4k_jax.data.aesthetic4k import build


def _define_flags() -> None:
    # Defined only when run as a script, so importing this module never clashes with another program's flags.
    flags.DEFINE_string("src", None, "imagefolder root holding <split>/metadata.jsonl", required=True)
    flags.DEFINE_string("split", "train", "source split, e.g. train, eval/size_2048, eval/size_4096")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir to write aesthetic4k/<split>/<version>/ into", required=True)
    flags.DEFINE_bool("overwrite", False, "rebuild even if the dataset exists (replaced once the new one is complete)")
    flags.DEFINE_integer("num_threads", 8, "threads reading and decode-checking images")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    print(build(f.src, f.split, f.data_dir, overwrite=f.overwrite, num_threads=f.num_threads))


if __name__ == "__main__":
    _define_flags()
    cli.run(main, config_flag=None)
