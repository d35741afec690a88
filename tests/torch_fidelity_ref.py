"""torch-fidelity's FID Inception as the reference, without torchvision and without any download.

`import torch_fidelity` runs a package __init__ that imports torchvision, which cannot be installed
next to the CPU torch here; the two modules used below import only torch, so a bare package module
stands in for the real one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import torch

# torch-fidelity 0.4.0 declares torchvision as a dependency; a plain `pip install` of it pulls the PyPI
# torchvision, whose compiled ops fail to load against this CPU torch and then break transformers'
# imports. So it has to be installed with --no-deps, and the tests using it say so when it is absent.
AVAILABLE = importlib.util.find_spec("torch_fidelity") is not None
SKIP_REASON = "torch-fidelity==0.4.0 is not installed (pip install --no-deps torch-fidelity==0.4.0)"


def module(name: str) -> types.ModuleType:
    """`torch_fidelity.<name>`, imported without running torch_fidelity/__init__.py."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    return importlib.import_module(f"torch_fidelity.{name}")


def inception_class() -> type:
    return module("feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def interpolate_tf1():
    return module("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x


def random_inception_file(path: Path, seed: int = 0) -> Path:
    """Save the state dict of a randomly initialised FeatureExtractorInceptionV3 to `path` (.pth).

    BatchNorm statistics are first set from one batch of random images (so activations keep a sane
    scale through 94 layers), then perturbed, and the affine parameters randomised, so every running
    statistic and scale changes the output.
    """
    mod = module("feature_extractor_inceptionv3")
    torch.manual_seed(seed)

    # __init__ always loads weights (downloading them without a path): replace the download by
    # nothing and skip the load, keeping the random initialisation.
    with (
        mock.patch.object(mod, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(mod.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        model = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0  # running stats := this batch's stats
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8))
        for bn in bns:
            c = bn.num_features
            bn.running_var.mul_(torch.empty(c).uniform_(0.5, 2.0))
            bn.running_mean.add_(0.2 * torch.randn(c) * bn.running_var.sqrt())
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    torch.save(model.state_dict(), path)
    return path


def load_inception(path: Path) -> torch.nn.Module:
    """torch-fidelity's extractor of the '2048' features, loaded by its own code from `path`."""
    return inception_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
