"""LPIPS parity against the `lpips` package (random weights, through our key maps), strict loading, and
MissingWeights. torchvision is not installable here: `torchvision_shim` stands in for it (see its docstring)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision_shim
from conftest import LAYER_TOL, MODEL_TOL, rel_err
from helpers import nchw, nhwc

from conversion import pickled
from d4k_jax.io.metric_nets import load_lpips
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.metrics.lpips import LPIPSMetric
from d4k_jax.metrics.weights import MissingWeights
from d4k_jax.models.keymap import ConversionError
from d4k_jax.models.lpips import Backbone
from d4k_jax.models.lpips_keys import to_params, to_state_dicts

lpips = torchvision_shim.import_lpips()

NETS = ("vgg", "alex")
SIZES = ((64, 64), (48, 80))


def _reference(net: str) -> lpips.LPIPS:
    """lpips.LPIPS with every weight random: He-scaled convs, small biases, non-negative heads (as trained)."""
    model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False).eval()
    gen = torch.Generator().manual_seed(len(net))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lin"):
                p.copy_(torch.rand(p.shape, generator=gen))
            elif p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _state_dicts(model: lpips.LPIPS) -> tuple[dict, dict]:
    """(torchvision-named backbone state dict with a classifier entry, lpips heads state dict)."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    # lpips keeps torchvision's indices: net.slice{s}.{i}.weight is features.{i}.weight
    backbone = {"features." + k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("net.")}
    backbone["classifier.0.weight"] = np.zeros((4, 2), np.float32)  # real files carry the classifier
    # lin{k} and lins.{k} are one module twice; lpips' shipped heads files hold only lin{k}
    return backbone, {k: v for k, v in sd.items() if k.startswith("lin") and not k.startswith("lins.")}


@pytest.fixture(scope="module", params=NETS)
def case(request, tmp_path_factory):
    net = request.param
    model = _reference(net)
    backbone, heads = _state_dicts(model)
    folder = tmp_path_factory.mktemp(net)
    torch.save({k: torch.from_numpy(v) for k, v in backbone.items()}, folder / "backbone.pth")
    save_file(heads, folder / "heads.safetensors")  # the torch-free reader
    backbone_file = pickled.to_safetensors(folder / "backbone.pth")  # as users convert torchvision's file once
    return net, model, LPIPSMetric.from_files(backbone_file, folder / "heads.safetensors", net)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_distance_matches_lpips(case, size):
    net, model, metric = case
    rng = np.random.default_rng(size[1])
    a = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    b[1] = rng.integers(0, 256, b[1].shape)  # one close pair, one unrelated pair
    with torch.no_grad():
        want = model(nchw(a / 127.5 - 1.0), nchw(b / 127.5 - 1.0)).numpy().reshape(-1)  # im2tensor's range
    got = np.asarray(metric(jnp.asarray(a), jnp.asarray(b)))
    err = rel_err(got, want)
    print(f"LPIPS {net} {size}: ours {got} lpips {want} rel err {err:.2e}")
    assert got.dtype == np.float32 and got.shape == (2,)
    assert err <= MODEL_TOL
    assert want[0] < want[1]  # the test has teeth: distances differ between the pairs


def test_backbone_taps_match(case):
    net, model, metric = case
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        scaled = model.scaling_layer(nchw(x))
        want = [nhwc(t) for t in model.net(scaled)]
    got = Backbone(net).apply({"params": metric.params["features"]}, jnp.asarray(nhwc(scaled)))
    errs = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
    print(f"LPIPS {net} backbone taps rel err: {[f'{e:.1e}' for e in errs]}")
    assert errs[0] <= LAYER_TOL  # the first tap is one (vgg: two) conv layers
    assert max(errs) <= MODEL_TOL


def test_conversion_is_strict_and_invertible(case):
    net, model, metric = case
    backbone, heads = _state_dicts(model)
    out_backbone, out_heads = to_state_dicts(metric.params, net)
    assert (
        out_backbone.keys() == {k for k in backbone if k.startswith("features.")} and out_heads.keys() == heads.keys()
    )
    assert all(np.array_equal(out_heads[k], heads[k]) for k in heads)
    assert all(np.array_equal(out_backbone[k], backbone[k]) for k in out_backbone)
    with pytest.raises(ConversionError, match=r"features\.0\.bias"):  # missing
        to_params({k: v for k, v in backbone.items() if k != "features.0.bias"}, heads, net)
    with pytest.raises(ConversionError, match=r"lin9\.model\.1\.weight"):  # unexpected
        to_params(backbone, {**heads, "lin9.model.1.weight": heads["lin0.model.1.weight"]}, net)
    with pytest.raises(ConversionError, match=r"lin0\.model\.1\.weight: \(2, 1\)"):  # mis-shaped
        to_params(backbone, {**heads, "lin0.model.1.weight": np.zeros((1, 2, 1, 1), np.float32)}, net)
    with pytest.raises(ConversionError, match=r"features\.\d+\.weight"):  # the other net's backbone
        to_params(_state_dicts(_reference("alex" if net == "vgg" else "vgg"))[0], heads, net)


def test_missing_weights_name_the_file_and_flag(tmp_path):
    with pytest.raises(
        MissingWeights, match=r"no LPIPS backbone \(torchvision vgg16-397923af\.pth\).*--lpips_backbone"
    ):
        LPIPSMetric.from_files(None, tmp_path, "vgg")
    with pytest.raises(MissingWeights, match=r"alexnet-owt-7be5be79\.pth.*nope\.pth.*--lpips_backbone"):
        LPIPSMetric.from_files(tmp_path / "nope.pth", tmp_path, "alex")
    with pytest.raises(MissingWeights, match=r"lpips/weights/v0\.1/vgg\.pth.*--lpips_heads"):
        LPIPSMetric.from_files(tmp_path, "", "vgg")
    with pytest.raises(ValueError, match="squeeze"):
        LPIPSMetric.from_files(tmp_path, tmp_path, "squeeze")
    with pytest.raises(ValueError, match=r"\.safetensors file \(or a \.pth"):
        load_lpips(tmp_path / "x.npz", tmp_path / "y.npz", "vgg")
