"""CLIPScore and the LAION aesthetic predictor against transformers' CLIPModel / CLIPImageProcessor and torch."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_tokenizers
import torch
from conftest import MODEL_TOL, rel_err
from helpers import edited_copy
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from conversion import pickled
from d4k_jax.io import ConversionError
from d4k_jax.io.clip_model import load_clip
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.metrics.aesthetic import Aesthetics
from d4k_jax.metrics.clip_score import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPScore, Preprocess
from d4k_jax.metrics.weights import MissingWeights
from d4k_jax.models.clip_vision import VIT_B_16, VIT_L_14, CLIPVisionModel
from d4k_jax.models.clip_vision_keys import vision_config_from_transformers, vision_rules
from d4k_jax.models.keymap import param_shapes, to_flax

SIZE, MAX_POS = 32, 77
PROJ = 768  # the aesthetic head's input width: one tiny CLIP serves both metrics
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not OpenAI's: CLIPScore must read the folder's
WORDS = tiny_tokenizers.WORDS
CAPTIONS = [
    "a photo of a red cat",
    "the blue sky",
    "a small green square on a large background",
    "dog",
    " ".join(WORDS[i % len(WORDS)] for i in range(100)),  # 102 tokens: cut to the first 77
    "a circle with the sky of a dog",
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(folder, torch CLIPModel): a tiny random CLIPModel saved with its tokenizer and preprocessor config."""
    folder = tiny_tokenizers.clip_tokenizer(tmp_path_factory.mktemp("clip"))
    tok = CLIPTokenizer.from_pretrained(folder)
    text = dict(vocab_size=len(tok), max_position_embeddings=MAX_POS, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(image_size=SIZE, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text | tower, vision_config=vision | tower, projection_dim=PROJ)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):  # not the identity transformers initialises
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    crop = {"height": SIZE, "width": SIZE}
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size=crop, image_mean=MEAN, image_std=STD).save_pretrained(
        folder
    )
    return folder, model


@pytest.fixture(scope="module")
def metric(clip):
    return CLIPScore.from_pretrained(clip[0], batch_size=4)  # 6 pairs: two chunks, the last padded


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


SIZES = [(45, 70), (70, 45), (SIZE, SIZE), (33, 50), (40, 64), (64, 64)]


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_preprocessing_matches_clip_image_processor(clip):
    folder, _ = clip
    ims = images(SIZES)
    ims.append(Image.fromarray(ims[0]).convert("RGBA"))  # converted to RGB as the processor converts it
    want = CLIPImageProcessorPil.from_pretrained(folder)(images=ims, return_tensors="np").pixel_values
    got = Preprocess.from_folder(folder, SIZE)(ims)
    err = float(np.abs(got - want.transpose(0, 2, 3, 1)).max())
    print(f"\npreprocessing vs CLIPImageProcessorPil: max abs error {err:.1e}")
    assert got.dtype == np.float32 and err <= 1e-6


def test_round_crop_is_torchvision_center_crop():
    """40x64 -> 32x51: a 19-column margin, which transformers crops at 9 and torchvision at round(9.5) = 10."""
    (im,) = images([(40, 64)])
    resized = np.asarray(Image.fromarray(im).resize((51, 32), Image.Resampling.BICUBIC))
    want = (resized[:, 10:42].astype(np.float32) / 255 - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    got = Preprocess(SIZE, SIZE, rounding="round")([im])[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.allclose(Preprocess(SIZE, SIZE)([im])[0], want, atol=1e-2)


def test_preprocessor_config_forms(tmp_path):
    old = {"size": 48, "crop_size": SIZE, "image_mean": MEAN, "image_std": STD, "resample": 3, "do_resize": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    assert Preprocess.from_folder(tmp_path, SIZE) == Preprocess(48, SIZE, MEAN, STD)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old | {"resample": 2}))
    with pytest.raises(ValueError, match="resample 3"):
        Preprocess.from_folder(tmp_path, SIZE)
    assert Preprocess.from_folder(tmp_path / "absent", 224) == Preprocess()  # OpenAI's defaults


def test_embeddings_match_transformers(clip, metric):
    _, model = clip
    ims = images(SIZES)
    ids, mask = metric.tokenize(CAPTIONS)
    with torch.no_grad():
        want_img = model.get_image_features(nchw(metric.preprocess(ims))).pooler_output
        want_txt = model.get_text_features(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).pooler_output
    errors = {"image_embeds": rel_err(metric.image_features(ims), want_img)}
    errors["text_embeds"] = rel_err(metric.text_features(CAPTIONS), want_txt)
    print(f"\nCLIP embeddings vs CLIPModel.get_*_features: {errors}")
    assert max(errors.values()) <= MODEL_TOL, errors


def torch_clip_score(folder, model, image, caption):
    """torchmetrics' `_clip_score_update` for one image and caption (as the reference calls it)."""
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=[image], return_tensors="pt").pixel_values
    ids = torch.tensor(CLIPTokenizer.from_pretrained(folder)([caption]).input_ids)[:, :MAX_POS]  # cut, not tokenised
    with torch.no_grad():
        img = model.get_image_features(pixels).pooler_output
        txt = model.get_text_features(ids, torch.ones_like(ids)).pooler_output
    img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
    return float(100 * (img * txt).sum(-1)), ids.shape[1]


