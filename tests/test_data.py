"""Aesthetic-4K builder (array_record round trip, skips) and the grain input pipeline (transform, sharding, resume)."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from d4k_jax.data import aesthetic4k, demo, input_pipeline

S = 16  # loader resolution in these tests
# (file_name, width, height): PNG and JPEG, square and not, one smaller than S (upsampled), one with alpha.
IMAGES = [
    ("imgs/a.png", 40, 24),
    ("imgs/b.jpg", 24, 40),
    ("c.png", 32, 32),
    ("imgs/small.png", 12, 10),
    ("e.jpg", 48, 30),
    ("f.png", 25, 60),
    ("g.jpg", 16, 16),
    ("rgba.png", 30, 20),
]
BAD = ["bad.jpg", "gone.png"]  # garbage bytes; listed but missing


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    split = root / "train"
    rng = np.random.default_rng(0)
    lines = []
    for i, (name, w, h) in enumerate(IMAGES):
        (split / name).parent.mkdir(parents=True, exist_ok=True)
        mode = "RGBA" if name.startswith("rgba") else "RGB"
        Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), np.uint8), mode).save(split / name)
        lines.append({"file_name": name, "text": f"caption {i}: {name}"})
        if i == 2:
            lines += [{"file_name": n, "text": "unusable"} for n in BAD]
    (split / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    (split / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data_dir = tmp_path_factory.mktemp("tfds")
    return root, data_dir, aesthetic4k.build(root, "train", data_dir, num_threads=2)


def test_builder_round_trip(built):
    root, data_dir, stats = built
    assert stats.written == len(IMAGES)
    assert [name for name, _ in stats.skipped] == BAD
    src = input_pipeline.data_source(data_dir, "train")
    assert len(src) == len(IMAGES)
    for i, (name, w, h) in enumerate(IMAGES):  # record order = metadata order minus the skipped lines
        r = src[i]
        assert r["image"] == (root / "train" / name).read_bytes()
        assert (r["file_name"].decode(), int(r["width"]), int(r["height"])) == (name, w, h)
        assert r["text"].decode() == f"caption {i}: {name}"
    assert input_pipeline.captions(data_dir, "train") == [f"caption {i}: {n}" for i, (n, _, _) in enumerate(IMAGES)]
    again = aesthetic4k.build(root, "train", data_dir)  # reused, stats read back from the dataset's metadata
    assert (again.written, again.skipped) == (stats.written, stats.skipped)


def test_cli_builds_demo_folder(tmp_path):
    src = demo.write_folder(tmp_path / "src", 3, 24, split="eval/size_2048")
    cmd = [sys.executable, "-m", "d4k_jax.data.build", f"--src={src}", "--split=eval/size_2048"]
    out = subprocess.run([*cmd, f"--data_dir={tmp_path / 'tfds'}"], capture_output=True, text=True, check=True)
    assert "3 records written" in out.stdout and "0 skipped" in out.stdout
    captions = [c for _, c in demo.demo_examples(3, 24)]
    assert input_pipeline.captions(tmp_path / "tfds", "eval/size_2048") == captions


def _batches(data_dir, n=None, **kw):
    kw = {"resolution": S, "global_batch_size": 4, "process_index": 0, "process_count": 1, **kw}
    loader = input_pipeline.make_loader(data_dir, "train", **kw)
    return [next(loader) for _ in range(n)] if n else list(loader)


def test_loader_shapes_range_determinism(built):
    _, data_dir, _ = built
    batches = _batches(data_dir, num_epochs=1)
    assert len(batches) == 2
    for b in batches:
        assert b["image"].shape == (4, S, S, 3) and b["image"].dtype == np.uint8  # normalised on the device
        assert b["key"].shape == (4,) and b["key"].dtype == np.int32
        assert b["image"].min() < 128 <= b["image"].max()
    assert sorted(np.concatenate([b["key"] for b in batches])) == list(range(len(IMAGES)))
    same, other = _batches(data_dir, num_epochs=1), _batches(data_dir, num_epochs=1, seed=1)
    for a, b in zip(batches, same, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["key"], b["key"])
    assert any(not np.array_equal(a["key"], b["key"]) for a, b in zip(batches, other, strict=True))


def _reference_crops(path: Path):
    """Every (top, left, flip) -> expected crop, computed directly with PIL (torchvision Resize(S) sizes)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    im = im.resize((S, int(S * h / w)) if w <= h else (int(S * w / h), S), Image.BILINEAR)
    out = {}
    for top in range(im.height - S + 1):
        for left in range(im.width - S + 1):
            crop = im.crop((left, top, left + S, top + S))
            for flip in (False, True):
                c = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
                out[top, left, flip] = np.asarray(c, np.uint8)
    return out


