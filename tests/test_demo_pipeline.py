"""The committed demo pipelines (d4k_jax/data/demo_pipeline[_sd3], made by tools/make_demo_pipeline.py)."""

import filecmp
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from d4k_jax.data import demo
from d4k_jax.diffusion.flow import SchedulerConfig
from d4k_jax.pipelines.flux import FluxPipeline
from d4k_jax.pipelines.sd3 import SD3Pipeline

FOLDER = Path(demo.__file__).parent / "demo_pipeline"
SD3_FOLDER = Path(demo.__file__).parent / "demo_pipeline_sd3"
UNSEEN_SEED = 4242  # the VAE trained on demo seed 0 and was evaluated on seed 1
MIN_PSNR = 23.5  # dB; 26.1 on these images, 25.6 on the held-out set (README.md); a random VAE ~13


@pytest.fixture(scope="module")
def pipe():
    return FluxPipeline.from_pretrained(FOLDER, dtype=jnp.float32)


def test_samples_demo_images(pipe):
    captions = [c for _, c in demo.demo_examples(3, 8, seed=UNSEEN_SEED)]
    images = pipe(captions, height=64, width=64, num_inference_steps=2, max_sequence_length=16)
    assert images.shape == (3, 64, 64, 3) and images.dtype == jnp.uint8
    assert pipe.vae[0].config.stride == 2 and pipe.vae[0].config.downsample_factor == 8
    assert pipe.scheduler == SchedulerConfig(shift=3.0, use_dynamic_shifting=True)  # scheduler/: FLUX.1-dev's
    text, pooled = pipe.encode_prompt(captions, 16)
    assert text.shape == (3, 16, 32) and pooled.shape == (3, 32)
    assert np.abs(np.asarray(pooled[0] - pooled[1])).max() > 1e-2  # random encoders still tell captions apart


def test_vae_reconstructs_unseen_images(pipe):
    vae, params = pipe.vae
    originals = np.stack([img for img, _ in demo.demo_examples(16, 64, seed=UNSEEN_SEED)])
    mean, _ = vae.apply({"params": params}, jnp.asarray(originals / 127.5 - 1, jnp.float32), method="encode")
    recon = np.asarray(vae.apply({"params": params}, mean, method="decode"))
    recon = np.round(np.clip(recon / 2 + 0.5, 0, 1) * 255)
    mse = ((originals - recon) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0**2 / mse)))
    assert psnr > MIN_PSNR, psnr
    normalised = (np.asarray(mean) - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(normalised.mean()) < 0.25 and 0.7 < normalised.std() < 1.4  # what the transformer trains on


def test_demo_captions_tokenize_whole(pipe):
    clip, t5 = pipe.tokenizer.tokenizer, pipe.tokenizer_2.tokenizer
    for caption in sorted({c for _, c in demo.demo_examples(1000, 8, seed=UNSEEN_SEED)}):
        words = caption.split()
        ids = clip(caption).input_ids  # one token a word between start and end, none the unknown (= end) token
        assert len(ids) == len(words) + 2 <= clip.model_max_length, (caption, ids)
        assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
        assert clip.unk_token_id not in ids[1:-1], (caption, ids)
        ids = t5(caption).input_ids
        assert len(ids) == len(words) + 1 and t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id, caption


def test_sd3_folder_loads_and_samples_with_cfg():
    vae_files = ["config.json", "diffusion_pytorch_model.safetensors"]
    assert filecmp.cmpfiles(FOLDER / "vae", SD3_FOLDER / "vae", vae_files, shallow=False)[0] == vae_files
    pipe = SD3Pipeline.from_pretrained(SD3_FOLDER, dtype=jnp.float32)  # every component loads strictly
    assert pipe.vae[0].config.stride == 2 and pipe.transformer[0].config.in_channels == 8
    assert pipe.scheduler == SchedulerConfig(shift=3.0)  # scheduler/: SD3-medium's
    captions = [c for _, c in demo.demo_examples(2, 8, seed=UNSEEN_SEED)]
    text, pooled = pipe.encode_prompt(captions, 16)
    assert text.shape == (2, 32, 96) and pooled.shape == (2, 80)  # CLIP 32 + 48 padded to T5's 96; 32 + 48
    assert np.abs(np.asarray(pooled[0] - pooled[1])).max() > 1e-2
    images = pipe(captions, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=16)
    assert images.shape == (2, 64, 64, 3) and images.dtype == jnp.uint8
