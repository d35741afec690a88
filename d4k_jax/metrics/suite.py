"""The named metrics as streaming accumulators, shared by `d4k_jax.evaluate` and the training evaluation.

A metric whose network weights are not configured is recorded as not computed with the reason, never
scored with random weights. Results are `{name: {"value": float, "count": n}}` or
`{name: {"not_computed": reason}}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from d4k_jax.metrics import across, compression, glcm, recon
from d4k_jax.metrics.aesthetic import Aesthetics
from d4k_jax.metrics.clip_score import CLIPScore
from d4k_jax.metrics.fid import FeatureStats, InceptionFeatures, fid
from d4k_jax.metrics.lpips import LPIPSMetric
from d4k_jax.metrics.weights import MissingWeights

GENERATION = ("glcm", "cr", "fid", "clip", "aesthetics")
RECONSTRUCTION = ("rfid", "nmse", "psnr", "ssim", "lpips")


@dataclasses.dataclass
class Weights:
    """User-supplied weight files; empty = not configured."""

    fid: str = ""  # pt_inception-2015-12-05-6726825d.pth
    clip: str = ""  # CLIP ViT-B/16 transformers folder
    aesthetic_head: str = ""  # sac+logos+ava1-l14-linearMSE.pth
    aesthetic_clip: str = ""  # CLIP ViT-L/14 transformers folder
    lpips_backbone: str = ""  # torchvision vgg16 / alexnet state dict
    lpips_heads: str = ""  # lpips v0.1 linear heads
    lpips_net: str = "vgg"


class Metrics:
    """Accumulates `names` over batches: `update(images, captions)` for generated images, `update_pairs`
    for (original, reconstruction) pairs. Networks load once, here."""

    def __init__(
        self,
        names: Sequence[str],
        weights: Weights,
        reference: FeatureStats | None = None,
        nets: Mapping[str, Any] | None = None,
    ):
        """`nets`: networks already loaded, by metric name (e.g. the FID network that measured the reference)."""
        unknown = set(names) - set(GENERATION) - set(RECONSTRUCTION)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {GENERATION + RECONSTRUCTION}")
        self.names, self.reference = list(names), reference
        self.not_computed: dict[str, str] = {}
        self.nets = dict(nets or {})
        self.reset()
        loaders = {
            "fid": lambda: InceptionFeatures.from_file(weights.fid),
            "rfid": lambda: InceptionFeatures.from_file(weights.fid),
            "clip": lambda: CLIPScore.from_pretrained(weights.clip),
            "aesthetics": lambda: Aesthetics.from_files(weights.aesthetic_head, weights.aesthetic_clip),
            "lpips": lambda: LPIPSMetric.from_files(weights.lpips_backbone, weights.lpips_heads, net=weights.lpips_net),
        }
        for name in self.names:
            if name in loaders and name not in self.nets:
                try:
                    self.nets[name] = loaders[name]()
                except MissingWeights as e:
                    self.not_computed[name] = str(e)
        if "fid" in self.names and reference is None and "fid" not in self.not_computed:
            self.not_computed["fid"] = "no reference images (--reference) or statistics (--fid_reference_stats)"

    def reset(self) -> None:
        """Empties the accumulators (the networks stay loaded), e.g. between training evaluations."""
        self.values: dict[str, list[float]] = {n: [] for n in self.names}
        self.totals: dict[str, tuple[float, int]] = {}  # (sum, count) of `values` over processes, once reduced
        self.ratio = compression.CompressionRatio()
        self.stats = {k: FeatureStats() for k in ("generated", "original", "reconstructed")}

    def _on(self, name: str) -> bool:
        return name in self.names and name not in self.not_computed

    def update(self, images: Sequence[np.ndarray], captions: Sequence[str | None] | None = None, jpeg=None) -> None:
        """Generated uint8 images [H, W, 3]; `jpeg[i]`, where given, is image i's saved JPEG file (measured
        as it is, as the reference measures its saved files); other images are saved at q95 first."""
        if self._on("glcm") or self._on("cr"):
            for i, image in enumerate(images):
                data = (jpeg[i] if jpeg else None) or compression.jpeg_bytes(image)
                self.ratio.update(image.shape, len(data))
                if self._on("glcm") and min(image.shape[:2]) < glcm.PATCH:
                    self.not_computed["glcm"] = f"images of {image.shape[0]}x{image.shape[1]} hold no 64x64 patch"
                if self._on("glcm"):
                    self.values["glcm"] += glcm.glcm_scores([compression.decode_jpeg(data)], jpeg=False).tolist()
        if self._on("fid"):
            self.stats["generated"].update(np.asarray(self.nets["fid"](np.stack(images))))
        if self._on("clip"):
            if captions is None or any(c is None for c in captions):
                self.not_computed["clip"] = "no captions (a metadata.jsonl with 'text' beside the images)"
            else:
                self.values["clip"] += self.nets["clip"].scores(list(images), list(captions)).tolist()
        if self._on("aesthetics"):
            self.values["aesthetics"] += self.nets["aesthetics"].scores(list(images)).tolist()

    def update_pairs(self, originals: np.ndarray, reconstructions: np.ndarray) -> None:
        """uint8 [B, S, S, 3] originals and their reconstructions."""
        for name, fn in (("psnr", recon.psnr), ("ssim", recon.ssim), ("nmse", recon.nmse)):
            if self._on(name):
                self.values[name] += np.asarray(fn(originals, reconstructions), np.float64).tolist()
        if self._on("lpips"):
            self.values["lpips"] += np.asarray(self.nets["lpips"](originals, reconstructions)).tolist()
        if self._on("rfid"):
            self.stats["original"].update(np.asarray(self.nets["rfid"](originals)))
            self.stats["reconstructed"].update(np.asarray(self.nets["rfid"](reconstructions)))

    def _stats_in_use(self) -> list[str]:
        # from the names alone, never from not_computed (which may differ between processes): every process
        # must send the same arrays
        return [
            k for k, on in (("generated", "fid"), ("original", "rfid"), ("reconstructed", "rfid")) if on in self.names
        ]

    def reduce_across_processes(self) -> None:
        """Every process's accumulators become the totals over all processes' images (each measured its share
        of the set); a metric not computed on any process is not computed, with the first process's reason.
        Every process must call it; with one process it changes nothing."""
        if jax.process_count() == 1:
            return
        counts = [len(self.values[n]) for n in self.names]
        r = self.ratio
        flat = [np.sum(self.values[n]) if self.values[n] else 0.0 for n in self.names] + counts
        flat += [r.raw_bytes, r.jpeg_bytes, r.count] + [self.stats[k].count for k in self._stats_in_use()]
        flat = across.total(np.array(flat, np.float64))
        k = len(self.names)
        self.totals = {n: (float(flat[i]), int(flat[k + i])) for i, n in enumerate(self.names)}
        r.raw_bytes, r.jpeg_bytes, r.count = (int(v) for v in flat[2 * k : 2 * k + 3])
        for i, key in enumerate(self._stats_in_use()):
            stats = self.stats[key]
            stats.count, stats.sum, stats.outer = (
                int(flat[2 * k + 3 + i]),
                across.total(stats.sum),
                across.total(stats.outer),
            )
        reasons: dict[str, str] = {}
        for theirs in across.gather_json(self.not_computed):
            reasons = {**theirs, **reasons}  # the first process's reason wins
        self.not_computed = {n: reasons[n] for n in self.names if n in reasons}

    def _mean(self, name: str) -> dict:
        total, count = self.totals.get(name) or (float(np.sum(self.values[name])), len(self.values[name]))
        return {"value": total / count, "count": count} if count else {"not_computed": "no images"}

    def result(self) -> dict[str, dict]:
        out = {}
        for name in self.names:
            if name in self.not_computed:
                out[name] = {"not_computed": self.not_computed[name]}
            elif name == "cr":
                count = self.ratio.count
                out[name] = {"value": self.ratio.value, "count": count} if count else {"not_computed": "no images"}
            elif name in ("fid", "rfid"):
                pair = ("generated", None) if name == "fid" else ("original", "reconstructed")
                a, b = self.stats[pair[0]], self.stats[pair[1]] if pair[1] else self.reference
                if min(a.count, b.count) < 2:
                    out[name] = {"not_computed": f"needs 2 or more images per set (have {a.count}, {b.count})"}
                else:
                    out[name] = {"value": fid(a, b), "count": a.count}
            else:
                out[name] = self._mean(name)
        return out
