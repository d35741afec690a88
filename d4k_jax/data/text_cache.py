"""Text embeddings computed once by the frozen text encoders and kept on disk, keyed by record index.

Training never runs the encoders (T5-XXL alone is 9.5 GB in bf16): `build` encodes every caption of a
split into `text.npy` [N, T, D] and `pooled.npy` [N, P] (bfloat16 is stored as its uint16 bits), and the
trainer looks batches up by the loader's record `key`. `fingerprint.json` records what made the cache
(model, lengths, dtype, a hash of the captions); a mismatch rebuilds it rather than training on stale
embeddings. With several processes, process 0 builds the cache and the others wait for it (up to
`timeout_s`), then read it from the same path: it must be on a filesystem every process sees.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from absl import logging
from tqdm import tqdm

from d4k_jax import distributed

_BF16 = np.dtype(ml_dtypes.bfloat16)
Encode = Callable[[list[str]], tuple[Any, Any]]  # captions -> (text [b, T, D], pooled [b, P])


class TextCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = json.loads((self.path / "fingerprint.json").read_text())
        self.dtype = _BF16 if meta["dtype"] == "bfloat16" else np.dtype(meta["dtype"])
        self.text = np.load(self.path / "text.npy", mmap_mode="r")
        self.pooled = np.load(self.path / "pooled.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.text)

    def lookup(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        keys = np.asarray(keys)
        if keys.size and (keys.min() < 0 or keys.max() >= len(self)):
            raise KeyError(f"record keys {keys.min()}..{keys.max()} outside the cache of {len(self)} captions")
        return {"text": self.text[keys].view(self.dtype), "pooled": self.pooled[keys].view(self.dtype)}

    def prepare(self, batch: dict) -> dict:
        """A loader batch {"image", "key"} -> {"image", "text", "pooled"} (the trainer's `prepare`)."""
        rest = {k: v for k, v in batch.items() if k != "key"}
        return {**rest, **self.lookup(batch["key"])}


def fingerprint(captions: Sequence[str], **what: Any) -> dict:
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    return {**what, "captions": len(captions), "sha256": digest}


def build(
    path: str | Path,
    captions: Sequence[str],
    encode: Encode,
    *,
    dtype: Any,
    batch_size: int = 16,
    timeout_s: float = 3600,
    **what: Any,
) -> TextCache:
    """The cache at `path` for these captions, encoding them (process 0, in fixed-size batches) unless a
    cache made from the same captions and settings (`what`: model path, lengths...) is already there. The
    other processes wait for process 0 up to `timeout_s` (a TimeoutError that says what to check)."""
    path, dtype = Path(path), np.dtype(dtype)
    want = fingerprint(captions, dtype=dtype.name, **what)
    done = path / "fingerprint.json"
    if jax.process_index() == 0 and not (done.is_file() and json.loads(done.read_text()) == want):
        if path.exists():
            logging.warning("text cache %s was made from other captions or settings: rebuilding", path)
            shutil.rmtree(path)
        _write(path, list(captions), encode, dtype, batch_size, want)
    distributed.barrier(
        "text_cache",
        timeout_s,
        f"the other processes wait for process 0 to encode {len(captions)} captions into the text cache {path}; "
        "see process 0's log for an error or its progress (a larger timeout_s if it is only slow); the cache must "
        "be on a filesystem every process sees",
    )
    if not (done.is_file() and json.loads(done.read_text()) == want):
        raise FileNotFoundError(
            f"process {jax.process_index()}: process 0 wrote the text cache {path}, but it is missing or another "
            "one here: every process must see the same workdir (a shared filesystem, not a local disk per host)"
        )
    return TextCache(path)


def _write(path: Path, captions: list[str], encode: Encode, dtype: np.dtype, batch_size: int, meta: dict) -> None:
    if not captions:
        raise ValueError("no captions to encode")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stored = np.dtype(np.uint16) if dtype == _BF16 else dtype  # .npy has no bfloat16
    files = {}
    for start in tqdm(range(0, len(captions), batch_size), desc="text cache", unit="batch"):
        chunk = captions[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape: one compile
        text, pooled = encode(padded)
        for k, v in {"text": text, "pooled": pooled}.items():
            v = np.asarray(v).astype(dtype)[: len(chunk)]
            if k not in files:
                files[k] = np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", stored, (len(captions), *v.shape[1:]))
            files[k][start : start + len(chunk)] = v.view(stored)
    for f in files.values():
        f.flush()
    del files
    (tmp / "fingerprint.json").write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(path)
    logging.info("text cache: %d captions encoded into %s", len(captions), path)
