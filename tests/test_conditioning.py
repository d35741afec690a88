"""Text conditioning: our tokenizers + Flax CLIP / T5 equal diffusers' FluxPipeline and
StableDiffusion3Pipeline `encode_prompt`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from helpers import save_component
from tiny_pipelines import CLIP_LEN, clip_model, t5_model
from tiny_tokenizers import clip_tokenizer, t5_tokenizer
from torch_flux import make_flux
from torch_sd3 import make_sd3
from torch_vae import make_vae
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from d4k_jax.io import load_component
from d4k_jax.pipelines.conditioning import flux_conditioning, sd3_conditioning
from d4k_jax.pipelines.tokenizer import Tokenizer

PROMPTS = ["a red cat on the sky", "a photo of a small dog with a large blue square on a green background"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return clip_tokenizer(root / "clip", model_max_length=CLIP_LEN), t5_tokenizer(root / "t5")


def _load(model, folder):
    return load_component(save_component(model, folder))


@pytest.mark.parametrize("max_sequence_length", [10, 24])
def test_flux_matches_pipeline(folders, tmp_path, max_sequence_length):
    clip_tok, t5_tok = folders
    clip, t5 = clip_model(CLIPTextModel, 12), t5_model(24)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=make_vae(latent_channels=4),
        text_encoder=clip,
        tokenizer=AutoTokenizer.from_pretrained(clip_tok),
        text_encoder_2=t5,
        tokenizer_2=AutoTokenizer.from_pretrained(t5_tok),
        transformer=make_flux(joint_attention_dim=24, pooled_projection_dim=12),
    )
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=max_sequence_length)
    clip_ids, t5_ids = Tokenizer(clip_tok)(PROMPTS), Tokenizer(t5_tok, max_sequence_length)(PROMPTS)
    assert clip_ids.shape == (2, CLIP_LEN) and t5_ids.shape == (2, max_sequence_length)
    text, ours_pooled = flux_conditioning(_load(clip, tmp_path / "l"), clip_ids, _load(t5, tmp_path / "t5"), t5_ids)
    assert rel_err(ours_pooled, pooled.numpy()) < MODEL_TOL
    assert rel_err(text, embeds.numpy()) < MODEL_TOL


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_matches_pipeline(folders, tmp_path, with_t5):
    clip_tok, t5_tok = folders
    clip_l = clip_model(CLIPTextModelWithProjection, 12, projection_dim=12, seed=1)
    clip_g = clip_model(CLIPTextModelWithProjection, 16, act="gelu", projection_dim=16, seed=2)
    t5 = t5_model(32, seed=3) if with_t5 else None
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=make_vae(latent_channels=4),
        text_encoder=clip_l,
        tokenizer=AutoTokenizer.from_pretrained(clip_tok),
        text_encoder_2=clip_g,
        tokenizer_2=AutoTokenizer.from_pretrained(clip_tok),
        text_encoder_3=t5,
        tokenizer_3=AutoTokenizer.from_pretrained(t5_tok) if with_t5 else None,
        transformer=make_sd3(joint_attention_dim=32, pooled_projection_dim=28),
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=20
        )
    clip_ids = Tokenizer(clip_tok)(PROMPTS)
    t5_ids = Tokenizer(t5_tok, 20)(PROMPTS)
    ours_t5 = _load(t5, tmp_path / "t5") if with_t5 else None
    text, ours_pooled = sd3_conditioning(
        _load(clip_l, tmp_path / "l"), clip_ids, _load(clip_g, tmp_path / "g"), clip_ids, ours_t5, t5_ids, t5_width=32
    )
    assert text.shape == (2, CLIP_LEN + 20, 32) and ours_pooled.shape == (2, 28)
    assert rel_err(ours_pooled, pooled.numpy()) < MODEL_TOL
    assert rel_err(text, embeds.numpy()) < MODEL_TOL


def test_truncation_warns_with_the_removed_text(folders, caplog):
    _, t5_tok = folders
    with caplog.at_level("WARNING"):
        ids = Tokenizer(t5_tok, 6)(PROMPTS)
    assert ids.shape == (2, 6) and np.all(ids[:, -1] == 1)  # truncated sequences still end with </s>
    assert "removed" in caplog.text and "background" in caplog.text


def test_tokenizer_errors(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        Tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no prompts"):
        Tokenizer(folders[0])([])
    assert jnp.asarray(Tokenizer(folders[0])("a cat")).shape == (1, CLIP_LEN)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer(tmp_path / "bad")


# Spaces, case, punctuation, digits, unicode, a special token's text, and a prompt longer than CLIP_LEN.
ODD_PROMPTS = ["", "  A  RED\tcat!! on\nthe sky ", "cat, dog; 2 dogs (small)", "café ☀ 日本", "a <|endoftext|> cat"]
ODD_PROMPTS += [" ".join(["green square"] * 30)]


def _auto_ids(folder, length: int) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(folder)
    return np.asarray(tok(ODD_PROMPTS, padding="max_length", max_length=length, truncation=True).input_ids)


def test_tokenizer_is_autotokenizers_class_with_its_ids(folders, tmp_path):
    """Our Tokenizer imports CLIP's / T5's class itself (not through AutoTokenizer, which imports torch): the
    class AutoTokenizer picks, also for a tokenizer_config naming the pre-v5 "...Fast" class."""
    for folder, length in [(folders[0], CLIP_LEN), (folders[1], 24)]:
        fast = shutil.copytree(folder, tmp_path / f"{folder.name}_fast")
        config = json.loads((fast / "tokenizer_config.json").read_text())
        config["tokenizer_class"] += "Fast"
        (fast / "tokenizer_config.json").write_text(json.dumps(config))
        for f in (folder, fast):
            assert type(Tokenizer(f).tokenizer) is type(AutoTokenizer.from_pretrained(f))
            np.testing.assert_array_equal(Tokenizer(f, length)(ODD_PROMPTS), _auto_ids(f, length))


def test_tokenizers_and_metric_writer_load_without_torch(folders, tmp_path):
    """The command-line programs build their tokenizers and TensorBoard writer without importing torch (~4 s a
    process)."""
    code = (
        "import json, sys; import numpy as np; from d4k_jax.metric_writers import MetricWriter; "
        "from d4k_jax.pipelines.tokenizer import Tokenizer; "
        f"ids = [Tokenizer(f, n)(json.loads(sys.argv[1])).tolist() for f, n in [({str(folders[0])!r}, {CLIP_LEN}), "
        f"({str(folders[1])!r}, 24)]]; w = MetricWriter({str(tmp_path)!r}).__enter__(); "
        "w.write(dict(step=1, loss=0.5)); w.images(1, 'grid', np.zeros((1, 4, 4, 3), np.uint8)); w.__exit__(); "
        "print(json.dumps([ids, 'torch' in sys.modules]))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ODD_PROMPTS)], capture_output=True, text=True, cwd=root
    )
    assert out.returncode == 0, out.stderr
    (clip_ids, t5_ids), imported_torch = json.loads(out.stdout.splitlines()[-1])
    assert not imported_torch
    np.testing.assert_array_equal(clip_ids, _auto_ids(folders[0], CLIP_LEN))
    np.testing.assert_array_equal(t5_ids, _auto_ids(folders[1], 24))
