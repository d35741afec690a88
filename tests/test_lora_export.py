"""LoRA export (d4k_jax/io/lora_export.py): random adapters in the training layout on a tiny Flux and SD3, written by
`save_lora`, load in diffusers' pipeline `load_lora_weights` to the velocity of our model with the file merged; our
reader reads back the same alpha and tensors, and the merged kernels move by exactly alpha / r * down @ up on the
adapted layers only; a diffusers-saved LoRA re-exported after reading is the same file; every mismatch is listed."""

import json
import warnings

import jax
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from flax import traverse_util
from helpers import save_component
from jax.sharding import NamedSharding, PartitionSpec
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from tiny_pipelines import flux_pipeline
from torch_flux import flux_forward, make_flux
from torch_sd3 import make_sd3, sd3_forward

from d4k_jax import pipelines
from d4k_jax.io import ConversionError, load_component, merge_lora
from d4k_jax.io import lora as lora_io
from d4k_jax.io.lora_export import save_lora
from d4k_jax.io.lora_files import read_lora_file
from d4k_jax.io.safetensors_io import TensorSource

ALPHA = 6.0

# {adapter module path: (rank, scale per layer or None for no `scale` leaf)}: full and layer-partial stacks, an
# unstacked `scale` leaf, another rank (rank_pattern), and Flux's top-level proj_out, a suffix of every single block's
FLUX_ADAPTERS = {
    ("transformer_blocks", "attn", "to_q"): (4, [1.0, 1.0]),
    ("transformer_blocks", "attn", "add_k_proj"): (4, [0.0, 1.0]),
    ("transformer_blocks", "attn", "to_out_0"): (4, None),
    ("transformer_blocks", "ff", "net_2"): (2, None),
    ("single_transformer_blocks", "attn", "to_v"): (4, [1.0, 0.0, 1.0]),
    ("single_transformer_blocks", "proj_mlp"): (4, None),
    ("proj_out",): (4, None),
    ("norm_out", "linear"): (3, 1.0),
}
SD3_ADAPTERS = {
    ("transformer_blocks_0", "attn", "to_k"): (4, [0.0, 1.0]),
    ("transformer_blocks_0", "attn", "add_q_proj"): (4, None),
    ("transformer_blocks_0", "ff_context", "net_2"): (2, None),
    ("transformer_blocks_2", "attn", "to_v"): (4, None),
    ("transformer_blocks_2", "attn", "to_out_0"): (4, 1.0),
    ("proj_out",): (4, None),
}


def _adapters(shapes, spec, seed=0):
    """Random float32 adapters in the training layout (non-zero up), as a nested dict."""
    rng, flat = np.random.default_rng(seed), {}
    for p, (r, scale) in spec.items():
        kernel = shapes[(*p, "kernel")]
        lead, (n_in, out) = kernel[:-2], kernel[-2:]
        flat[(*p, "down")] = rng.normal(scale=0.3, size=(*lead, n_in, r)).astype(np.float32)
        flat[(*p, "up")] = rng.normal(scale=0.3, size=(*lead, r, out)).astype(np.float32)
        if scale is not None:
            flat[(*p, "scale")] = np.asarray(scale, np.float32)
    return traverse_util.unflatten_dict(flat)


def _inputs(text_dim, hw=8, text=7, pooled=12, channels=4):
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return f(2, hw, hw, channels), np.array([0.3, 0.8], np.float32), f(2, text, text_dim), f(2, pooled)


def _shapes(params):
    return {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(params).items()}


_APPLY = {}  # one compiled forward per module


def _velocity(module, params, args):
    apply = _APPLY.setdefault(id(module), jax.jit(module.apply))
    return np.asarray(apply({"params": params}, *args))


def _adapted(model):
    """{torch module name: rank} of every module a loaded adapter wraps."""
    return {n: m.r[a] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) for a in m.r}


