"""A minimal stand-in for `torchvision.models`, so that the `lpips` package imports without torchvision.

Why: `lpips/pretrained_networks.py` starts with `from torchvision import models as tv`, but torchvision
cannot be installed next to the CPU torch wheel this project pins (the PyPI torchvision wheel fails to
import with it). lpips only calls `tv.vgg16(pretrained=...).features` and `tv.alexnet(pretrained=...).features`
for the nets our parity tests use (squeezenet and resnets are looked up only when chosen), so this module
provides exactly those two constructors, randomly initialised, with `features` laid out index for index as
torchvision's (VGG16 cfg "D", AlexNet), so the `features.{i}.*` state-dict keys are the real ones.
Pretrained weights are refused: tests never download anything.

Import lpips through `import_lpips()`. The shim stands in even where some torchvision is installed: the
PyPI wheel that lpips' own requirement pulls in fails to import with this torch ("operator torchvision::nms
does not exist") and, once installed, also breaks transformers' CLIPTextModel import.
"""

from __future__ import annotations

import sys
import types

from torch import nn

_VGG16_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class _Net(nn.Module):
    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features  # the classifier is left out: lpips uses `features` only


def _no_weights(name: str, pretrained: bool = False, weights: object = None, **kwargs: object) -> None:
    if pretrained or weights is not None:
        raise RuntimeError(f"torchvision_shim.{name}: pretrained weights are not available in tests")


def vgg16(*, pretrained: bool = False, weights: object = None, **kwargs: object) -> _Net:
    _no_weights("vgg16", pretrained, weights)
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16_D:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return _Net(nn.Sequential(*layers))


def alexnet(*, pretrained: bool = False, weights: object = None, **kwargs: object) -> _Net:
    _no_weights("alexnet", pretrained, weights)
    return _Net(
        nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
    )


def import_lpips() -> types.ModuleType:
    """`import lpips` with this shim as `torchvision` during the import only.

    lpips keeps its own reference to the shim (`pretrained_networks.tv`); the shim is taken out of
    sys.modules again so that no other library (transformers and diffusers probe for torchvision) sees it.
    """
    if "lpips" in sys.modules:
        return sys.modules["lpips"]
    names = ("torchvision", "torchvision.models")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.vgg16, models.alexnet = vgg16, alexnet
    package.models = models
    sys.modules.update(zip(names, (package, models), strict=True))
    try:
        import lpips
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    return lpips
