"""load_component(..., sharding=...): each parameter read onto its shards (8 fake CPU devices), equal to the
unsharded load; only slices are read where the key map permits; orbax params restore on other device counts."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from conversion import export_component
from d4k_jax import checkpoint, sharding
from d4k_jax.io import ConversionError, load_component, safetensors_io
from d4k_jax.io.components import kind_for
from d4k_jax.io.safetensors_io import TensorSource, save_file
from d4k_jax.models import flux_keys
from d4k_jax.models.keymap import abstract_params, param_shapes, to_torch

CONFIG = {  # a tiny FLUX.1: width 32 (FSDP-divisible by 8), 2 double + 3 single blocks, guidance embedding
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 12,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
FSDP = sharding.DEFAULT_RULES  # "embed" over the mesh's fsdp axis


def _flat(params):
    return traverse_util.flatten_dict(params)


def _kind_and_config():
    kind = kind_for(CONFIG)
    return kind, kind.config_from(CONFIG)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers-layout component folder (every tensor random), written by our export."""
    kind, cfg = _kind_and_config()
    shapes = param_shapes(kind.build(cfg), kind.init_inputs(cfg))
    rng = np.random.default_rng(0)
    params = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
    return export_component(CONFIG, traverse_util.unflatten_dict(params), tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def unsharded(folder):
    return _flat(load_component(folder)[1])


def _expected_shardings(mesh):
    kind, cfg = _kind_and_config()
    abstract = abstract_params(kind.build(cfg), kind.init_inputs(cfg))
    return _flat(sharding.params_sharding(mesh, FSDP, {"params": abstract})["params"])


def _assert_placed(got, want, shardings, devices):
    """Every leaf equals the unsharded one, has its sharding, and each device holds only its own slice."""
    assert got.keys() == want.keys()
    split = 0
    for path, leaf in got.items():
        name, expected = "/".join(path), shardings[path]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]).astype(leaf.dtype), err_msg=name)
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), name
        assert {s.device for s in leaf.addressable_shards} == set(devices), name
        for shard in leaf.addressable_shards:
            assert shard.data.shape == expected.shard_shape(leaf.shape), name
            np.testing.assert_array_equal(shard.data, np.asarray(leaf)[shard.index], err_msg=name)
        split += expected.shard_shape(leaf.shape) != leaf.shape
    assert split > len(got) // 2, f"only {split} of {len(got)} parameters are split"


class _Reads:
    """Counts what TensorSource reads: slices (`get_slice`) with their shapes, and tensors read whole."""

    def __init__(self, monkeypatch):
        self.slices, self.whole = [], []
        real = safetensors_io.safe_open
        reads = self

        class Handle:
            def __init__(self, path, framework):
                self.inner = real(path, framework=framework)

            def get_tensor(self, name):
                reads.whole.append(name)
                return self.inner.get_tensor(name)

            def get_slice(self, name):
                inner = self.inner.get_slice(name)

                class Slice:
                    def __getitem__(self, index):
                        out = inner[index]
                        reads.slices.append((name, out.shape))
                        return out

                return Slice()

        monkeypatch.setattr(safetensors_io, "safe_open", Handle)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_fsdp_load_equals_unsharded_load(folder, param_dtype):
    mesh = sharding.make_mesh({"fsdp": 8})
    want = _flat(load_component(folder, param_dtype=param_dtype)[1])
    _, params = load_component(folder, param_dtype=param_dtype, sharding=(mesh, FSDP))
    got = _flat(params)
    assert all(leaf.dtype == param_dtype for leaf in got.values())
    _assert_placed(got, want, _expected_shardings(mesh), jax.devices())


def test_permutation_rules_read_only_each_devices_slice(folder, monkeypatch):
    reads = _Reads(monkeypatch)
    load_component(folder, sharding=(sharding.make_mesh({"fsdp": 8}), FSDP))
    assert reads.whole == []  # a diffusers layout is all copy / linear / conv (stacked): every read is a slice
    shapes = {k: TensorSource([folder / WEIGHTS]).shape(k) for k in TensorSource([folder / WEIGHTS])}
    assert {name for name, _ in reads.slices} == set(shapes)
    q = "transformer_blocks.1.attn.to_q.weight"  # (out 32, in 32); the Flax kernel's "embed" (in) axis is split
    assert [shape for name, shape in reads.slices if name == q] == [(32, 4)] * 8