def _written(shapes, spec):
    """{(adapter module path, layer or None)} that save_lora writes: the layers whose scale is not 0."""
    out = set()
    for p, (_, scale) in spec.items():
        kernel = shapes[(*p, "kernel")]
        if len(kernel) == 2:
            out |= {(p, None)} if scale is None or scale != 0 else set()
        else:
            out |= {(p, i) for i in range(kernel[0]) if scale is None or scale[i] != 0}
    return out


def _check_read_back(path, module, base, shapes, adapters, spec):
    """Our reader: every written layer once, alpha / r, the tensors; merging moves each adapted kernel (layer) by
    alpha / r * down @ up and leaves the layers with scale 0 alone."""
    lora = read_lora_file(path)
    updates = lora_io.plan(lora, module, shapes)
    flat = traverse_util.flatten_dict(adapters)
    read = [(u.path[:-1], u.layer) for u in updates]
    assert len(read) == len(set(read)) and set(read) == _written(shapes, spec)
    for u in updates:
        p, r = u.path[:-1], spec[u.path[:-1]][0]
        down, up = flat[(*p, "down")], flat[(*p, "up")]
        down, up = (down, up) if u.layer is None else (down[u.layer], up[u.layer])
        assert lora.scale(u.module) == ALPHA / r
        np.testing.assert_array_equal(lora.source[u.module.down], down.T)
        np.testing.assert_array_equal(lora.source[u.module.up], up.T)
    before = traverse_util.flatten_dict(base)
    merged = traverse_util.flatten_dict(merge_lora(module, base, [(path, 1.0)]))
    for p, (r, scale) in spec.items():
        k = (*p, "kernel")
        delta = np.einsum("...ir,...ro->...io", flat[(*p, "down")], flat[(*p, "up")]) * (ALPHA / r)
        if scale is not None:
            delta = delta * (np.asarray(scale) != 0)[..., None, None]
        got = np.asarray(merged[k]) - np.asarray(before[k])
        np.testing.assert_allclose(got, delta, rtol=1e-5, atol=1e-6, err_msg="/".join(k))


def _metadata(path):
    with safe_open(path, framework="numpy") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_exported_lora_loads_in_diffusers_like_ours(kind, tmp_path):
    if kind == "flux":
        model, spec, pipeline = make_flux(seed=3), FLUX_ADAPTERS, FluxPipeline
        latents, t, text, pooled = _inputs(text_dim=24)
        args = (latents, t, text, pooled, np.full((2,), 3.5, np.float32))
        forward = lambda: flux_forward(model, *args)
        extra = {"tokenizer_2": None, "text_encoder_2": None}
    else:
        model, spec, pipeline = make_sd3(seed=3), SD3_ADAPTERS, StableDiffusion3Pipeline
        latents, t, text, pooled = _inputs(text_dim=20)
        args = (latents, t * 1000, text, pooled)
        forward = lambda: sd3_forward(model, *args)
        extra = {f"{c}_{i}": None for c in ("tokenizer", "text_encoder") for i in (2, 3)}
    module, base = load_component(save_component(model, tmp_path / "base"))
    shapes = _shapes(base)
    adapters = _adapters(shapes, spec)
    path = save_lora(tmp_path / "lora" / "ours.safetensors", module, shapes, adapters, alpha=ALPHA)
    base_velocity = _velocity(module, base, args)
    pipe = pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model, **extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert not [w for w in caught if "inconsistency" in str(w.message)]  # peft: config and tensors agree
    config = _metadata(path)
    keys = TensorSource([path])
    ranks = {k[len("transformer.") : -len(".lora_A.weight")]: keys.shape(k)[0] for k in keys if ".lora_A." in k}
    assert len(ranks) == len(_written(shapes, spec))
    assert _adapted(model) == ranks  # peft wrapped exactly the written modules, each at its rank
    assert config["transformer.lora_alpha"] == ALPHA and config["transformer.r"] == 4
    want = forward()
    got = _velocity(module, merge_lora(module, base, [(path, 1.0)]), args)
    assert float(np.abs(base_velocity - want).max() / np.abs(want).max()) > 0.05  # the adapter moves the velocity
    err = rel_err(got, want)
    print(f"{kind} exported LoRA: ours merged vs diffusers load_lora_weights, rel {err:.2e}")
    assert err < MODEL_TOL
    _check_read_back(path, module, base, shapes, adapters, spec)


