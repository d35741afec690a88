"""Build the embedded demo pipelines.

    python -m tools.make_demo_pipeline --out=d4k_jax/data/demo_pipeline
    python -m tools.make_demo_pipeline --model=sd3 --out=d4k_jax/data/demo_pipeline_sd3 \\
        --vae_from=d4k_jax/data/demo_pipeline/vae

A FLUX.1-style diffusers pipeline folder small enough to train on a 2-core CPU in minutes, laid out exactly
like FLUX.1-dev's so the training CLI loads it like the real one. Only the F16 VAE is trained here (on the
embedded demo images, 64x64 -> 8x8x8 latents); the text encoders and the transformer are seeded random
initialisations (the encoders stay frozen: a random projection of the tokens still tells captions apart).
--model=sd3 writes the StableDiffusion3Pipeline equivalent (CLIP-L, CLIP-G, T5, MMDiT; random, seeded)
around a copy of that trained VAE (--vae_from), which it does not retrain.
Same flags, same folder: every random draw comes from --seed.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from transformers import AutoTokenizer, CLIPTextConfig, T5Config

from conversion import export_component, load_component
from d4k_jax.data.demo import COLORS, SHAPES, demo_examples
from d4k_jax.io.components import kind_for
from d4k_jax.models.vae import AutoencoderKL
from tools.demo_vae import (
    DIFFUSERS_VERSION,
    SIZE,
    VAE,
    images_of,
    latent_stats,
    psnr,
    reconstruct,
    train_vae,
    vae_config,
)
from tools.tiny_tokenizers import clip_tokenizer, t5_tokenizer

MODEL = flags.DEFINE_enum("model", "flux", ["flux", "sd3"], "FLUX.1 (trains the VAE) or SD3 (reuses --vae_from)")
OUT = flags.DEFINE_string("out", "", "pipeline folder to (re)write; default d4k_jax/data/demo_pipeline[_sd3]")
VAE_FROM = flags.DEFINE_string("vae_from", "d4k_jax/data/demo_pipeline/vae", "sd3: the trained VAE folder to copy")
SEED = flags.DEFINE_integer("seed", 0, "one seed for the VAE's data, init and noise and the random components")
STEPS = flags.DEFINE_integer("vae_steps", 1200, "VAE training steps")
BATCH = flags.DEFINE_integer("vae_batch", 16, "VAE batch size")
LR = flags.DEFINE_float("vae_lr", 2e-3, "peak Adam learning rate (warmup, then cosine decay)")
KL = flags.DEFINE_float("kl_weight", 1e-4, "KL weight against the per-pixel L1 loss")
TRAIN_IMAGES = flags.DEFINE_integer("train_images", 8192, "demo images the VAE trains on (demo seed = --seed)")
PREVIEW = flags.DEFINE_string("preview", "", "if set, a PNG of 8 held-out originals above their reconstructions")
ONLY_TRANSFORMER = flags.DEFINE_bool(
    "only_transformer",
    False,
    "flux: rewrite only transformer/ (and its README line) of the existing --out folder, keeping its trained VAE,"
    " tokenizers and encoders",
)

HELD_OUT = 64  # held-out images, demo seed --seed + 1 (the tests use yet another seed)
CLIP_LEN = 16  # the longest demo caption is 12 words = 14 CLIP tokens with start and end
WORDS = ("a", "on", "background", "with", "small", *COLORS, *SHAPES)  # every word demo.py writes
TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "attention_head_dim": 32,  # = sum(axes_dims_rope); width 4 x 32 = 128 (4 x 24 draws faint blobs in 3000 steps)
    "axes_dims_rope": [8, 12, 12],
    "guidance_embeds": True,
    "in_channels": 4 * VAE.latent_channels,
    "joint_attention_dim": 32,  # T5 d_model
    "num_attention_heads": 4,
    "num_layers": 2,
    "num_single_layers": 2,
    "out_channels": None,
    "patch_size": 1,
    "pooled_projection_dim": 32,  # CLIP hidden size
}
SCHEDULER = {  # FLUX.1-dev's
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# SD3: CLIP-L and CLIP-G penultimate states (32 + 48 features) are concatenated and zero-padded to the T5 width,
# which is also the transformer's joint_attention_dim; the pooled input is their projections (32 + 48).
SD3_CLIP_L = dict(
    hidden_size=32, projection_dim=32, intermediate_size=64, num_attention_heads=2, hidden_act="quick_gelu"
)
SD3_CLIP_G = dict(hidden_size=48, projection_dim=48, intermediate_size=96, num_attention_heads=2, hidden_act="gelu")
SD3_T5_WIDTH = 96
SD3_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "attention_head_dim": 24,
    "caption_projection_dim": 96,  # the width, heads x head dim, as SD3's
    "dual_attention_layers": [],
    "in_channels": VAE.latent_channels,
    "joint_attention_dim": SD3_T5_WIDTH,
    "num_attention_heads": 4,
    "num_layers": 2,
    "out_channels": VAE.latent_channels,
    "patch_size": 2,
    "pooled_projection_dim": SD3_CLIP_L["projection_dim"] + SD3_CLIP_G["projection_dim"],
    "pos_embed_max_size": 16,  # patches a side: latents up to 32x32, 512x512 images with the F16 VAE
    "qk_norm": None,
    "sample_size": SIZE // 8,  # latents a side at the demo size: the sincos table's base size is 8 / 2 = 4
}
SD3_SCHEDULER = {  # SD3-medium's
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
SD3_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# Trained weights keep fp32; the random ones are a bf16 draw (the trainer reads them into fp32), which keeps
# the folder near 7.5 MB.
RANDOM_DTYPE = "bfloat16"


def check_captions(out: Path, captions: list[str], t5_name: str = "tokenizer_2") -> int:
    """Every caption fits CLIP_LEN and is made of known whole-word tokens in both tokenizers; the longest length."""
    clip, t5 = AutoTokenizer.from_pretrained(out / "tokenizer"), AutoTokenizer.from_pretrained(out / t5_name)
    longest = 0
    for caption in sorted(set(captions)):
        words = caption.split()
        ids = clip(caption).input_ids
        if ids != [clip.bos_token_id, *clip.convert_tokens_to_ids([w + "</w>" for w in words]), clip.eos_token_id]:
            raise ValueError(f"CLIP tokenizes {caption!r} as {clip.convert_ids_to_tokens(ids)}, not word by word")
        ids2 = t5(caption).input_ids
        if ids2 != [*t5.convert_tokens_to_ids(["▁" + w for w in words]), t5.eos_token_id]:
            raise ValueError(f"T5 tokenizes {caption!r} as {t5.convert_ids_to_tokens(ids2)}, not word by word")
        longest = max(longest, len(ids))
    if longest > CLIP_LEN:
        raise ValueError(f"a demo caption takes {longest} CLIP tokens, more than model_max_length {CLIP_LEN}")
    return longest


def export_random(config: dict[str, Any], key: jax.Array, dst: Path) -> int:
    """Seeded random init of the model `config` describes, written in its diffusers / transformers layout."""
    kind = kind_for(config)
    model_cfg = kind.config_from(config)
    params = nn.unbox(jax.jit(kind.build(model_cfg).init)(key, *kind.init_inputs(model_cfg))["params"])
    export_component(config, params, dst, dtype=RANDOM_DTYPE)
    return sum(a.size for a in jax.tree.leaves(params))


def encoder_configs(clip_vocab: int, t5_vocab: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers config dicts (as save_pretrained writes them) of the tiny CLIP-L and T5 stand-ins."""
    clip = CLIPTextConfig(
        vocab_size=clip_vocab,
        hidden_size=TRANSFORMER["pooled_projection_dim"],
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LEN,
        bos_token_id=0,
        eos_token_id=1,  # pooled at the first <|endoftext|>, as the tokenizer's ids
        pad_token_id=1,
        architectures=["CLIPTextModel"],
    )
    t5 = T5Config(
        vocab_size=t5_vocab,
        d_model=TRANSFORMER["joint_attention_dim"],
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        architectures=["T5EncoderModel"],
    )
    return clip.to_diff_dict(), t5.to_diff_dict()