def test_scores_match_torchmetrics_computation(clip, metric):
    folder, model = clip
    ims = images(SIZES, seed=1)
    pairs = [torch_clip_score(folder, model, im, c) for im, c in zip(ims, CAPTIONS, strict=True)]
    raw, lengths = zip(*pairs, strict=True)
    want = np.maximum(raw, 0)
    got = metric.scores(ims, CAPTIONS)
    err = rel_err(got, want)
    print(
        f"\nCLIP scores {np.round(got, 3)} vs torch {np.round(want, 3)} (raw {np.round(raw, 3)}): rel error {err:.1e}"
    )
    assert err <= MODEL_TOL
    assert min(raw) < 0 < max(raw)  # the clamp at 0 is exercised
    assert lengths[4] == MAX_POS and len(CLIPTokenizer.from_pretrained(folder)(CAPTIONS[4]).input_ids) > MAX_POS
    # the cut caption is not the caption truncated by the tokenizer (which keeps its end token)
    assert metric.tokenize(CAPTIONS[4:5])[0][0, -1] != 1


def test_uint8_batch_equals_list(metric):
    ims = images([(SIZE + 8, SIZE + 8)] * 3, seed=2)
    np.testing.assert_array_equal(metric.scores(np.stack(ims), CAPTIONS[:3]), metric.scores(ims, CAPTIONS[:3]))
    with pytest.raises(ValueError, match="one caption per image"):
        metric.scores(np.stack(ims), CAPTIONS[:2])
    with pytest.raises(ValueError, match="uint8 RGB"):
        metric.scores(np.stack(ims).astype(np.float32), CAPTIONS[:3])


class ReferenceMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head's layout (its state dict keys are `layers.{0,2,4,6,7}.*`)."""

    def __init__(self):
        super().__init__()
        lin, drop = torch.nn.Linear, torch.nn.Dropout
        self.layers = torch.nn.Sequential(
            lin(768, 1024), drop(0.2), lin(1024, 128), drop(0.2), lin(128, 64), drop(0.1), lin(64, 16), lin(16, 1)
        )

    def forward(self, x):
        return self.layers(x)


def test_aesthetics_match_torch(clip, tmp_path):
    folder, model = clip
    torch.manual_seed(1)
    head = ReferenceMLP().eval()
    with torch.no_grad():  # variance-preserving weights: scores of order 1 (no constant that hides errors)
        for m in head.layers[::2] + head.layers[-1:]:
            m.weight.normal_(0, m.in_features**-0.5)
    state = head.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{t}" for i in (0, 2, 4, 6, 7) for t in ("weight", "bias"))
    torch.save(state, tmp_path / "head.pth")
    save_file({k: v.numpy() for k, v in state.items()}, tmp_path / "head.safetensors")
    ims = images(SIZES, seed=3)
    with pytest.raises(ValueError, match=r"torch pickle.*python -m conversion\.pickled .*head\.pth"):
        Aesthetics.from_files(tmp_path / "head.pth", folder)  # the library unpickles nothing
    metric = Aesthetics.from_files(
        pickled.to_safetensors(tmp_path / "head.pth", tmp_path / "conv.safetensors"), folder, batch_size=4
    )
    pixels = Preprocess(SIZE, SIZE, rounding="round")(ims)  # OpenAI's preprocess (its crop: tested above)
    with torch.no_grad():
        e = model.get_image_features(nchw(pixels)).pooler_output.numpy()
        want = head(torch.from_numpy(e / np.linalg.norm(e, axis=-1, keepdims=True)))[:, 0].numpy()
    got = metric.scores(ims)
    err = rel_err(got, want)
    print(f"\naesthetic scores {np.round(got, 4)} vs torch {np.round(want, 4)}: rel error {err:.1e}")
    assert err <= MODEL_TOL
    np.testing.assert_array_equal(
        Aesthetics.from_files(tmp_path / "head.safetensors", folder, batch_size=4).scores(ims), got
    )