def test_diffusers_saved_lora_reexports_to_the_same_file(tmp_path):
    """A peft adapter saved by diffusers, read by io/lora_files.py into the training layout, written by save_lora:
    the same tensors under the same keys, read with the same alpha."""
    model = make_flux(seed=5)
    module, base = load_component(save_component(model, tmp_path / "base"))
    shapes = _shapes(base)
    targets = ["to_q", "to_k", "add_v_proj", "to_out.0", "proj_mlp", "ff_context.net.2", "norm_out.linear"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=ALPHA, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    meta = model.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(tmp_path / "diffusers", state, transformer_lora_adapter_metadata=meta)
    theirs = read_lora_file(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    flat = {}
    for u in lora_io.plan(theirs, module, shapes):
        a, b = (np.asarray(theirs.source[k], np.float32) for k in (u.module.down, u.module.up))
        p, kernel = u.path[:-1], shapes[u.path]
        if u.layer is None:
            flat[(*p, "down")], flat[(*p, "up")] = a[:, u.cols].T, b[u.rows].T
            continue
        for leaf, shape in (("down", (*kernel[:-1], 4)), ("up", (kernel[0], 4, kernel[-1])), ("scale", kernel[:1])):
            flat.setdefault((*p, leaf), np.zeros(shape, np.float32))
        flat[(*p, "down")][u.layer], flat[(*p, "up")][u.layer] = a[:, u.cols].T, b[u.rows].T
        flat[(*p, "scale")][u.layer] = 1.0
    note = {"trained_with": "d4k_jax"}  # more metadata of the caller's, beside diffusers'
    ours = read_lora_file(
        save_lora(tmp_path / "ours.safetensors", module, shapes, _nest(flat), alpha=np.float32(ALPHA), metadata=note)
    )
    with safe_open(ours.path, framework="numpy") as f:
        assert f.metadata()["trained_with"] == "d4k_jax" and f.metadata()["format"] == "pt"
    assert set(ours.source) == set(theirs.source) and len(ours.source) == 2 * 20  # 20 modules, A and B
    for key in theirs.source:
        np.testing.assert_array_equal(ours.source[key], theirs.source[key], err_msg=key)
    # the same adapters as jax arrays split over 8 devices (in / out axes), as a sharded training state holds them
    mesh = jax.make_mesh((8,), ("x",))
    sharded = {k: jax.device_put(a, NamedSharding(mesh, _split_rows(a))) for k, a in flat.items()}
    assert not all(a.sharding.is_fully_replicated for a in sharded.values())
    again = save_lora(tmp_path / "sharded.safetensors", module, shapes, _nest(sharded), alpha=ALPHA)
    assert _metadata(again) == _metadata(tmp_path / "ours.safetensors")  # (the header's order is not stable)
    for key, value in TensorSource([again]).items():
        np.testing.assert_array_equal(value, ours.source[key], err_msg=key)
    for name, m in ours.modules.items():
        assert ours.scale(m) == theirs.scale(theirs.modules[name]) == ALPHA / 4, name


def _split_rows(a):
    """Its second-to-last axis over the 8 devices where that divides (down's in, up's rank: 32 and 4 here)."""
    return PartitionSpec(*[None] * (a.ndim - 2), "x", None) if a.ndim > 1 and a.shape[-2] % 8 == 0 else PartitionSpec()


def _nest(flat):
    return traverse_util.unflatten_dict(flat)


def test_every_mismatch_is_listed(tmp_path):
    module, base = load_component(save_component(make_flux(seed=0), tmp_path / "base"))
    shapes = _shapes(base)
    adapters = traverse_util.flatten_dict(_adapters(shapes, FLUX_ADAPTERS))
    bad = dict(adapters)
    bad[("single_transformer_blocks", "proj_out_attn", "down")] = np.ones((3, 32, 4), np.float32)
    bad[("single_transformer_blocks", "proj_out_attn", "up")] = np.ones((3, 4, 32), np.float32)
    bad[("transformer_blocks", "attn", "to_q", "down")] = np.ones((2, 31, 4), np.float32)
    bad[("transformer_blocks", "attn", "to_q", "bias")] = np.ones((2,), np.float32)
    del bad[("transformer_blocks", "attn", "to_out_0", "up")]
    bad[("transformer_blocks", "attn", "norm_q", "down")] = np.ones((2, 16, 4), np.float32)
    bad[("transformer_blocks", "attn", "add_k_proj", "scale")] = np.ones((3,), np.float32)
    with pytest.raises(ConversionError) as e:
        save_lora(tmp_path / "bad.safetensors", module, shapes, _nest(bad), alpha=ALPHA)
    message = str(e.value)
    for needle in (
        "single_transformer_blocks/proj_out_attn layers 0, 1, 2 (no diffusers Linear is exactly this kernel: "
        "diffusers' single-block proj_out",
        "transformer_blocks/attn/to_q: down (2, 31, 4), up (2, 4, 32), scale (2,) -> expected down (2, 32, 'r')",
        "transformer_blocks/attn/to_q/bias (an adapter's leaves are down, up, scale)",
        "transformer_blocks/attn/to_out_0/up (beside ['down'])",
        "transformer_blocks/attn/norm_q (no Dense kernel of the Flux at transformer_blocks/attn/norm_q/kernel)",
        "transformer_blocks/attn/add_k_proj: down (2, 32, 4), up (2, 4, 32), scale (3,) -> expected",
    ):
        assert needle in message, (needle, message)
    assert not (tmp_path / "bad.safetensors").exists()
    none = _adapters(shapes, {("transformer_blocks", "attn", "to_q"): (4, [0.0, 0.0])})
    with pytest.raises(ValueError, match="no adapter to write"):
        save_lora(tmp_path / "none.safetensors", module, shapes, none, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"refused: 'format' \(written by save_lora\)"):
        save_lora(tmp_path / "m.safetensors", module, shapes, _nest(adapters), alpha=ALPHA, metadata={"format": "np"})


def test_an_exported_lora_gives_diffusers_images(tmp_path):
    """The pipeline-level check: an exported LoRA on a tiny Flux pipeline, in diffusers (load_lora_weights) and in
    ours (kept separate), gives the same images from the same latents, within 2 uint8 levels."""
    ref_pipe = flux_pipeline(tmp_path)
    pipe = pipelines.FluxPipeline.from_pretrained(tmp_path / "flux", dtype=jax.numpy.float32)
    module, base = pipe.transformer
    shapes = _shapes(base)
    spec = {
        ("transformer_blocks", "attn", "to_q"): (4, None),
        ("transformer_blocks", "attn", "add_v_proj"): (2, None),
        ("single_transformer_blocks", "attn", "to_k"): (4, None),
    }
    path = save_lora(tmp_path / "lora" / "ours.safetensors", module, shapes, _adapters(shapes, spec), alpha=ALPHA)
    ref_pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.load_lora_weights(path, merge=False)
    prompts = ["a red cat on the sky"]
    latents = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)  # 16 x 16 pixels
    packed = FluxPipeline._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), 1, 4, 8, 8)
    kw = dict(height=16, width=16, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=12)
    with torch.no_grad():
        ref = ref_pipe(prompts, latents=packed, output_type="np", **kw).images
    ours = np.asarray(pipe(prompts, latents=latents, **kw), int)
    assert np.abs(ours - np.round(ref * 255).astype(int)).max() <= 2
    pipe.adapters = None  # the LoRA moved the images: without it they differ
    assert np.abs(np.asarray(pipe(prompts, latents=latents, **kw), int) - np.round(ref * 255)).max() > 2