def test_a_sharding_pytree_or_one_sharding_is_accepted(folder, unsharded):
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    tree = sharding.params_sharding(mesh, FSDP, {"params": abstract_params(*_module_and_inputs())})["params"]
    _assert_placed(_flat(load_component(folder, sharding=tree)[1]), unsharded, _flat(tree), jax.devices())
    one = NamedSharding(mesh, PartitionSpec())
    got = _flat(load_component(folder, sharding=one)[1])
    for path, leaf in got.items():
        assert leaf.sharding == one and leaf.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(unsharded[path]))
    with pytest.raises(ValueError, match=r"no sharding for \['context_embedder/bias'"):
        load_component(folder, sharding={k: v for k, v in tree.items() if k != "context_embedder"})
    rows = NamedSharding(sharding.make_mesh({"fsdp": 8}), PartitionSpec("fsdp"))  # layers (2, 3), widths 12, 24
    with pytest.raises(
        ValueError, match=r"do not divide evenly(?s:.*)time_text_embed/text_embedder/linear_1/kernel \(12, 32\)"
    ):
        load_component(folder, sharding=rows)


def _module_and_inputs():
    kind, cfg = _kind_and_config()
    return kind.build(cfg), kind.init_inputs(cfg)


def test_checks_run_before_any_tensor_is_read(folder, tmp_path, monkeypatch):
    state = dict(TensorSource([folder / WEIGHTS]))
    state["proj_out.bias"] = np.zeros(7, np.float32)
    state["transformer_blocks.1.attn.to_q.weight"] = np.zeros((32, 31), np.float32)  # one layer of a stack
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    save_file(state, bad / WEIGHTS)
    reads = _Reads(monkeypatch)
    for placement in (None, (sharding.make_mesh({"fsdp": 8}), FSDP)):
        with pytest.raises(ConversionError, match=r"proj_out.bias: \(7,\) -> \(16,\)") as err:
            load_component(bad, sharding=placement)
        layer = "transformer_blocks.1.attn.to_q.weight: (31, 32) -> (32, 32) (transformer_blocks/attn/to_q/kernel)"
        assert f"{layer} (layer 1)" in err.value.misshaped
    assert reads.whole == [] and reads.slices == []


def test_orbax_params_saved_from_8_devices_restore_on_1_and_4(folder, unsharded, tmp_path):
    mesh8 = sharding.make_mesh({"fsdp": 8})
    _, params = load_component(folder, sharding=(mesh8, FSDP))
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "config.json").write_text(json.dumps(CONFIG))
    checkpoint.save_params(converted / "params", params)
    for path, leaf in _flat(load_component(converted)[1]).items():  # no sharding: on one device, as ever
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(unsharded[path]))
        assert leaf.devices() == {jax.local_devices()[0]}
    for n in (1, 4):
        devices = jax.devices()[:n]
        mesh = sharding.make_mesh({"fsdp": n}, devices=devices)
        got = _flat(load_component(converted, sharding=(mesh, FSDP))[1])
        shardings = _expected_shardings(mesh)
        if n == 1:  # nothing is split on one device: check values, shardings and placement only
            for path, leaf in got.items():
                np.testing.assert_array_equal(np.asarray(leaf), np.asarray(unsharded[path]))
                assert leaf.sharding.is_equivalent_to(shardings[path], leaf.ndim)
                assert leaf.devices() == set(devices)
        else:
            _assert_placed(got, unsharded, shardings, devices)


def test_bfl_single_file_with_fused_qkv_loads_sharded(folder, unsharded, tmp_path, monkeypatch):
    """BFL's fused qkv (split_linear) and swapped final modulation are no axis permutations: converted whole
    on the host, then sliced; its other tensors are still read by the slice."""
    _, cfg = _kind_and_config()
    flat = {p: np.asarray(a) for p, a in unsharded.items()}
    bfl = to_torch(flat, flux_keys.bfl_rules(cfg, {p: a.shape for p, a in flat.items()}))
    file = tmp_path / "flux1-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, file)
    reads = _Reads(monkeypatch)
    mesh = sharding.make_mesh({"fsdp": 8})
    _, params = load_component(file, axes_dims_rope=[4, 6, 6], sharding=(mesh, FSDP))
    _assert_placed(_flat(params), unsharded, _expected_shardings(mesh), jax.devices())
    prefix = "model.diffusion_model."
    assert f"{prefix}single_blocks.2.linear1.weight" in reads.whole  # split into q, k, v, mlp: read whole
    assert f"{prefix}final_layer.adaLN_modulation.1.weight" in reads.whole  # swap_halves
    assert f"{prefix}double_blocks.1.img_attn.proj.weight" in {n for n, _ in reads.slices}  # a plain linear
