"""LoRA files merged into the transformers (d4k_jax/io/lora.py): parity with peft + diffusers (the adapter active on the
torch model), a diffusers-saved file and a kohya file of the same weights (fused BFL q/k/v) loading to the same
velocity, scale 0 and several files, sharded and bf16 params, and the errors that list what does not match."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from flax import traverse_util
from helpers import save_component
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch_flux import flux_forward, make_flux
from torch_sd3 import make_sd3, sd3_forward

from d4k_jax import sharding
from d4k_jax.io import ConversionError, load_component, merge_lora
from d4k_jax.io.safetensors_io import save_file

RANK, ALPHA = 4, 6
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "proj_mlp", "proj_out"]
FLUX_TARGETS += ["norm_out.linear", "ff.net.2"]
PATTERN = {"proj_mlp": 3}  # peft's alpha_pattern: this module's alpha differs


def _add_lora(model, targets, alpha_pattern=None, seed=0):
    """A peft adapter on `model` with random non-zero A and B (peft starts B at zero); its diffusers state dict."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, alpha_pattern=alpha_pattern or {}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _inputs(b=2, hw=8, text=7, text_dim=24, pooled=12, channels=4):
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return f(b, hw, hw, channels), np.array([0.3, 0.8], np.float32), f(b, text, text_dim), f(b, pooled)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(module, base params, the velocity with the adapter active in torch, inputs, diffusers file, kohya file)."""
    root = tmp_path_factory.mktemp("lora_flux")
    model = make_flux(seed=2)
    module, base = load_component(save_component(model, root / "base"))
    state = _add_lora(model, FLUX_TARGETS, PATTERN)
    meta = model.peft_config["default"].to_dict()
    FluxPipeline.save_lora_weights(root / "diffusers", state, transformer_lora_adapter_metadata=meta)
    latents, t, text, pooled = _inputs()
    guidance = np.full((2,), 3.5, np.float32)
    want = flux_forward(model, latents, t, text, pooled, guidance)
    kohya = root / "kohya.safetensors"
    save_file(_kohya({k: v.numpy() for k, v in state.items()}, model.config), kohya)
    args = (latents, t, text, pooled, guidance)
    return module, base, want, args, root / "diffusers" / "pytorch_lora_weights.safetensors", kohya


def _scale(name):
    alpha = PATTERN.get(name.split(".")[-1], ALPHA)
    return alpha / RANK


def _kohya(state, cfg):
    """The same LoRA in kohya's layout for FLUX.1 (BFL names, `_` for `.`): fused q/k/v (single blocks: and the
    MLP input) as one down (the parts' A stacked) and one block-diagonal up, alpha = 1.5 x its rank; the final
    modulation's rows swapped (BFL stores shift, scale). Written here from the BFL layout, not from the loader."""
    d, mlp = cfg.num_attention_heads * cfg.attention_head_dim, 4 * cfg.num_attention_heads * cfg.attention_head_dim
    groups = {}  # kohya name -> [(diffusers module or None, rows)]
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        groups[f"double_blocks_{i}_img_attn_qkv"] = [(f"{b}.attn.to_{x}", d) for x in "qkv"]
        groups[f"double_blocks_{i}_txt_attn_qkv"] = [(f"{b}.attn.add_{x}_proj", d) for x in "qkv"]
        groups[f"double_blocks_{i}_img_attn_proj"] = [(f"{b}.attn.to_out.0", d)]
        groups[f"double_blocks_{i}_txt_attn_proj"] = [(f"{b}.attn.to_add_out", d)]
        groups[f"double_blocks_{i}_img_mlp_2"] = [(f"{b}.ff.net.2", d)]
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        groups[f"single_blocks_{i}_linear1"] = [*((f"{b}.attn.to_{x}", d) for x in "qkv"), (f"{b}.proj_mlp", mlp)]
        groups[f"single_blocks_{i}_linear2"] = [(f"{b}.proj_out", d)]
    groups["final_layer_linear"] = [("proj_out", None)]
    groups["final_layer_adaLN_modulation_1"] = [("norm_out.linear", None)]
    out, used = {}, set()
    for name, parts in groups.items():
        present = [(m, n) for m, n in parts if f"{m}.lora_A.weight" in state]
        if not present:
            continue
        downs = [state[f"{m}.lora_A.weight"] for m, _ in present]
        ups = [state[f"{m}.lora_B.weight"] * (_scale(m) / 1.5) for m, _ in present]
        if name.startswith("final_layer_adaLN"):
            ups = [np.concatenate(np.split(ups[0], 2)[::-1])]
        rows = [state[f"{m}.lora_B.weight"].shape[0] if f"{m}.lora_B.weight" in state else n for m, n in parts]
        up = np.zeros((sum(rows), RANK * len(present)), np.float32)
        starts = dict(zip([m for m, _ in parts], np.cumsum([0, *rows[:-1]]), strict=True))
        for j, ((m, _), u) in enumerate(zip(present, ups, strict=True)):
            up[starts[m] : starts[m] + u.shape[0], j * RANK : (j + 1) * RANK] = u
        out[f"lora_unet_{name}.lora_down.weight"] = np.concatenate(downs)
        out[f"lora_unet_{name}.lora_up.weight"] = up
        out[f"lora_unet_{name}.alpha"] = np.array(1.5 * RANK * len(present), np.float32)
        used.update(f"{m}.lora_{x}.weight" for m, _ in present for x in "AB")
    assert used == set(state), sorted(set(state) - used)
    return out


def _change(base, adapted):
    """How much the adapter moves the velocity (not a parity error: conftest's report lists only those)."""
    return float(np.abs(base - adapted).max() / np.abs(adapted).max())


_APPLY = {}  # one compiled forward per module


def _velocity(module, params, args):
    apply = _APPLY.setdefault(id(module), jax.jit(module.apply))
    return np.asarray(apply({"params": params}, *args))


def test_flux_diffusers_and_kohya_files_match_peft(flux):
    module, base, want, args, diffusers_file, kohya_file = flux
    assert _change(_velocity(module, base, args), want) > 0.05  # the adapter changes the velocity
    for path in (diffusers_file, kohya_file):
        got = _velocity(module, merge_lora(module, base, [(path, 1.0)]), args)
        assert rel_err(got, want) < MODEL_TOL, path.name


def _flat(params):
    return {p: np.asarray(a, np.float32) for p, a in traverse_util.flatten_dict(params).items()}


def test_scale_zero_is_the_base_and_files_add(flux, tmp_path):
    module, base, _, _, diffusers_file, kohya_file = flux
    zero = _flat(merge_lora(module, base, [(diffusers_file, 0.0)]))
    for path, value in _flat(base).items():
        np.testing.assert_array_equal(zero[path], value, err_msg="/".join(path))
    whole = _flat(merge_lora(module, base, [(diffusers_file, 1.0)]))
    halves = _flat(merge_lora(module, base, [(diffusers_file, 0.25), (kohya_file, 0.75)]))
    # the same adapter without metadata: a `.alpha` tensor per module (the layout diffusers calls network alphas)
    state = _read(diffusers_file)
    modules = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    alphas = {f"{m}.alpha": np.array(_scale(m) * RANK, np.float32) for m in modules}
    save_file(state | alphas, tmp_path / "alphas.safetensors")
    by_alpha_keys = _flat(merge_lora(module, base, [(tmp_path / "alphas.safetensors", 1.0)]))
    changed = 0
    for path, value in whole.items():
        changed += not np.array_equal(value, zero[path])
        np.testing.assert_allclose(halves[path], value, rtol=1e-5, atol=1e-6, err_msg="/".join(path))
        np.testing.assert_allclose(by_alpha_keys[path], value, rtol=1e-6, atol=1e-7, err_msg="/".join(path))
    assert changed >= 10  # every targeted kernel (stacked over layers) moved


def test_other_key_layouts_load_alike(flux, tmp_path):
    """peft's own names (no `transformer.`), the older `.lora.down` / `.lora.up`, `lora_transformer_` with
    underscores and alpha tensors, and ComfyUI's dotted BFL names: the same params as the diffusers file."""
    module, base, _, _, diffusers_file, kohya_file = flux
    want = _flat(merge_lora(module, base, [(diffusers_file, 1.0)]))
    state, kohya = _read(diffusers_file), _read(kohya_file)
    strip = lambda k: k.removeprefix("transformer.")
    modules = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    alphas = {f"{m}.alpha": np.array(_scale(m) * RANK, np.float32) for m in modules}
    old = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}
    layouts = {
        "peft": {strip(k): v for k, v in state.items()},  # with its LoraConfig unprefixed (save_lora_adapter)
        "old": old | alphas,
        "comfy": {_dotted_bfl(k): v for k, v in kohya.items()},
    }
    mixture = {}
    for k, v in state.items():
        module_name, _, tensor = strip(k).rpartition(".lora_")
        name = "lora_transformer_" + module_name.replace(".", "_")
        mixture[f"{name}.lora_{'down' if tensor.startswith('A') else 'up'}.weight"] = v
        mixture[f"{name}.alpha"] = np.array(_scale(module_name) * RANK, np.float32)
    layouts["mixture"] = mixture
    for name, tensors in layouts.items():
        config = {"r": RANK, "lora_alpha": ALPHA, "alpha_pattern": PATTERN} if name == "peft" else None
        metadata = {"lora_adapter_metadata": json.dumps(config)} if config else None
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata)
        got = _flat(merge_lora(module, base, [(tmp_path / f"{name}.safetensors", 1.0)]))
        for path, value in want.items():
            np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=f"{name}: {'/'.join(path)}")


