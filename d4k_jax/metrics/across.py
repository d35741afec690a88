"""Image sets split over the processes of a multi-process run, and the metric sums added back across them.

Each process takes one contiguous block of the set (`share`), measures it, and the accumulators (sums, counts,
FID feature sums and second moments) are added over processes (`total`). The sums travel as their bytes
(float64 viewed as uint32) through JAX's all-gather and are added on the host, in process order: jax without
x64 would round a float64 array to float32 on the way, and a float32 psum would not be exact either. So the
result equals one process's up to float64 summation order (relative 1e-15 on a sum). Large arrays go in chunks
so that no device holds more than `CHUNK` elements per process at once.

With one process every function here is the identity and touches no device.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

CHUNK = 1 << 20  # uint32 words per process per all-gather: 4 MiB (a 2048² float64 second moment is 8 chunks)


def share(n: int, index: int | None = None, count: int | None = None) -> range:
    """The indices of a set of `n` that process `index` of `count` (default: this run's) measures: one
    contiguous block, the first `n % count` processes one item more."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    size, extra = divmod(n, count)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def gather(x: np.ndarray) -> np.ndarray:
    """[processes, *x.shape]: every process's `x` (same shape and dtype everywhere), bit for bit."""
    x = np.ascontiguousarray(x)
    if jax.process_count() == 1:
        return x[None]
    words = x.reshape(-1).view(np.uint8)
    words = np.pad(words, (0, -len(words) % 4)).view(np.uint32)  # 32-bit words: no x64 needed, no rounding
    parts = [
        np.asarray(multihost_utils.process_allgather(words[i : i + CHUNK])) for i in range(0, max(len(words), 1), CHUNK)
    ]
    out = np.concatenate(parts, axis=1).view(np.uint8)[:, : x.nbytes]
    return out.view(x.dtype).reshape(-1, *x.shape)


def total(x: np.ndarray) -> np.ndarray:
    """The sum over processes of a float64 array (process order; `x` itself with one process)."""
    x = np.asarray(x, np.float64)
    if jax.process_count() == 1:
        return x
    parts = gather(x)
    out = parts[0].copy()
    for part in parts[1:]:
        out += part
    return out


def gather_json(value: object) -> list:
    """Every process's JSON-able `value` as JSON reads it back (tuples become lists, with one process too), in
    process order (the lengths first, then the padded texts)."""
    text = json.dumps(value)
    if jax.process_count() == 1:
        return [json.loads(text)]
    data = np.frombuffer(text.encode(), np.uint8)
    longest = int(gather(np.array([len(data)], np.int64)).max())
    texts = gather(np.pad(data, (0, longest - len(data)), constant_values=ord(" ")))
    return [json.loads(bytes(t).decode()) for t in texts]