def test_transform_equals_pil_and_varies(built):
    root, data_dir, _ = built
    batches = _batches(data_dir, global_batch_size=8, shuffle=False, num_epochs=6)
    refs = [_reference_crops(root / "train" / name) for name, _, _ in IMAGES]
    seen = {i: set() for i in range(len(IMAGES))}
    for b in batches:
        for img, key in zip(b["image"], b["key"], strict=True):
            match = [p for p, ref in refs[key].items() if np.array_equal(img, ref)]
            assert match, f"record {key} ({IMAGES[key][0]}) equals no crop/flip of the PIL resize"
            seen[int(key)].add(match[0])
    assert {flip for s in seen.values() for _, _, flip in s} == {False, True}
    assert len({p[:2] for p in seen[0]}) > 1  # a.png: 26 x 16 after resize, 11 horizontal offsets
    assert len({p[:2] for p in seen[1]}) > 1  # b.jpg: 16 x 26, vertical offsets
    assert len({p[:2] for p in seen[3]}) > 1  # small.png upsampled to 19 x 16


def test_per_host_sharding(built):
    _, data_dir, _ = built
    keys = []
    for p in range(2):
        batches = _batches(data_dir, num_epochs=1, process_index=p, process_count=2)
        assert all(b["image"].shape == (2, S, S, 3) for b in batches)
        keys.append({int(k) for b in batches for k in b["key"]})
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(range(len(IMAGES)))
    with pytest.raises(ValueError, match="global_batch_size=3 is not divisible by process_count=2"):
        _batches(data_dir, global_batch_size=3, process_index=0, process_count=2)


