"""Strict conversion, sharded and bf16 safetensors, orbax and diffusers round trips."""

import json
import re
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

from conversion import ConversionError, SafetensorsError, load_component
from conversion.convert import convert, parse_overrides, partial_path
from d4k_jax import checkpoint, io
from d4k_jax.io.safetensors_io import TensorSource, save_file

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


def test_every_dtype_round_trips_whole_and_by_the_slice(tmp_path):
    """save_file -> TensorSource for each safetensors dtype we name (fp8 is read from a memory map: the library's
    numpy framework cannot), 0-d and empty tensors included (np.ascontiguousarray would write a scalar as [1])."""
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(3, 4)).astype(d) for i, d in enumerate(io.safetensors_io.DTYPES.values())}
    tensors |= {"scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), ml_dtypes.bfloat16)}
    tensors |= {"transposed": rng.normal(size=(4, 3)).astype(np.float32).T}
    save_file(tensors, tmp_path / "all.safetensors")
    source = TensorSource([tmp_path / "all.safetensors"])
    for name, want in tensors.items():
        got = source[name]
        assert got.dtype == want.dtype and got.shape == want.shape == source.shape(name), name
        np.testing.assert_array_equal(got, want, err_msg=name)
        if want.ndim:
            index = (slice(1, None),) + (slice(None),) * (want.ndim - 1)
            np.testing.assert_array_equal(source.read(name, index), want[index], err_msg=name)


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
    with pytest.raises(FileNotFoundError, match=r"torch-pickled.*python -m conversion\.convert"):
        io.load_component(out)  # the library never unpickles: it names the conversion step


def _raw_safetensors(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or raw bytes) and data part."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def test_truncated_safetensors_names_file_and_tensors(folder, tmp_path):
    bad = tmp_path / "cut"
    shutil.copytree(folder, bad)
    weights = bad / WEIGHTS
    header = TensorSource([weights])._where
    last = max(header, key=lambda k: header[k][1]["data_offsets"][1])
    weights.write_bytes(weights.read_bytes()[:-100])  # as a download cut short
    with pytest.raises(SafetensorsError, match="truncated") as err:
        load_component(bad)
    assert str(weights) in str(err.value) and repr(last) in str(err.value)


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        (b"\x00{not json", b"", "header is not JSON"),
        (b"[1, 2]", b"", "header is a JSON list"),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            bytes(8),
            "'w': data_offsets [0, 4] hold 4 bytes",
        ),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "'w': data_offsets [8, 0] (expected"),
        (
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            bytes(8),
            "'w': data_offsets [0, 16] end past",
        ),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "'w': unsupported dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "'w': shape [-1]"),
        ({"w": [0, 4]}, bytes(4), "'w': entry [0, 4]"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(16),
            "'b': data_offsets [4, 12] overlap tensor 'a'",
        ),
    ],
)
def test_corrupt_safetensors_header_is_named(tmp_path, header, data, needle):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=re.escape(needle)) as err:
        TensorSource([path])
    assert str(path) in str(err.value)


def test_every_problem_of_a_header_is_listed(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
        "b": {"dtype": "X", "shape": [1], "data_offsets": [4, 8]},
    }
    with pytest.raises(SafetensorsError, match=r"(?s)'a': data_offsets.*'b': unsupported dtype"):
        TensorSource([_raw_safetensors(tmp_path / "two.safetensors", header, bytes(8))])


def test_misshaped_orbax_params_is_a_conversion_error(folder, tmp_path):
    convert(folder, tmp_path / "flax")
    cfg_file = tmp_path / "flax" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "latent_channels": cfg["latent_channels"] + 2}))  # params/ no longer fit
    with pytest.raises(ConversionError, match=r"wrong shape") as err:
        load_component(tmp_path / "flax")
    c, width = cfg["latent_channels"], cfg["block_out_channels"][-1]
    assert f"encoder/conv_out/kernel: (3, 3, {width}, {2 * c}) -> (3, 3, {width}, {2 * c + 4})" in err.value.misshaped
    assert str(tmp_path / "flax" / "params") in str(err.value)


def test_unknown_override_is_an_error_listing_valid_keys(folder):
    with pytest.raises(ValueError, match=r"override keys \['strde'\] are not read by AutoencoderKL.*'stride'"):
        load_component(folder, strde=2)


def test_pipeline_overrides_address_components(folder, tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    shutil.copytree(folder, pipe / "vae")
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "vocab.json").write_text("{}")
    index = {"vae": ["diffusers", "AutoencoderKL"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:  # every bad override in one error, before anything is written
        convert(pipe, tmp_path / "bad", overrides={"strde": 2, "vae.shift": 0.1, "tokenizer.x": 1})
    for needle in ("['shift', 'strde'] are not read by AutoencoderKL", "'stride'", "['tokenizer.x']", "['vae']"):
        assert needle in str(err.value)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    convert(pipe, tmp_path / "f16", overrides={"stride": 2, "vae.shifted_tail": True})  # bare keys reach the VAE
    assert json.loads((tmp_path / "f16" / "vae" / "config.json").read_text())["stride"] == 2
    assert json.loads((tmp_path / "f16" / "vae" / "config.json").read_text())["shifted_tail"] is True
    with pytest.raises(ValueError, match=r"\['vae.stride'\]: COMPONENT.KEY overrides need a pipeline folder"):
        convert(folder, tmp_path / "one", overrides={"vae.stride": 2})


def test_override_flag_values_are_parsed_with_named_errors():
    assert parse_overrides(["stride=2", "vae.scaling_factor=0.5", "axes=[1, 2]"]) == {
        "stride": 2,
        "vae.scaling_factor": 0.5,
        "axes": [1, 2],
    }
    with pytest.raises(ValueError, match=r"'stride' \(expected KEY=VALUE\).*the value 'two' is not JSON"):
        parse_overrides(["stride", "stride=two"])


def test_failed_convert_leaves_nothing_that_blocks_a_rerun(folder, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    partial_path(dst).mkdir()
    (partial_path(dst) / "junk").write_text("left by a killed run")

    def crash(*args):
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(checkpoint, "save_params", crash)
    with pytest.raises(RuntimeError, match="killed while saving"):
        convert(folder, dst)
    assert not dst.exists() and not partial_path(dst).exists()
    monkeypatch.undo()
    partial_path(dst).mkdir()  # a stale partial folder (a SIGKILL) is removed by the rerun
    convert(folder, dst)
    assert (dst / "params").is_dir() and not partial_path(dst).exists()
    with pytest.raises(FileExistsError, match=re.escape(f"--dst {dst} exists")):
        convert(folder, dst)