def _dotted_bfl(key):
    """kohya's `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` as ComfyUI names it (BFL, with dots)."""
    name, _, tensor = key.partition(".")
    name = re.sub(r"^lora_unet_(double_blocks|single_blocks)_(\d+)_", r"\1.\2.", name)
    for old, new in (("_attn_", "_attn."), ("_mlp_", "_mlp."), ("final_layer_", "final_layer."), ("ion_1", "ion.1")):
        name = name.replace(old, new)
    return f"diffusion_model.{name.removeprefix('lora_unet_')}.{tensor}"


def _read(path):
    from d4k_jax.io.safetensors_io import TensorSource

    return {k: np.asarray(v) for k, v in TensorSource([path]).items()}


def test_sharded_and_bf16_params_keep_their_sharding_and_dtype(flux):
    module, base, _, _, diffusers_file, _ = flux
    want = _flat(merge_lora(module, base, [(diffusers_file, 1.0)]))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    shardings = sharding.params_sharding(mesh, sharding.DEFAULT_RULES, {"params": _abstract(module)})["params"]
    sharded = jax.device_put(jax.tree.map(np.asarray, base), shardings)  # from the host: no resharding program
    merged = merge_lora(module, sharded, [(diffusers_file, 1.0)])
    split = 0
    for path, leaf in traverse_util.flatten_dict(merged).items():
        assert leaf.sharding == traverse_util.flatten_dict(sharded)[path].sharding, path
        split += not leaf.sharding.is_fully_replicated
        np.testing.assert_allclose(np.asarray(leaf), want[path], rtol=1e-6, atol=1e-7, err_msg="/".join(path))
    assert split > 0
    bf16 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(jnp.bfloat16)), base)
    bf16 = merge_lora(module, bf16, [(diffusers_file, 1.0)])
    for path, leaf in traverse_util.flatten_dict(bf16).items():
        assert leaf.dtype == jnp.bfloat16, path
        np.testing.assert_allclose(np.asarray(leaf, np.float32), want[path], rtol=2e-2, atol=2e-2)