def sd3_encoder_configs(clip_vocab: int, t5_vocab: int) -> tuple[dict[str, Any], ...]:
    """transformers config dicts of the tiny CLIP-L, CLIP-G (both with projection) and T5 stand-ins of SD3."""
    clips = tuple(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            num_hidden_layers=2,
            max_position_embeddings=CLIP_LEN,
            bos_token_id=0,
            eos_token_id=1,  # pooled at the first <|endoftext|>, as the tokenizer's ids
            pad_token_id=1,
            architectures=["CLIPTextModelWithProjection"],
            **dims,
        ).to_diff_dict()
        for dims in (SD3_CLIP_L, SD3_CLIP_G)
    )
    t5 = T5Config(
        vocab_size=t5_vocab,
        d_model=SD3_T5_WIDTH,
        d_kv=24,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        architectures=["T5EncoderModel"],
    )
    return (*clips, t5.to_diff_dict())


def main(argv: list[str]) -> None:
    del argv
    model, seed = MODEL.value, SEED.value
    out = Path(OUT.value or ("d4k_jax/data/demo_pipeline_sd3" if model == "sd3" else "d4k_jax/data/demo_pipeline"))
    log = lambda msg: print(msg, flush=True)
    if ONLY_TRANSFORMER.value:
        if model != "flux":
            raise ValueError("--only_transformer rewrites the Flux demo's transformer/ only")
        remake_transformer(out, seed, log)
        return
    (make_sd3 if model == "sd3" else make_flux)(out, seed, log)


