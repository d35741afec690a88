"""GLCM Score throughput: `python -m tools.bench_glcm [--size=2048 --batch=4] [--reference]`.

Times d4k_jax's batched JAX GLCM on the default backend and, with `--reference`, the reference's
per-patch Python loop (skimage graycomatrix + shannon_entropy, as Diffusion-4K evaluates) on the same
grayscale images. The JPEG-q95 round trip both share is timed apart. Results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

from tools.bench import _timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time the reference loop (slow)")
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from d4k_jax.metrics import compression
    from d4k_jax.metrics import glcm as glcm_lib

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : args.size, 0 : args.size] / args.size
    base = 127 + 100 * np.sin(40 * x * y)[..., None] * np.array([1.0, 0.8, 0.6])  # texture, not pure noise
    images = [np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8) for _ in range(args.batch)]
    t = time.perf_counter()
    decoded = [compression.jpeg_round_trip(im)[0] for im in images]
    jpeg_s = (time.perf_counter() - t) / args.batch
    gray = np.stack([np.asarray(glcm_lib.opencv_gray(im)) for im in decoded])

    def reference():
        from skimage.feature import graycomatrix
        from skimage.measure import shannon_entropy

        for g in gray // 4:
            patches = [g[i : i + 64, j : j + 64] for i in range(0, args.size, 64) for j in range(0, args.size, 64)]
            np.mean([shannon_entropy(graycomatrix(p, [1, 2, 3, 4], glcm_lib.ANGLES, 64, normed=True)) for p in patches])

    ours = lambda: glcm_lib.glcm_scores_gray(gray).block_until_ready()
    ours()  # compile
    runs = [("d4k_jax (JAX)", ours, args.repeats)] + ([("reference loop", reference, 1)] if args.reference else [])
    for name, run, repeats in runs:
        seconds = _timings(run, repeats, warmup=0) / args.batch
        print(f"{name:15s} GLCM at {args.size}² on {jax.devices()[0].device_kind}: {1 / seconds:.2f} images/s")
    print(f"JPEG-q95 round trip (PIL, shared by both): {1 / jpeg_s:.2f} images/s")


if __name__ == "__main__":
    main()
