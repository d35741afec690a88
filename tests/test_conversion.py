"""Strict conversion, sharded and bf16 safetensors, orbax and diffusers round trips."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import traverse_util
from helpers import edited_copy, save_component
from safetensors.torch import save_file as torch_save_file
from torch_vae import make_vae

from conversion import ConversionError, load_component
from conversion.convert import convert
from conversion.safetensors_io import TensorSource, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_component(make_vae(seed=5), tmp_path_factory.mktemp("vae"))


def _flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_missing_key_is_named(folder, tmp_path):
    bad = edited_copy(folder, tmp_path, lambda s: s.pop("decoder.conv_out.bias"))
    with pytest.raises(ConversionError, match=r"missing from the checkpoint \(1\):\n\s+decoder.conv_out.bias"):
        load_component(bad)


def test_unexpected_key_is_named(folder, tmp_path):
    bad = edited_copy(folder, tmp_path, lambda s: s.update({"decoder.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ConversionError, match=r"unexpected in the checkpoint \(1\):\n\s+decoder.extra.weight"):
        load_component(bad)


def test_wrong_shape_is_named(folder, tmp_path):
    bad = edited_copy(folder, tmp_path, lambda s: s.update({"encoder.conv_in.bias": np.zeros(7, np.float32)}))
    with pytest.raises(ConversionError, match=r"encoder.conv_in.bias: \(7,\) -> \(32,\)"):
        load_component(bad)


def test_all_problems_reported_together(folder, tmp_path):
    def edit(s):
        s.pop("encoder.conv_in.weight")
        s["junk"] = np.zeros(1, np.float32)

    with pytest.raises(ConversionError) as err:
        load_component(edited_copy(folder, tmp_path, edit))
    assert err.value.missing == ["encoder.conv_in.weight"] and err.value.unexpected == ["junk"]


def test_sharded_safetensors_with_index(folder, tmp_path):
    state = dict(TensorSource([folder / WEIGHTS]))
    names = sorted(state)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, out / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (out / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, want = load_component(folder)
    _, got = load_component(out)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_reads_bf16_without_torch_conversion(tmp_path):
    t = torch.randn(5, 3).to(torch.bfloat16)
    torch_save_file({"w": t, "i": torch.arange(4)}, tmp_path / "x.safetensors")
    src = TensorSource([tmp_path / "x.safetensors"])
    assert src["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(src["w"].astype(np.float32), t.float().numpy())
    np.testing.assert_array_equal(src["i"], np.arange(4))
    save_file(dict(src), tmp_path / "y.safetensors")  # our writer is readable by the safetensors library
    from safetensors.torch import load_file

    back = load_file(tmp_path / "y.safetensors")
    assert torch.equal(back["w"], t) and torch.equal(back["i"], torch.arange(4))


def test_orbax_and_diffusers_round_trips_are_exact(folder, tmp_path):
    flax_dir, back_dir = tmp_path / "flax", tmp_path / "diffusers"
    convert(folder, flax_dir)
    assert (flax_dir / "params").is_dir() and (flax_dir / "config.json").is_file()
    _, want = load_component(folder)
    _, got = load_component(flax_dir)
    jax.tree.map(np.testing.assert_array_equal, got, want)

    convert(flax_dir, back_dir, to="diffusers")
    original, exported = TensorSource([folder / WEIGHTS]), TensorSource([back_dir / WEIGHTS])
    assert set(original) == set(exported)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    AutoencoderKL.from_pretrained(back_dir)  # diffusers itself accepts the export


def test_bf16_export_round_trip(folder, tmp_path):
    convert(folder, tmp_path / "bf16", to="diffusers", dtype="bfloat16")
    convert(tmp_path / "bf16", tmp_path / "again", to="diffusers", dtype="bfloat16")
    a, b = TensorSource([tmp_path / "bf16" / WEIGHTS]), TensorSource([tmp_path / "again" / WEIGHTS])
    assert a["decoder.conv_out.weight"].dtype == ml_dtypes.bfloat16
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_stride_override_travels_into_converted_config(folder, tmp_path):
    convert(folder, tmp_path / "f16", overrides={"stride": 2})
    module, _ = load_component(tmp_path / "f16")
    assert module.config.stride == 2
    convert(tmp_path / "f16", tmp_path / "out", to="diffusers")
    assert "stride" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_pipeline_folder_with_unsupported_component(folder, tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    shutil.copytree(folder, pipe / "vae")
    (pipe / "transformer").mkdir()
    (pipe / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "vocab.json").write_text("{}")
    index = {
        "_class_name": "FluxPipeline",
        "vae": ["diffusers", "AutoencoderKL"],
        "transformer": ["diffusers", "UNet2DConditionModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (pipe / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"\['transformer'\].*cannot convert yet"):
        convert(pipe, tmp_path / "out")
    convert(pipe, tmp_path / "out2", skip_unsupported=True)
    assert (tmp_path / "out2" / "vae" / "params").is_dir()
    assert (tmp_path / "out2" / "tokenizer" / "vocab.json").is_file()
    assert (tmp_path / "out2" / "transformer" / "config.json").is_file()


def test_bad_paths_give_clear_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_component(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="'UNet2DConditionModel' is not supported"):
        load_component(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_component(empty)
    with pytest.raises(FileExistsError):
        convert(folder, folder)


def test_pickled_weights_load_with_weights_only(folder, tmp_path):
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    state = {k: torch.from_numpy(np.array(v)) for k, v in TensorSource([folder / WEIGHTS]).items()}
    torch.save(state, out / "diffusion_pytorch_model.bin")
    _, want = load_component(folder)
    _, got = load_component(out)
    jax.tree.map(np.testing.assert_array_equal, got, want)
