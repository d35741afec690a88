"""LoRA adapters kept separate (the "lora" collection of d4k_jax/lora.py and nn/linear.py): a peft LoRA on tiny
diffusers Flux / SD3 transformers gives the same velocity unmerged, merged == unmerged, scale 0 == the base,
fused_qkv on == off, a one-layer target, peft's initialisation, shardings beside the kernels, refused targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MODEL_TOL, rel_err
from diffusers import FluxPipeline
from flax import traverse_util
from helpers import save_component
from peft.utils import get_peft_model_state_dict
from peft_lora import add_peft_lora, to_adapters
from torch_flux import flux_forward, make_flux
from torch_sd3 import make_sd3, sd3_forward

from d4k_jax import lora, sharding
from d4k_jax.io import load_component, merge_lora
from d4k_jax.io import lora as lora_io
from d4k_jax.io.lora_files import read_lora_file
from d4k_jax.models.keymap import shapes_of
from d4k_jax.pipelines.base import Component, Pipeline

RANK, ALPHA = 4, 8
FLUX_EXTRA = ("proj_mlp", "ff.net.2")  # beyond the default targets: the single blocks' fused proj_mlp, an MLP


def _inputs(text_dim=24):
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return f(2, 8, 8, 4), np.array([0.3, 0.8], np.float32), f(2, 7, text_dim), f(2, 12)


_APPLY = {}


def _velocity(module, variables, args):
    apply = _APPLY.setdefault(id(module), jax.jit(module.apply))
    return np.asarray(apply(variables, *args))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(module, fused module, base params, peft model, inputs, torch velocity with the adapter, diffusers file)."""
    root = tmp_path_factory.mktemp("lora_adapters")
    model = make_flux(seed=2)
    folder = save_component(model, root / "base")
    module, base = load_component(folder)
    fused, _ = load_component(folder, fused_qkv=True)
    add_peft_lora(model, lora.DEFAULT_TARGETS + FLUX_EXTRA, RANK, ALPHA)
    latents, t, text, pooled = _inputs()
    args = (latents, t, text, pooled, np.full((2,), 3.5, np.float32))
    want = flux_forward(model, *args)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    meta = model.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(root / "file", state, transformer_lora_adapter_metadata=meta)
    return module, fused, base, model, args, want, root / "file" / "pytorch_lora_weights.safetensors"


def _trained_layout(module, base, model, targets):
    """The peft adapter as training holds it: resolved targets, adapters (float32) and alpha / r scales."""
    shapes = shapes_of(base)
    found = lora.resolve(module, shapes, targets)
    adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), to_adapters(model, module, shapes, targets))
    return found, adapters, lora.scales(found, ALPHA / RANK)


def _from_file(module, base, path, scale=1.0):
    shapes = shapes_of(base)
    file = read_lora_file(path)
    return lora.from_factors(lora_io.factors([(file, scale, lora_io.plan(file, module, shapes))], shapes))


def test_flux_unmerged_matches_peft_and_merged(flux):
    module, fused, base, model, args, want, path = flux
    base_v = _velocity(module, {"params": base}, args)
    assert float(np.abs(base_v - want).max() / np.abs(want).max()) > 0.05  # the adapter moves the velocity
    targets = lora.DEFAULT_TARGETS + FLUX_EXTRA
    found, adapters, scales = _trained_layout(module, base, model, targets)
    assert {"/".join(t.path) for t in found} >= {"transformer_blocks/attn/to_q", "single_transformer_blocks/proj_mlp"}
    trained = _velocity(module, lora.variables(base, adapters, scales), args)
    assert rel_err(trained, want) < MODEL_TOL
    from_file = _velocity(module, {"params": base, "lora": _from_file(module, base, path)}, args)
    assert rel_err(from_file, want) < MODEL_TOL
    merged = _velocity(module, {"params": merge_lora(module, base, [(path, 1.0)])}, args)
    assert rel_err(from_file, merged) < MODEL_TOL
    fused_v = _velocity(fused, lora.variables(base, adapters, scales), args)  # q/k/v (+ proj_mlp) as one matmul
    assert rel_err(fused_v, trained) < MODEL_TOL
    zero = _velocity(module, {"params": base, "lora": _from_file(module, base, path, scale=0.0)}, args)
    np.testing.assert_array_equal(zero, base_v)


def test_pipeline_keeps_files_separate_and_concatenates_them(flux):
    """Pipeline.load_lora_weights(merge=False): the params untouched, two files at 0.25 and 0.75 == one at 1."""
    module, _, base, _, args, want, path = flux
    pipe = type("P", (), {"transformer": Component(module, base), "adapters": None})()
    for scale in (0.25, 0.75):
        Pipeline.load_lora_weights(pipe, path, scale, merge=False)
    assert pipe.transformer.params is base
    variables = Pipeline.transformer_variables(pipe)
    ranks = {x.shape[-1] for p, x in traverse_util.flatten_dict(variables["lora"]).items() if p[-1] == "down"}
    assert ranks == {2 * RANK}
    assert rel_err(_velocity(module, variables, args), want) < MODEL_TOL