def _abstract(module):
    from d4k_jax.io.components import kind_of_module
    from d4k_jax.models.keymap import abstract_params

    return abstract_params(module, kind_of_module(module).init_inputs(module.config))


def test_sd3_diffusers_file_matches_peft(tmp_path):
    model = make_sd3(seed=4)
    module, base = load_component(save_component(model, tmp_path / "base"))
    state = _add_lora(model, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_out"], seed=1)
    meta = model.peft_config["default"].to_dict()
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "lora", state, transformer_lora_adapter_metadata=meta)
    latents, t, text, pooled = _inputs(text_dim=20, hw=8, channels=4)
    t = t * 1000
    want = sd3_forward(model, latents, t, text, pooled)
    merged = merge_lora(module, base, [(tmp_path / "lora" / "pytorch_lora_weights.safetensors", 1.0)])
    args = (latents, t, text, pooled)
    assert _change(_velocity(module, base, args), want) > 0.05
    assert rel_err(_velocity(module, merged, args), want) < MODEL_TOL


def test_every_mismatch_is_listed(flux, tmp_path):
    module, base, _, _, diffusers_file, _ = flux
    state = _read(diffusers_file)
    a = state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    bad = dict(state)
    bad["transformer.transformer_blocks.0.attn.to_z.lora_A.weight"] = a
    bad["transformer.transformer_blocks.0.attn.to_z.lora_B.weight"] = a.T
    bad["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"] = np.zeros((RANK, 7), np.float32)
    bad["text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight"] = a
    bad["transformer.proj_out.lora_B.bias"] = a[0]
    del bad["transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"]
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        merge_lora(module, base, [(tmp_path / "bad.safetensors", 1.0)])
    for needle in (
        "text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight (a text-encoder LoRA",
        "transformer.proj_out.lora_B.bias (a LoRA bias is not supported)",
        "transformer.single_transformer_blocks.0.attn.to_v: up (lora_B / lora_up) tensor",
    ):
        assert needle in str(e.value)
    del bad["text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight"], bad["transformer.proj_out.lora_B.bias"]
    bad["transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"] = state[
        "transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"
    ]
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:  # names, then shapes, against the model
        merge_lora(module, base, [(tmp_path / "bad.safetensors", 1.0)])
    assert "transformer.transformer_blocks.0.attn.to_z (no Linear of the Flux is named" in str(e.value)
    assert "transformer.transformer_blocks.1.attn.to_k: up [32, 4] @ down [4, 7] -> kernel (7, 32)" in str(e.value)
    sd3 = make_sd3(seed=0)
    sd3_module, sd3_params = load_component(save_component(sd3, tmp_path / "sd3"))
    kohya = {f"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_{x}.weight": w for x, w in (("down", a), ("up", a.T))}
    save_file(kohya, tmp_path / "k.safetensors")
    with pytest.raises(ConversionError, match="kohya-format SD3 LoRAs are not supported"):
        merge_lora(sd3_module, sd3_params, [(tmp_path / "k.safetensors", 1.0)])


