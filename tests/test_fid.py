"""FID: Inception parity with torch-fidelity (random weights), its key map, the Fréchet distance, statistics."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity_ref
from conftest import LAYER_TOL, MODEL_TOL, rel_err

from conversion import pickled
from conversion.inception import export
from d4k_jax.io import ConversionError
from d4k_jax.io.safetensors_io import TensorSource
from d4k_jax.metrics.fid import FeatureStats, InceptionFeatures, fid, frechet_distance
from d4k_jax.metrics.weights import MissingWeights
from d4k_jax.models.inception import InceptionV3, resize_bilinear_tf1
from d4k_jax.models.inception_keys import checkpoint_rules, variable_shapes
from d4k_jax.models.keymap import to_flax

needs_fidelity = pytest.mark.skipif(not torch_fidelity_ref.AVAILABLE, reason=torch_fidelity_ref.SKIP_REASON)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(weights file, torch-fidelity's extractor loaded from it, ours loaded from its safetensors conversion)."""
    path = torch_fidelity_ref.random_inception_file(tmp_path_factory.mktemp("fid") / "inception.pth")
    return path, torch_fidelity_ref.load_inception(path), InceptionFeatures.from_file(pickled.to_safetensors(path))


def _torch_features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        (out,) = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    return out.numpy()


@needs_fidelity
@pytest.mark.parametrize("src,dst", [((64, 80), (299, 299)), ((333, 333), (299, 299)), ((40, 500), (17, 299))])
def test_resize_matches_torch_fidelity(src, dst):
    x = np.random.default_rng(0).uniform(0, 255, (2, *src, 3)).astype(np.float32)
    ref = torch_fidelity_ref.interpolate_tf1()(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, align_corners=False
    ).permute(0, 2, 3, 1)
    err = rel_err(resize_bilinear_tf1(jnp.asarray(x), dst), ref.numpy())
    print(f"resize {src} -> {dst}: rel err {err:.2e}")
    assert err <= LAYER_TOL


@needs_fidelity
def test_features_match_torch_fidelity(reference):
    _, torch_model, ours = reference
    rng = np.random.default_rng(1)
    for size in [(64, 80), (333, 333)]:
        images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
        ref = _torch_features(torch_model, images)
        got = ours(images)
        assert got.shape == (2, 2048) and got.dtype == jnp.float32
        assert np.abs(ref[0] - ref[1]).max() > 1e-2 * np.abs(ref).max()  # the images matter
        err = rel_err(got, ref)
        print(f"Inception '2048' features {size}: rel err {err:.2e}")
        assert err <= MODEL_TOL


@needs_fidelity
def test_full_size_param_count_and_key_map(reference):
    _, torch_model, _ = reference
    shapes = variable_shapes(InceptionV3())  # jax.eval_shape: no memory
    ours = sum(int(np.prod(s)) for p, s in shapes.items() if p[0] == "params")
    assert ours == sum(p.numel() for p in torch_model.parameters()) == 23_850_960
    state = torch_model.state_dict()
    source = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}
    flat = to_flax(source, checkpoint_rules(shapes, frozenset(source)), shapes)  # raises on any mismatch
    assert set(flat) == set(shapes)


@needs_fidelity
def test_conversion_is_strict(reference):
    _, torch_model, _ = reference
    shapes = variable_shapes(InceptionV3())
    source = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in torch_model.state_dict().items()}
    del source["Mixed_6b.branch7x7_2.bn.running_var"]
    source["Mixed_6b.branch7x7_2.bn.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as missing:
        to_flax(source, checkpoint_rules(shapes, frozenset(source)), shapes)
    assert missing.value.missing == ["Mixed_6b.branch7x7_2.bn.running_var"]
    assert missing.value.unexpected == ["Mixed_6b.branch7x7_2.bn.extra"]
    source = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in torch_model.state_dict().items()}
    source["fc.bias"] = np.zeros(1000, np.float32)
    with pytest.raises(ConversionError, match=re.escape("fc.bias: (1000,) -> (1008,)")):
        to_flax(source, checkpoint_rules(shapes, frozenset(source)), shapes)


@needs_fidelity
def test_safetensors_export_round_trip(reference, tmp_path):
    _, torch_model, ours = reference
    file = export(ours.variables, tmp_path / "inception.safetensors")
    again = InceptionFeatures.from_file(file)  # no torch involved
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), ours.variables, again.variables)
    assert all(jax.tree.leaves(same))
    # torch-fidelity's module reads the export too (its BatchNorm counters are filled in by torch)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in TensorSource([file]).items()}
    torch_model.load_state_dict(tensors, strict=True)


def test_missing_weights(tmp_path):
    for path in (None, "", tmp_path / "nowhere.pth"):
        with pytest.raises(MissingWeights) as e:
            InceptionFeatures.from_file(path)
        assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and "--fid_weights" in str(e.value)
    assert "nowhere.pth" in str(e.value)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula with scipy's sqrtm, float64."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64)) / 8 + 0.5
    b = rng.normal(size=(150, 64)) @ rng.normal(size=(64, 64)) / 8 + rng.normal(size=64) * 0.3
    mu_a, cov_a, mu_b, cov_b = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ref = _scipy_frechet(mu_a, cov_a, mu_b, cov_b)
    err = abs(frechet_distance(mu_a, cov_a, mu_b, cov_b) - ref) / abs(ref)
    print(f"frechet_distance vs scipy sqrtm: rel err {err:.2e} (distance {ref:.4f})")
    assert err <= 1e-6
    assert abs(frechet_distance(mu_a, cov_a, mu_a, cov_a)) <= 1e-9 * np.trace(cov_a)
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu_a, cov_a, mu_b[:10], cov_b)


def test_feature_stats_stream_save_load(tmp_path):
    rng = np.random.default_rng(3)
    feats = (rng.normal(size=(200, 32)) @ rng.normal(size=(32, 32)) + 3).astype(np.float32)
    stats = FeatureStats(32)
    for chunk in np.split(feats, [7, 57]):
        stats.update(chunk)
    assert stats.count == 200
    np.testing.assert_allclose(stats.mean, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    assert loaded.count == 200 and np.array_equal(loaded.outer, stats.outer)
    assert abs(fid(stats, loaded)) <= 1e-9 * np.trace(stats.cov)
    with pytest.raises(ValueError, match=r"features must be \[N, 32\]"):
        stats.update(feats[:, :31])