def test_resume_from_json_state(built):
    _, data_dir, _ = built
    kw = {"resolution": S, "global_batch_size": 2, "seed": 3, "process_index": 0, "process_count": 1}
    loader = input_pipeline.make_loader(data_dir, "train", **kw)
    for _ in range(3):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))  # as the trainer stores it
    expected = [next(loader) for _ in range(6)]  # crosses the epoch boundary (4 batches per epoch)
    resumed = input_pipeline.make_loader(data_dir, "train", **kw)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)], strict=True):
        np.testing.assert_array_equal(a["key"], b["key"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_record_corrupted_after_build_is_skipped(built, tmp_path, caplog):
    root, data_dir, _ = built
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)
    (shard,) = aesthetic4k.dataset_dir(tmp_path, "train").glob("*.array_record-*")
    reader = array_record_module.ArrayRecordReader(str(shard))
    records = reader.read_all()
    reader.close()
    png = (root / "train" / IMAGES[2][0]).read_bytes()
    assert records[2].count(png[:16]) == 1
    records[2] = records[2].replace(png[:16], b"X" * 16)  # same length: the record still parses, the PNG does not
    writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    loader = input_pipeline.make_loader(
        tmp_path, "train", resolution=S, global_batch_size=1, shuffle=False, num_epochs=1, process_count=1
    )
    with caplog.at_level(logging.WARNING):
        keys = [int(b["key"][0]) for b in loader]
    assert keys == [k for k in range(len(IMAGES)) if k != 2]
    assert loader.skipped == [2]
    assert "skipping record 2" in caplog.text


def test_worker_processes_resume(built):
    _, data_dir, _ = built
    kw = {"resolution": S, "global_batch_size": 2, "seed": 5, "process_index": 0, "process_count": 1, "worker_count": 2}
    loader = input_pipeline.make_loader(data_dir, "train", **kw)
    first = [next(loader) for _ in range(4)]  # one epoch: each worker batches its own half of the records
    assert sorted(int(k) for b in first for k in b["key"]) == list(range(len(IMAGES)))
    state = json.loads(json.dumps(loader.get_state()))
    expected = [next(loader) for _ in range(3)]
    resumed = input_pipeline.make_loader(data_dir, "train", **kw)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(a["key"], b["key"])
        np.testing.assert_array_equal(a["image"], b["image"])


def _folder(root: Path, names: list[str], seed: int = 0) -> Path:
    """<root>/train with one small PNG per name and a metadata line each."""
    split = root / "train"
    split.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(split / name)
    (split / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    return root


def test_file_name_outside_the_split_is_skipped_and_named(tmp_path):
    root = _folder(tmp_path / "src", ["ok.png"])
    secret = tmp_path / "secret.png"  # a decodable image outside the split: it must not enter the dataset
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    (root / "train" / "link.png").symlink_to(secret)
    with open(root / "train" / "metadata.jsonl", "a") as f:
        for name in ("../secret.png", str(secret), "link.png"):
            f.write(json.dumps({"file_name": name, "text": "escape"}) + "\n")
    stats = aesthetic4k.build(root, "train", tmp_path / "tfds", num_threads=1)
    assert stats.written == 1
    reasons = dict(stats.skipped)
    assert set(reasons) == {"../secret.png", str(secret), "link.png"}
    assert "'..'" in reasons["../secret.png"] and "absolute" in reasons[str(secret)]
    assert "outside" in reasons["link.png"]


def test_outside_allows_paths_inside_the_split(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "inner").symlink_to(tmp_path / "a")  # a symlink that stays inside
    assert aesthetic4k.outside(tmp_path, "a/x.png") is None
    assert aesthetic4k.outside(tmp_path, "a/inner/x.png") is None
    assert aesthetic4k.outside(tmp_path / "a", "../a/x.png") is not None


def _records(data_dir):
    src = input_pipeline.data_source(data_dir, "train")
    return [src[i]["file_name"].decode() for i in range(len(src))]


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path):
    data_dir = tmp_path / "tfds"
    aesthetic4k.build(_folder(tmp_path / "old", ["a.png", "b.png"]), "train", data_dir, num_threads=1)
    broken = _folder(tmp_path / "broken", ["c.png"])
    (broken / "train" / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no decodable image"):  # the new build fails...
        aesthetic4k.build(broken, "train", data_dir, overwrite=True, num_threads=1)
    assert _records(data_dir) == ["a.png", "b.png"]  # ...and the old dataset is whole
    assert not aesthetic4k.partial_dir(data_dir, "train").exists()
    stats = aesthetic4k.build(_folder(tmp_path / "new", ["c.png"]), "train", data_dir, overwrite=True, num_threads=1)
    assert stats.written == 1 and _records(data_dir) == ["c.png"]


def test_a_swap_killed_between_its_renames_is_finished_by_the_rerun(tmp_path):
    data_dir = tmp_path / "tfds"
    src = _folder(tmp_path / "src", ["a.png"])
    aesthetic4k.build(src, "train", data_dir, num_threads=1)
    partial = aesthetic4k.partial_dir(data_dir, "train")
    partial.mkdir()
    aesthetic4k.dataset_dir(data_dir, "train").rename(partial / "previous")  # the state after the first rename
    assert aesthetic4k.build(src, "train", data_dir).written == 1  # reused, not rebuilt
    assert _records(data_dir) == ["a.png"] and not partial.exists()
