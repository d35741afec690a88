"""The sample CLI: sharded over 8 fake devices equals one device, resume, metadata (one file per process,
merged), bad input, global inputs and which device writes each image. Several real processes:
test_sample_multiprocess.py."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers import sequence_degrees
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from tiny_pipelines import flux_pipeline, sd3_pipeline

from configs import flux_wlf, sd3_wlf
from d4k_jax import sample, sharding
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.pipelines import base

PROMPTS = ["a red cat on the sky", "a blue dog", "a green square on a red background"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_pipes")
    flux_pipeline(root)
    sd3_pipeline(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def loaded_once():
    """One pipeline object per folder and parameter layout (the transformer is loaded onto the run's mesh) for
    the module: its compiled programs serve every rerun."""
    load, cache = sample.load_pipeline, {}

    def cached(c, mesh=None):
        devices = None if mesh is None else (str(mesh), tuple(d.id for d in mesh.devices.flat))
        key = (c.pipeline, devices, c.shard_params, c.get("lora"), c.get("fp8"))
        if key not in cache:
            cache[key] = load(c, mesh)
        return cache[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sample, "load_pipeline", cached)
        yield


def _config(model, root, mesh=None, num_devices=0, **sample_settings):
    c = (flux_wlf if model == "flux" else sd3_wlf).get_config("tiny")
    c.num_devices = num_devices
    c.pipeline, c.vae_stride = str(root / model), 1
    c.sample.update(height=16, width=16, steps=2, images_per_prompt=2, format="png", max_sequence_length=12)
    c.sample.update(sample_settings)
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


# 8 heads, so that the tiny transformers' attention splits 8 ways; 32x16 images: 8 x 4 tokens (tiny VAE: F2)
EIGHT_HEADS = {"flux": dict(num_attention_heads=8, attention_head_dim=8, axes_dims_rope=(2, 2, 4))}
EIGHT_HEADS["sd3"] = dict(num_attention_heads=8, attention_head_dim=4)


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_one_image_over_eight_devices_equals_one_device(tmp_path, model, monkeypatch):
    """mesh.sequence=8: each image's tokens, denoising loop and VAE decode split 8 ways (nn.ulysses)."""
    degrees = sequence_degrees(monkeypatch)
    (flux_pipeline if model == "flux" else sd3_pipeline)(tmp_path, model, **EIGHT_HEADS[model])
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    images = {}
    for name, mesh, devices in (("split", {"sequence": 8}, 0), ("one", None, 1)):
        c = _config(model, tmp_path, mesh, devices, height=32, width=16, images_per_prompt=1)
        assert sample.run(c, tmp_path / "prompts.txt", tmp_path / name) == 1
        images[name] = _images(tmp_path / name)["00000_00.png"].astype(int)
    assert np.abs(images["split"] - images["one"]).max() <= 1
    assert max(degrees) == 8  # the attention really ran split 8 ways
    c = _config(model, tmp_path, {"sequence": 3, "data": 2}, 6, height=32, width=16)
    with pytest.raises(ValueError, match=r"sequence degree 3 must divide the 8 attention heads.*among \[1, 2, 4, 8\]"):
        sample.validate(c, tmp_path / "prompts.txt")


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


def _no_weights(*_):
    raise AssertionError("the weights were loaded before the settings were checked")


def test_every_problem_is_reported_before_the_weights_load(pipes, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_pipeline", _no_weights)
    c = _config("flux", pipes)
    c.sample.update(height=18, format="gif", batch_size=3)
    with pytest.raises(ValueError) as e:
        sample.run(c, tmp_path / "missing.txt", tmp_path / "out")
    for needle in ("height=18 is not a positive multiple of 4", "format='gif'", "missing.txt does not exist",
                   "batch_size=3 is not a multiple of the mesh's data x fsdp = 8"):  # fmt: skip
        assert needle in str(e.value)
    c = _config("sd3", pipes)  # pos_embed_max_size 12 x patch 2 x VAE factor 2: at most 48 pixels
    c.sample.width = 52
    with pytest.raises(ValueError, match="width=52 exceeds the transformer's position table: at most 48 pixels"):
        sample.run(c, pipes / "prompts.txt", tmp_path / "out")
    c.model = "flux"
    with pytest.raises(ValueError, match=r"expects a FluxTransformer2DModel but .* holds a SD3Transformer2DModel"):
        sample.run(c, pipes / "prompts.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sampled(pipes, tmp_path_factory):
    """A finished run, 3 prompts x 1 image (tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("sampled") / "out"
    c = _config("flux", pipes, num_devices=1, images_per_prompt=1, batch_size=1)  # devices do not change images
    assert sample.run(c, pipes / "prompts.txt", out) == 3
    return out


def test_a_rerun_with_other_settings_is_refused(pipes, sampled, tmp_path, monkeypatch):
    c = _config("flux", pipes, num_devices=1, images_per_prompt=1, batch_size=1)
    shutil.copytree(sampled, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "settings.json").read_text()) == sample.settings(c)
    monkeypatch.setattr(sample, "load_pipeline", _no_weights)
    other = _config("flux", pipes, images_per_prompt=1, steps=3, guidance=c.sample.guidance + 1)
    other.seed = 5
    with pytest.raises(FileExistsError) as e:
        sample.run(other, pipes / "prompts.txt", tmp_path / "out")
    guidance = f"guidance {c.sample.guidance} -> {c.sample.guidance + 1}"
    for needle in (str(tmp_path / "out"), "steps 2 -> 3", guidance, "seed 0 -> 5"):
        assert needle in str(e.value)
    c.fp8 = True  # FP8 matmuls change the images
    with pytest.raises(FileExistsError, match="fp8 None -> True"):
        sample.run(c, pipes / "prompts.txt", tmp_path / "out")
    c.fp8, c.pipeline, c.model = False, str(pipes / "sd3"), "sd3"
    with pytest.raises(FileExistsError, match="model 'flux' -> 'sd3'"):
        sample.run(c, pipes / "prompts.txt", tmp_path / "out")
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join([PROMPTS[0], "another prompt", PROMPTS[2]]) + "\n")
    with pytest.raises(FileExistsError, match=r"00001_00\.png was made from the prompt 'a blue dog' but prompt 2 is"):
        sample.run(_config("flux", pipes, images_per_prompt=1), changed, tmp_path / "out")


def test_an_image_without_its_metadata_line_is_made_again(pipes, sampled, tmp_path):
    """A crash between saving an image and appending its line (or in the middle of the line)."""
    c = _config("flux", pipes, num_devices=1, images_per_prompt=1, batch_size=1)
    out = tmp_path / "out"
    shutil.copytree(sampled, out)
    before, lines = _images(out), (out / "metadata.jsonl").read_text().splitlines()
    (out / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # image 3's line cut short
    (out / "00002_00.png.tmp").write_bytes(b"half an image")
    assert sample.run(c, pipes / "prompts.txt", out) == 1
    assert (out / "metadata.jsonl").read_text().splitlines() == lines
    assert _images(out).keys() == before.keys() and not list(out.glob("*.tmp"))
    assert np.array_equal(_images(out)["00002_00.png"], before["00002_00.png"])


def test_every_process_file_counts_once_and_is_merged_in_order(pipes, sampled, tmp_path):
    """What processes of a killed run (of any count) left: lines in their own files, some twice, one cut short."""
    c = _config("flux", pipes, num_devices=1, images_per_prompt=1, batch_size=1)
    out = tmp_path / "out"
    shutil.copytree(sampled, out)
    lines = (out / "metadata.jsonl").read_text().splitlines()
    (out / "metadata.jsonl").unlink()
    (out / "metadata.process_0.jsonl").write_text(lines[2] + "\n" + lines[0][:30])  # image 1's line cut short
    (out / "metadata.process_5.jsonl").write_text(lines[1] + "\n" + lines[2] + "\n")
    assert sample.written_images(out, PROMPTS, 1, "png", tidy=False) == {"00001_00.png", "00002_00.png"}
    assert sample.run(c, pipes / "prompts.txt", out) == 1
    assert (out / "metadata.jsonl").read_text().splitlines() == lines  # once each, sorted by prompt
    assert not list(out.glob("metadata.process_*"))


def test_global_rows_and_each_image_written_once():
    """Rows replicated over `sequence` (4 devices each) are built from their rows only and written once."""
    mesh = sharding.make_mesh({"data": 2, "sequence": 4})
    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    assert base.rows_held(data, 4) == [0, 1, 2, 3]  # one process holds every row
    asked = []
    images = base.global_rows(data, 4, lambda i: asked.append(i) or np.full((2, 2, 3), i, np.uint8))
    assert asked == [0, 1, 2, 3] and images.sharding == data
    assert [s.index[0] for s in images.addressable_shards].count(slice(0, 2)) == 4  # rows 0-1 on 4 devices
    got = sorted((row, int(image[0, 0, 0])) for row, image in sample._held_images(images, 3))
    assert got == [(0, 0), (1, 1), (2, 2)]  # row 3 is padding


def test_fsdp_sharded_params_give_the_same_images(pipes, tmp_path):
    plain = _config("flux", pipes)
    plain.sample.images_per_prompt = 1
    sample.run(plain, pipes / "prompts.txt", tmp_path / "replicated")
    fsdp = _config("flux", pipes, {"data": 2, "fsdp": 4})
    fsdp.sample.images_per_prompt, fsdp.shard_params = 1, True
    assert sample.run(fsdp, pipes / "prompts.txt", tmp_path / "fsdp") == 3
    a, b = _images(tmp_path / "replicated"), _images(tmp_path / "fsdp")
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name


def _tiny_lora(path, width=32):
    """A diffusers-layout LoRA (rank 2) on the tiny Flux's double blocks' to_q and to_v."""
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(2):
        for m in ("to_q", "to_v"):
            name = f"transformer.transformer_blocks.{i}.attn.{m}"
            tensors[f"{name}.lora_A.weight"] = rng.normal(0, 0.5, (2, width)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.normal(0, 0.5, (32, 2)).astype(np.float32)
    save_file(tensors, path)
    return path


def test_lora_option_is_checked_first_then_merged(pipes, sampled, tmp_path, monkeypatch):
    """--config.lora: files checked against the transformer's config.json before any weight loads; merged images
    differ from the base model's, and the outdir's settings record the files."""
    good, wrong = _tiny_lora(tmp_path / "good.safetensors"), _tiny_lora(tmp_path / "wrong.safetensors", width=31)
    (tmp_path / "one.txt").write_text(PROMPTS[0] + "\n")
    c = _config("flux", pipes, num_devices=1, images_per_prompt=1, batch_size=1)
    with monkeypatch.context() as m:
        m.setattr(sample, "load_pipeline", _no_weights)
        c.lora = f"{wrong}:0.5,{tmp_path / 'missing.safetensors'}"
        with pytest.raises(ValueError) as e:
            sample.run(c, tmp_path / "one.txt", tmp_path / "out")
    assert "missing.safetensors: expected an existing .safetensors file" in str(e.value)
    assert "transformer.transformer_blocks.0.attn.to_q: up [32, 2] @ down [2, 31] -> kernel (31, 32)" in str(e.value)
    c.lora = f"{good}:0.8"
    assert sample.run(c, tmp_path / "one.txt", tmp_path / "out") == 1
    merged, plain = _images(tmp_path / "out")["00000_00.png"], _images(sampled)["00000_00.png"]
    assert np.abs(merged.astype(int) - plain.astype(int)).mean() > 1
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["lora"] == [[str(good.resolve()), 0.8]]
    c.lora = ""
    with pytest.raises(FileExistsError, match=r"lora \[\[.*good\.safetensors', 0\.8\]\] -> None"):
        sample.run(c, tmp_path / "one.txt", tmp_path / "out")  # a LoRA dropped is a change too