def test_aesthetic_head_is_strict(clip, tmp_path):
    state = {k: v.numpy() for k, v in ReferenceMLP().state_dict().items()}
    state["layers.1.weight"] = state.pop("layers.2.weight")
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match=r"(?s)missing.*layers\.2\.weight.*unexpected.*layers\.1\.weight"):
        Aesthetics.from_files(tmp_path / "bad.safetensors", clip[0])


def test_missing_weights_name_the_file_and_flag(clip, tmp_path):
    folder, _ = clip
    for path, match in [(None, "no a CLIP ViT-B/16 folder"), (tmp_path / "nope", "nope"), (tmp_path, "config.json")]:
        with pytest.raises(MissingWeights, match=rf"(?s){match}.*--clip"):
            CLIPScore.from_pretrained(path)
    with pytest.raises(MissingWeights, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*--aesthetic_head"):
        Aesthetics.from_files(None, folder)
    with pytest.raises(MissingWeights, match=r"head\.pth.*--aesthetic_head"):
        Aesthetics.from_files(tmp_path / "head.pth", folder)
    (tmp_path / "head.pth").touch()
    with pytest.raises(MissingWeights, match=r"CLIP ViT-L/14.*--aesthetic_clip"):
        Aesthetics.from_files(tmp_path / "head.pth", None)


def test_clip_conversion_is_strict(clip, tmp_path):
    folder, _ = clip

    def edit(state):
        state["vision_model.extra.weight"] = state.pop("vision_model.encoder.layers.1.mlp.fc1.weight")

    with pytest.raises(ConversionError, match=r"(?s)missing.*layers\.1\.mlp\.fc1\.weight.*unexpected.*extra"):
        load_clip(edited_copy(folder, tmp_path, edit))


def test_vision_parameters_have_logical_axes(metric):
    vision = metric.parts.vision_module
    boxed = jax.eval_shape(vision.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    with pytest.raises(ValueError, match=rf"pixel_values \[B, {SIZE}, {SIZE}, 3\]"):
        vision.init(jax.random.key(0), jnp.zeros((1, SIZE + 1, SIZE, 3)))


L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
REAL_VISION = {
    # name: (our config, transformers CLIPVisionConfig arguments, parameter count with the projection)
    "vit_b_16": (VIT_B_16, dict(patch_size=16, projection_dim=512), 86_192_640),  # CLIPScore's
    "vit_l_14": (VIT_L_14, L14 | dict(projection_dim=768), 303_966_208),  # the aesthetic predictor's
}


@pytest.mark.parametrize("name", sorted(REAL_VISION))
def test_real_vision_towers_match_transformers_tensor_list(name):
    """openai/clip-vit-base-patch16 and -large-patch14 on the meta device and with `jax.eval_shape`: no memory."""
    ours, kw, count = REAL_VISION[name]
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(CLIPVisionConfig(**kw))
    assert sum(p.numel() for p in ref.parameters()) == count
    assert vision_config_from_transformers(ref.config.to_dict(), kw["projection_dim"]) == ours
    size = ours.image_size
    shapes = param_shapes(CLIPVisionModel(ours, dtype=jnp.bfloat16), (jnp.zeros((1, size, size, 3)),))
    assert sum(int(np.prod(s)) for s in shapes.values()) == count
    nothing = np.zeros((), np.dtype([]))  # zero-byte elements: the stacked rules copy nothing
    source = {k: np.broadcast_to(nothing, tuple(v.shape)) for k, v in ref.state_dict().items()}
    converted = to_flax(source, vision_rules(ours, set(source)), shapes)
    assert {p: a.shape for p, a in converted.items()} == shapes
