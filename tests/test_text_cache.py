"""The text-embedding cache: what the encoder gave, in bf16 too; rebuilt when the captions or settings change."""

import ml_dtypes
import numpy as np
import pytest

from d4k_jax.data import text_cache


def _encoder(calls):
    def encode(prompts):
        calls.append(len(prompts))
        codes = np.array([[float(len(p)), float(p.count("a"))] for p in prompts], np.float32)
        return np.repeat(codes[:, None, :], 3, axis=1) * 1.001, codes + 0.5

    return encode


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_cache_holds_the_encodings_by_record_key(tmp_path, dtype):
    captions = [f"a {'cat ' * i}on a mat" for i in range(7)]
    calls = []
    cache = text_cache.build(tmp_path / "c", captions, _encoder(calls), dtype=dtype, batch_size=3, model="m")
    assert calls == [3, 3, 3] and len(cache) == 7  # fixed-size batches, the last one padded
    text, pooled = _encoder([])(captions)
    got = cache.lookup(np.array([6, 0, 3]))
    assert got["text"].dtype == np.dtype(dtype) and got["text"].shape == (3, 3, 2)
    np.testing.assert_array_equal(got["text"], text[[6, 0, 3]].astype(dtype))
    np.testing.assert_array_equal(got["pooled"], pooled[[6, 0, 3]].astype(dtype))
    batch = cache.prepare({"image": np.zeros((2, 4, 4, 3)), "key": np.array([1, 2])})
    assert set(batch) == {"image", "text", "pooled"}
    with pytest.raises(KeyError, match="outside the cache of 7"):
        cache.lookup(np.array([7]))


def test_cache_is_reused_or_rebuilt(tmp_path):
    calls = []
    build = lambda caps, **kw: text_cache.build(tmp_path / "c", caps, _encoder(calls), dtype=np.float32, **kw)
    build(["a", "b"], model="m")
    build(["a", "b"], model="m")
    assert calls == [16]  # same captions and settings: nothing encoded again
    build(["a", "c"], model="m")
    build(["a", "c"], model="other")
    assert calls == [16, 16, 16]
    assert text_cache.TextCache(tmp_path / "c").lookup(np.array([1]))["pooled"][0, 0] == 1.5
