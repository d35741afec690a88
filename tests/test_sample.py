"""The sample CLI: sharded over 8 fake devices equals one device, resume, metadata, bad input."""

import json

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_pipelines import flux_pipeline, sd3_pipeline

from configs import flux_wlf, sd3_wlf
from d4k_jax import sample

PROMPTS = ["a red cat on the sky", "a blue dog", "a green square on a red background"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_pipes")
    flux_pipeline(root)
    sd3_pipeline(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _config(model, root, **mesh):
    c = (flux_wlf if model == "flux" else sd3_wlf).get_config("tiny")
    c.pipeline, c.vae_stride = str(root / model), 1
    c.sample.update(height=16, width=16, steps=2, images_per_prompt=2, format="png", max_sequence_length=12)
    c.mesh = mesh or {"data": -1}
    return c


def _images(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_sharded_equals_single_device_and_resume(pipes, tmp_path, model):
    assert jax.device_count() == 8
    many = sample.run(_config(model, pipes), pipes / "prompts.txt", tmp_path / "eight")  # 6 images, padded to 8
    one_cfg = _config(model, pipes)
    one_cfg.num_devices, one_cfg.sample.batch_size = 1, 1
    assert sample.run(one_cfg, pipes / "prompts.txt", tmp_path / "one") == 6
    assert many == 6
    a, b = _images(tmp_path / "eight"), _images(tmp_path / "one")
    assert sorted(a) == [f"{p:05d}_{k:02d}.png" for p in range(3) for k in range(2)] == sorted(b)
    for name in a:
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name
    assert not np.array_equal(a["00000_00.png"], a["00000_01.png"])  # two seeds, two images
    lines = [json.loads(x) for x in (tmp_path / "eight" / "metadata.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == [p for p in PROMPTS for _ in range(2)] and lines[0]["model"] == model

    (tmp_path / "eight" / "00002_01.png").unlink()
    assert sample.run(_config(model, pipes), pipes / "prompts.txt", tmp_path / "eight") == 1  # only the missing one
    assert np.array_equal(_images(tmp_path / "eight")["00002_01.png"], a["00002_01.png"])


def test_metadata_jsonl_prompts_and_errors(pipes, tmp_path):
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.jpg", "text": "a cat"}) + "\n")
    assert sample.read_prompts(meta) == ["a cat"]
    (tmp_path / "bad.jsonl").write_text('{"file_name": "a.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object with a 'text' field"):
        sample.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        sample.read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.read_prompts(tmp_path / "missing.txt")
    c = _config("flux", pipes)
    c.sample.height = 18
    with pytest.raises(ValueError, match="multiples of 4"):
        sample.run(c, pipes / "prompts.txt", tmp_path / "out")


def test_fsdp_sharded_params_give_the_same_images(pipes, tmp_path):
    plain = _config("flux", pipes)
    plain.sample.images_per_prompt = 1
    sample.run(plain, pipes / "prompts.txt", tmp_path / "replicated")
    fsdp = _config("flux", pipes, data=2, fsdp=4)
    fsdp.sample.images_per_prompt, fsdp.shard_params = 1, True
    assert sample.run(fsdp, pipes / "prompts.txt", tmp_path / "fsdp") == 3
    a, b = _images(tmp_path / "replicated"), _images(tmp_path / "fsdp")
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name
