"""Read and write safetensors without torch: the safetensors library (numpy framework) behind our own
header validation, lazy, slice by slice, every dtype (bf16 and fp8 too)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from safetensors import safe_open

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
# safetensors 0.8's numpy framework gives BF16 as ml_dtypes.bfloat16, but fails on fp8 (it asks numpy itself for
# `np.float8_e4m3fn`, which only ml_dtypes has): those are read from a memory map of the file instead.
_MEMMAPPED = frozenset({"F8_E4M3", "F8_E5M2"})

Index = tuple[slice, ...]


class TensorSource(Mapping):
    """A read-only name -> array mapping over one or several safetensors files.

    Only headers are read up front (and validated: `read_header`); `source[name]` reads one tensor,
    `source.read(name, index)` only the part of it `index` selects (`safe_open(...).get_slice`).
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, dict, int]] = {}
        self._open: dict[Path, safe_open] = {}
        for f in files:
            header, start = read_header(f)
            for name, info in header.items():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name][0]} and {f}")
                self._where[name] = (f, info, start)
        self.files = files

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """Tensor `name`, or only `tensor[index]` (one slice per axis), read from its file."""
        f, info, start = self._where[name]
        if info["dtype"] in _MEMMAPPED:
            begin, end = info["data_offsets"]
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            raw = np.memmap(f, np.uint8, "r", start + begin, (end - begin,)) if end > begin else np.zeros(0, np.uint8)
            whole = raw.view(dtype).reshape(shape)
            return np.array(whole if index is None else whole[index])
        handle = self._handle(f)
        if index is None or not info["shape"]:
            return handle.get_tensor(name)
        if 0 in info["shape"]:  # the library refuses to slice an empty tensor
            return handle.get_tensor(name)[index]
        return handle.get_slice(name)[index]

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                self._open[f] = safe_open(f, framework="numpy")
            except safetensors.SafetensorError as e:  # what our header checks let through (e.g. gaps in the data)
                raise SafetensorsError(f"{f}: the safetensors library cannot read it: {e}") from None
        return self._open[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._where[name][1]["dtype"]]

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
    """Write tensors with `safetensors.numpy.save_file` (it lays them out by alignment, then name, as
    `safetensors.torch` does), after checking every dtype has a safetensors name (the error names the tensor)."""
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a, order="C")  # the library reads raw memory from its data pointer (ascontiguousarray: 0-d->1-d)
        if a.dtype not in _NAMES:
            raise ValueError(f"cannot write {name!r}: dtype {a.dtype} has no safetensors name")
        arrays[name] = a
    safetensors.numpy.save_file(arrays, path, metadata=metadata)