def remake_transformer(out: Path, seed: int, log: Callable[[str], None]) -> None:
    """Rewrites out/transformer/ from TRANSFORMER (the same seeded key as make_flux) and its README bullet."""
    readme_path = out / "README.md"
    if not (out / "vae" / "config.json").exists() or not readme_path.exists():
        raise ValueError(f"{out} is not an existing Flux demo pipeline folder (make it without --only_transformer)")
    flux_key = jax.random.split(jax.random.key(seed), 4)[3]  # make_flux's
    if (out / "transformer").exists():
        shutil.rmtree(out / "transformer")
    count = export_random(TRANSFORMER, flux_key, out / "transformer")
    load_component(out / "transformer")
    check_pipeline(out, [c for _, c in demo_examples(2, SIZE, seed=seed + 1)])
    text = readme_path.read_text()
    start = text.index("- `transformer/`")
    end = text.index("\n- ", start) + 1
    readme_path.write_text(text[:start] + _bullet(transformer_item(count)) + "\n" + text[end:])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"rewrote {out / 'transformer'} ({count:,} parameters); folder {size / 2**20:.2f} MiB")


def transformer_item(count: int) -> str:
    """The README's transformer/ bullet."""
    t = TRANSFORMER
    return (
        f"`transformer/`: **random** seeded FluxTransformer2DModel initialisation ({count:,}"
        f" parameters, {RANDOM_DTYPE}): {t['num_layers']} double + {t['num_single_layers']}"
        f" single blocks, {t['num_attention_heads']} heads x {t['attention_head_dim']} (RoPE axes"
        f" {t['axes_dims_rope']}), guidance embedding; the demo trainer trains it from here."
    )


def _bullet(item: str) -> str:
    return textwrap.fill(item, 110, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False)


