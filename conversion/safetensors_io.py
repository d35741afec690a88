"""Read and write safetensors without torch: lazy, memory-mapped, every dtype (bf16 and fp8 too)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class TensorSource(Mapping):
    """A read-only name -> array mapping over one or several safetensors files.

    Only headers are read up front; `source[name]` copies one tensor out of a memory map.
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, dict, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            header, start = read_header(f)
            for name, info in header.items():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name][0]} and {f}")
                self._where[name] = (f, info, start)
        self.files = files

    def __getitem__(self, name: str) -> np.ndarray:
        f, info, start = self._where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[f][start + begin : start + end]
        return np.frombuffer(raw.tobytes(), DTYPES[info["dtype"]]).reshape(info["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of one safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise ValueError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    unknown = {v["dtype"] for v in header.values()} - DTYPES.keys()
    if unknown:
        raise ValueError(f"{path}: unsupported safetensors dtypes {sorted(unknown)}")
    return header, 8 + n


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write tensors (names sorted, header padded to 8 bytes, as the safetensors library does)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"cannot write {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        arrays[name] = a
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for a in arrays.values():
            fh.write(a.tobytes())