def test_a_one_layer_target_matches_peft(tmp_path):
    model = make_flux(seed=3)
    module, base = load_component(save_component(model, tmp_path / "base"))
    targets = ("transformer_blocks.1.attn.to_q", "single_transformer_blocks.2.attn.to_k")
    add_peft_lora(model, targets, RANK, ALPHA, seed=1)
    latents, t, text, pooled = _inputs()
    args = (latents, t, text, pooled, np.full((2,), 3.5, np.float32))
    found, adapters, scales = _trained_layout(module, base, model, targets)
    assert [(t.path[0], t.layers) for t in found] == [("single_transformer_blocks", (2,)), ("transformer_blocks", (1,))]
    assert rel_err(_velocity(module, lora.variables(base, adapters, scales), args), flux_forward(model, *args)) < 1e-4


def test_sd3_unmerged_matches_peft(tmp_path):
    model = make_sd3(seed=4)
    module, base = load_component(save_component(model, tmp_path / "base"))
    add_peft_lora(model, lora.DEFAULT_TARGETS, RANK, ALPHA, seed=2)
    latents, t, text, pooled = _inputs(text_dim=20)
    args = (latents, t * 1000, text, pooled)
    want = sd3_forward(model, *args)
    assert float(np.abs(_velocity(module, {"params": base}, args) - want).max() / np.abs(want).max()) > 0.05
    _, adapters, scales = _trained_layout(module, base, model, lora.DEFAULT_TARGETS)
    assert rel_err(_velocity(module, lora.variables(base, adapters, scales), args), want) < MODEL_TOL


def test_init_and_shardings_follow_peft_and_the_kernels(flux):
    module, _, base, *_ = flux
    from d4k_jax.io.components import kind_of_module
    from d4k_jax.train_state import abstract_params

    found = lora.resolve(module, shapes_of(base), lora.DEFAULT_TARGETS)
    adapters = lora.init(jax.random.key(0), found, 8)
    flat = traverse_util.flatten_dict(adapters)
    for t in found:
        down, up = flat[(*t.path, "down")], flat[(*t.path, "up")]
        bound = 1 / np.sqrt(t.shape[-2])
        assert (
            down.dtype == jnp.float32 and float(jnp.abs(down).max()) <= bound and float(jnp.abs(down).max()) > bound / 2
        )
        assert not np.any(np.asarray(up)) and up.shape == (*t.shape[:-2], 8, t.shape[-1])
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    params = abstract_params(module, kind_of_module(module).init_inputs(module.config), mesh, sharding.DEFAULT_RULES)
    specs = traverse_util.flatten_dict(jax.tree.map(lambda x: x.sharding.spec, lora.abstract(adapters, params)))
    kernel = params["transformer_blocks"]["attn"]["to_q"]["kernel"].sharding.spec
    q = ("transformer_blocks", "attn", "to_q")
    assert kernel[-1] is not None  # heads over tensor: the up follows it
    assert specs[(*q, "down")] == jax.sharding.PartitionSpec(*kernel[:2], None)
    assert specs[(*q, "up")] == jax.sharding.PartitionSpec(kernel[0], None, kernel[2])


def test_targets_that_do_not_fit_are_listed(flux):
    module, _, base, *_ = flux
    with pytest.raises(ValueError) as e:
        lora.resolve(module, shapes_of(base), ("to_q", "to_zz", "proj_out", "norm_out.linear"))
    msg = str(e.value)
    assert "['to_zz']" in msg and "single_transformer_blocks.2.proj_out (stored here as" in msg
    assert "'proj_out (" not in msg and "norm_out" not in msg  # the final proj_out, norm_out.linear: one kernel each


def test_adapters_under_sequence_tensor_and_fsdp_sharding(tmp_path, monkeypatch):
    """Adapters on their kernels' shardings (sequence 2 x fsdp 2 x tensor 2: the image tokens split over
    `sequence` inside the attention's shard_map, the adapters outside it): the one-device velocity."""
    import flax.linen as nn
    from helpers import sequence_degrees

    from d4k_jax.io.components import kind_of_module
    from d4k_jax.train_state import abstract_params

    degrees = sequence_degrees(monkeypatch)
    heads = dict(num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 2, 4))
    module, base = load_component(save_component(make_flux(seed=7, **heads), tmp_path / "flux4"))
    found = lora.resolve(module, shapes_of(base), lora.DEFAULT_TARGETS + FLUX_EXTRA)
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(0), found, RANK))
    scales = lora.scales(found, 2.0)
    latents, t, text, pooled = _inputs()
    args = (latents, t, text, pooled, np.full((2,), 3.5, np.float32))
    want = _velocity(module, lora.variables(base, adapters, scales), args)
    mesh = sharding.make_mesh({"sequence": 2, "fsdp": 2, "tensor": 2})
    params = abstract_params(module, kind_of_module(module).init_inputs(module.config), mesh, sharding.DEFAULT_RULES)
    placed = jax.device_put(base, jax.tree.map(lambda x: x.sharding, params))
    shardings = jax.tree.map(lambda x: x.sharding, lora.abstract(adapters, params))
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        variables = lora.variables(placed, jax.device_put(adapters, shardings), scales)
        got = np.asarray(jax.jit(module.apply)(variables, *args))
    assert rel_err(got, want) < 1e-5 and max(degrees) == 2