def make_flux(out: Path, seed: int, log: Callable[[str], None]) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    key = jax.random.key(seed)
    vae_key, clip_key, t5_key, flux_key = jax.random.split(key, 4)

    train = demo_examples(TRAIN_IMAGES.value, SIZE, seed=seed)
    held_out = demo_examples(HELD_OUT, SIZE, seed=seed + 1)
    start = time.time()
    vae_params = train_vae(images_of(train), vae_key, log, STEPS.value, BATCH.value, LR.value, KL.value)
    vae_seconds = time.time() - start
    vae = AutoencoderKL(VAE)
    recons = reconstruct(vae, vae_params, images_of(held_out))
    originals = np.stack([img for img, _ in held_out])
    held_psnr = psnr(originals, recons)
    shift, scale = latent_stats(vae, vae_params, images_of(train[:2048]))
    log(f"vae: {vae_seconds:.0f} s, held-out PSNR {held_psnr:.2f} dB, latent shift {shift:.4f} scale {scale:.4f}")
    export_component(vae_config(shift, scale), vae_params, out / "vae", dtype="float32")
    # export writes diffusers' own keys only; the F16 "stride" must be in config.json for d4k_jax to build F16
    (out / "vae" / "config.json").write_text(json.dumps(vae_config(shift, scale), indent=2) + "\n")
    if PREVIEW.value:
        from PIL import Image

        grid = np.concatenate([np.concatenate(list(originals[:8]), 1), np.concatenate(list(recons[:8]), 1)], 0)
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(PREVIEW.value)

    clip_tokenizer(out / "tokenizer", CLIP_LEN, words=WORDS)
    t5_tokenizer(out / "tokenizer_2", words=WORDS)
    longest = check_captions(out, [c for _, c in train])
    clip_vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    t5_vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer_2"))
    clip_cfg, t5_cfg = encoder_configs(clip_vocab, t5_vocab)
    counts = {
        "text_encoder": export_random(clip_cfg, clip_key, out / "text_encoder"),
        "text_encoder_2": export_random(t5_cfg, t5_key, out / "text_encoder_2"),
        "transformer": export_random(TRANSFORMER, flux_key, out / "transformer"),
    }
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": DIFFUSERS_VERSION, **COMPONENTS}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        load_component(out / name)  # strict: raises on any missing, unexpected or mis-shaped tensor
    check_pipeline(out, [c for _, c in held_out[:2]])
    facts = dict(
        seed=seed,
        steps=STEPS.value,
        batch=BATCH.value,
        lr=LR.value,
        kl=KL.value,
        n_train=TRAIN_IMAGES.value,
        seconds=vae_seconds,
        psnr=held_psnr,
        shift=shift,
        scale=scale,
        longest=longest,
        clip_vocab=clip_vocab,
        t5_vocab=t5_vocab,
        counts=counts,
        vae_params=sum(a.size for a in jax.tree.leaves(vae_params)),
    )
    (out / "README.md").write_text(readme(**facts))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 2**20:.2f} MiB); longest caption {longest} CLIP tokens; params {counts}")


def make_sd3(out: Path, seed: int, log: Callable[[str], None]) -> None:
    """The SD3 folder around a copy of the trained VAE in --vae_from; the rest seeded random, as the Flux one."""
    src = Path(VAE_FROM.value)
    vae_cfg = json.loads((src / "config.json").read_text())
    if vae_cfg.get("stride") != 2 or vae_cfg.get("latent_channels") != SD3_TRANSFORMER["in_channels"]:
        raise ValueError(f"{src} is not the demo's F16 VAE with {SD3_TRANSFORMER['in_channels']} latent channels")
    if out.resolve() in src.resolve().parents:
        raise ValueError(f"--vae_from {src} lies inside --out {out}, which is rewritten")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # a copy, not a symlink: wheels and sdists ship plain files (git stores the identical blobs once)
    shutil.copytree(src, out / "vae")
    _, clip_l_key, clip_g_key, t5_key, mmdit_key = jax.random.split(jax.random.key(seed), 5)

    clip_tokenizer(out / "tokenizer", CLIP_LEN, words=WORDS)
    shutil.copytree(out / "tokenizer", out / "tokenizer_2")  # CLIP-L's and CLIP-G's tokenizers: one vocabulary
    t5_tokenizer(out / "tokenizer_3", words=WORDS)
    captions = [c for _, c in demo_examples(TRAIN_IMAGES.value, 8, seed=seed)]  # captions do not depend on size
    longest = check_captions(out, captions, t5_name="tokenizer_3")
    clip_vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    t5_vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer_3"))
    clip_l_cfg, clip_g_cfg, t5_cfg = sd3_encoder_configs(clip_vocab, t5_vocab)
    counts = {
        "text_encoder": export_random(clip_l_cfg, clip_l_key, out / "text_encoder"),
        "text_encoder_2": export_random(clip_g_cfg, clip_g_key, out / "text_encoder_2"),
        "text_encoder_3": export_random(t5_cfg, t5_key, out / "text_encoder_3"),
        "transformer": export_random(SD3_TRANSFORMER, mmdit_key, out / "transformer"),
    }
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD3_SCHEDULER, indent=2) + "\n")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": DIFFUSERS_VERSION, **SD3_COMPONENTS}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
        load_component(out / name)  # strict: raises on any missing, unexpected or mis-shaped tensor
    check_sd3_pipeline(out, [c for _, c in demo_examples(2, 8, seed=seed + 1)])
    (out / "README.md").write_text(
        readme_sd3(
            seed=seed,
            vae_from=src,
            vae_cfg=vae_cfg,
            longest=longest,
            clip_vocab=clip_vocab,
            t5_vocab=t5_vocab,
            counts=counts,
        )
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 2**20:.2f} MiB); longest caption {longest} CLIP tokens; params {counts}")


