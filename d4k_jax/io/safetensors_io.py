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


class SafetensorsError(ValueError):
    """A safetensors file that is truncated or corrupt; the message names the file and each bad tensor."""


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of one safetensors file and the byte offset where its data starts.

    Every entry is checked against the file before anything is read: a known dtype, a shape, and
    data_offsets that hold exactly dtype x shape bytes, overlap no other tensor and end inside the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path} is not a safetensors file ({size} bytes, expected at least 8)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                f"the file has {size - 8} after the 8-byte length"
            )
        text = fh.read(n)
    try:
        header = json.loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise SafetensorsError(f"{path} is corrupt or not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, expected an object of tensors")
    header.pop("__metadata__", None)
    problems = header_problems(header, size - 8 - n)
    if problems:
        more = [f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else []
        count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
        raise SafetensorsError(f"{path} is truncated or corrupt{count}: " + "\n  ".join(problems[:_SHOWN] + more))
    return header, 8 + n


_SHOWN = 10  # problems listed per file


def header_problems(header: Mapping, data_size: int) -> list[str]:
    """What is wrong with each entry of a safetensors header whose data part holds `data_size` bytes."""
    problems, spans = [], []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            problems.append(f"tensor {name!r}: entry {info!r} (expected dtype, shape and data_offsets)")
            continue
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            problems.append(f"tensor {name!r}: unsupported dtype {dtype!r} (expected one of {sorted(DTYPES)})")
            continue
        if not _ints(shape, 0):
            problems.append(f"tensor {name!r}: shape {shape!r} (expected a list of non-negative integers)")
            continue
        if not _ints(offsets, 2) or not 0 <= offsets[0] <= offsets[1]:
            problems.append(f"tensor {name!r}: data_offsets {offsets!r} (expected [begin, end], 0 <= begin <= end)")
            continue
        begin, end = offsets
        need = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != need:
            problems.append(
                f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, "
                f"its dtype {dtype} x shape {shape} needs {need}"
            )
        elif end > data_size:
            problems.append(
                f"tensor {name!r}: data_offsets {offsets} end past the {data_size} data bytes in the file (truncated?)"
            )
        spans.append((begin, end, name))
    reach, last = 0, None  # the furthest end so far, and whose
    for begin, end, name in sorted(spans):
        if begin < reach:
            problems.append(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap tensor {last!r} (ends at {reach})")
        if end > reach:
            reach, last = end, name
    return problems


def _ints(value: object, length: int) -> bool:
    """A list of non-negative ints (of `length` items unless 0)."""
    return (
        isinstance(value, list)
        and (not length or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


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