def test_kohya_at_flux_dev_size_matches_diffusers_converter(tmp_path):
    """Every FLUX.1-dev kohya layout at its real sizes (rank 2-4, names and shapes only: no weights), read directly
    and after diffusers' own kohya -> diffusers converter: the same delta on a random vector, for every kernel."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from d4k_jax.io import lora
    from d4k_jax.io.components import _flux_inputs
    from d4k_jax.io.lora_files import read_lora_file
    from d4k_jax.models.flux import Flux, FluxConfig
    from d4k_jax.models.keymap import param_shapes

    module = Flux(FluxConfig())
    shapes = param_shapes(module, _flux_inputs(module.config))
    rng, d, f, kohya = np.random.default_rng(0), 3072, 12288, {}
    layouts = {"img_in": (d, 64), "txt_in": (d, 4096), "time_in_in_layer": (d, 256), "vector_in_out_layer": (d, d)}
    layouts["guidance_in_in_layer"] = (d, 256)
    for i in (0, 18):
        for s in ("img", "txt"):
            layouts |= {f"double_blocks_{i}_{s}_attn_qkv": (3 * d, d), f"double_blocks_{i}_{s}_attn_proj": (d, d)}
            layouts |= {f"double_blocks_{i}_{s}_mlp_0": (f, d), f"double_blocks_{i}_{s}_mlp_2": (d, f)}
            layouts[f"double_blocks_{i}_{s}_mod_lin"] = (6 * d, d)
    for i in (0, 37):
        layouts |= {f"single_blocks_{i}_linear1": (3 * d + f, d), f"single_blocks_{i}_linear2": (d, d + f)}
        layouts[f"single_blocks_{i}_modulation_lin"] = (3 * d, d)
    for n, (name, (out, n_in)) in enumerate(layouts.items()):
        r = 2 + n % 3
        kohya[f"lora_unet_{name}.lora_down.weight"] = rng.normal(size=(r, n_in)).astype(np.float32)
        kohya[f"lora_unet_{name}.lora_up.weight"] = rng.normal(size=(out, r)).astype(np.float32)
        kohya[f"lora_unet_{name}.alpha"] = np.array(1.0 + n % 4, np.float32)
    converted = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v) for k, v in kohya.items()})
    save_file(kohya, tmp_path / "kohya.safetensors")
    save_file({k: v.numpy() for k, v in converted.items()}, tmp_path / "diffusers.safetensors")
    got = {}
    for name in ("kohya", "diffusers"):
        file = read_lora_file(tmp_path / f"{name}.safetensors")
        got[name] = lora.factors([(file, 1.0, lora.plan(file, module, shapes))], shapes)
    assert got["kohya"].keys() == got["diffusers"].keys() and len(got["kohya"]) == 26
    for path, (down, up) in got["kohya"].items():
        x = rng.normal(size=shapes[path][-1]).astype(np.float32)
        ours = np.einsum("...ir,...r->...i", down, np.einsum("...ro,o->...r", up, x))
        d_down, d_up = got["diffusers"][path]
        ref = np.einsum("...ir,...r->...i", d_down, np.einsum("...ro,o->...r", d_up, x))
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), path