def check_sd3_pipeline(out: Path, captions: list[str]) -> None:
    """The folder loads as an SD3 pipeline with the F16 VAE and samples demo-size images with CFG."""
    from d4k_jax.pipelines.sd3 import SD3Pipeline

    pipe = SD3Pipeline.from_pretrained(out, dtype=jnp.float32)
    if pipe.vae.module.config.stride != 2:
        raise ValueError(f"{out}/vae loads without stride 2: {pipe.vae.module.config}")
    text, pooled = pipe.encode_prompt(captions, CLIP_LEN)
    want = ((len(captions), 2 * CLIP_LEN, SD3_T5_WIDTH), (len(captions), SD3_TRANSFORMER["pooled_projection_dim"]))
    if (text.shape, pooled.shape) != want:
        raise ValueError(f"the SD3 conditioning is {text.shape}, {pooled.shape}, not {want}")
    images = pipe(captions, height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=CLIP_LEN)
    if images.shape != (len(captions), SIZE, SIZE, 3) or images.dtype != jnp.uint8:
        raise ValueError(f"the pipeline sampled {images.shape} {images.dtype}")


def check_pipeline(out: Path, captions: list[str]) -> None:
    """The folder loads as a FLUX.1 pipeline with the F16 VAE and samples demo-size images."""
    from d4k_jax.pipelines.flux import FluxPipeline

    pipe = FluxPipeline.from_pretrained(out, dtype=jnp.float32)
    if pipe.vae.module.config.stride != 2:
        raise ValueError(f"{out}/vae loads without stride 2: {pipe.vae.module.config}")
    images = pipe(captions, height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=CLIP_LEN)
    if images.shape != (len(captions), SIZE, SIZE, 3) or images.dtype != jnp.uint8:
        raise ValueError(f"the pipeline sampled {images.shape} {images.dtype}")


def readme(**f: Any) -> str:
    items = [
        f'`vae/`: **trained**. An F16 AutoencoderKL (`"stride": 2` in config.json; diffusers ignores that key and'
        f" would build the F8 decoder): block_out_channels {list(VAE.block_out_channels)}, layers_per_block"
        f" {VAE.layers_per_block}, norm_num_groups {VAE.norm_num_groups}, mid-block attention,"
        f" {VAE.latent_channels} latent channels, so 64x64 images <-> 8x8x{VAE.latent_channels} latents"
        f" ({f['vae_params']:,} parameters, fp32). Trained {f['steps']} steps (batch {f['batch']}, Adam, peak lr"
        f" {f['lr']}, warmup + cosine) on {f['n_train']} demo images (`demo_examples({f['n_train']}, 64,"
        f" seed={f['seed']})`) with the L1 loss of the decoded posterior sample + {f['kl']} x KL per element;"
        f" {f['seconds']:.0f} s on a 2-core CPU. Held-out PSNR (`demo_examples({HELD_OUT}, 64, seed={f['seed'] + 1})`,"
        f" posterior mean, uint8): **{f['psnr']:.2f} dB**. scaling_factor = 1 / std and shift_factor = mean of the"
        " posterior means over 2048 training images.",
        f"`tokenizer/`, `tokenizer_2/`: CLIP and T5 tokenizers over the demo vocabulary ({len(WORDS)} words, one"
        f" token each; CLIP model_max_length {CLIP_LEN}, the longest demo caption is {f['longest']} tokens).",
        f"`text_encoder/` (CLIPTextModel, hidden 32, 2 layers, {f['clip_vocab']} tokens) and `text_encoder_2/`"
        f" (T5EncoderModel, d_model 32, 2 layers, gated-gelu, {f['t5_vocab']} tokens): **random**, seeded, meant"
        f" to stay frozen: a random projection of the tokens still tells the captions apart. {RANDOM_DTYPE} weights.",
        transformer_item(f["counts"]["transformer"]),
        "`scheduler/`: FLUX.1-dev's FlowMatchEulerDiscreteScheduler (dynamic shifting).",
    ]
    bullets = "\n".join(_bullet(item) for item in items)
    return f"""# Demo pipeline (tiny FLUX.1 with an F16 VAE)

A FLUX.1-dev-layout diffusers pipeline folder small enough to train on a CPU in minutes, for `make demo`
and the tests. Made by

    python -m tools.make_demo_pipeline --out=d4k_jax/data/demo_pipeline --seed={f["seed"]} \\
        --vae_steps={f["steps"]} --vae_batch={f["batch"]} --vae_lr={f["lr"]} --kl_weight={f["kl"]} \\
        --train_images={f["n_train"]}

Same flags, same weights (the timing aside). Load it with
`d4k_jax.pipelines.FluxPipeline.from_pretrained(path)`.

{bullets}
"""


def readme_sd3(**f: Any) -> str:
    t, l_, g = SD3_TRANSFORMER, SD3_CLIP_L, SD3_CLIP_G
    vae = f["vae_cfg"]
    items = [
        f'`vae/`: **trained**, a byte-for-byte copy of `{f["vae_from"]}` (the Flux demo\'s F16 VAE, `"stride": 2`,'
        f" {vae['latent_channels']} latent channels, scaling_factor {vae['scaling_factor']}, shift_factor"
        f" {vae['shift_factor']}; how it was trained and how well it reconstructs: that folder's README). Not"
        " retrained; remake this folder whenever the Flux demo's VAE is remade.",
        f"`tokenizer/`, `tokenizer_2/`: the same CLIP tokenizer over the demo vocabulary ({len(WORDS)} words, one"
        f" token each; model_max_length {CLIP_LEN}, the longest demo caption is {f['longest']} tokens);"
        " `tokenizer_3/`: the T5 tokenizer over it.",
        f"`text_encoder/` (CLIP-L stand-in: CLIPTextModelWithProjection, hidden {l_['hidden_size']}, projection"
        f" {l_['projection_dim']}, {l_['hidden_act']}), `text_encoder_2/` (CLIP-G stand-in: hidden"
        f" {g['hidden_size']}, projection {g['projection_dim']}, {g['hidden_act']}), both 2 layers,"
        f" {f['clip_vocab']} tokens, and `text_encoder_3/` (T5EncoderModel, d_model {SD3_T5_WIDTH}, 2 layers,"
        f" gated-gelu, {f['t5_vocab']} tokens): **random**, seeded, meant to stay frozen; {RANDOM_DTYPE} weights."
        f" As in SD3, the CLIP penultimate states ({l_['hidden_size']} + {g['hidden_size']} features) are"
        f" zero-padded to the T5 width {SD3_T5_WIDTH} = joint_attention_dim, and the pooled input is the two"
        f" projections ({t['pooled_projection_dim']}).",
        f"`transformer/`: **random** seeded SD3Transformer2DModel initialisation ({f['counts']['transformer']:,}"
        f" parameters, {RANDOM_DTYPE}): {t['num_layers']} joint blocks, {t['num_attention_heads']} heads x"
        f" {t['attention_head_dim']}, patch {t['patch_size']}, {t['in_channels']} latent channels, sample_size"
        f" {t['sample_size']}, pos_embed_max_size {t['pos_embed_max_size']} (latents up to"
        f" {t['pos_embed_max_size'] * t['patch_size']}x{t['pos_embed_max_size'] * t['patch_size']}); the demo"
        " trainer trains it from here.",
        "`scheduler/`: SD3-medium's FlowMatchEulerDiscreteScheduler (shift 3.0).",
    ]
    bullets = "\n".join(
        textwrap.fill(item, 110, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False) for item in items
    )
    return f"""# Demo pipeline (tiny SD3 with the F16 VAE)

A StableDiffusion3Pipeline-layout diffusers folder small enough to train on a CPU in minutes, the SD3
counterpart of `../demo_pipeline` (`configs/sd3_wlf.py:tiny`). Made by

    python -m tools.make_demo_pipeline --model=sd3 --out=d4k_jax/data/demo_pipeline_sd3 --seed={f["seed"]} \\
        --vae_from={f["vae_from"]}

Same flags, same weights. Load it with `d4k_jax.pipelines.sd3.SD3Pipeline.from_pretrained(path)`.

{bullets}
"""


if __name__ == "__main__":
    app.run(main)
