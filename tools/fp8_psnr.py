"""How much FP8 sampling (d4k_jax/nn/fp8.py) changes the images of a trained model, next to what bf16 alone changes.

    python -m tools.fp8_psnr [--pipeline=DIR] [--size=64] [--steps=4] [--images=4]

Samples the same captions from the same noise in fp32, fp32 + FP8, bf16 and bf16 + FP8 and prints the PSNR
(uint8 images) of each pair that matters. The default pipeline is the committed demo one (a trained tiny Flux),
so this runs anywhere; BENCHMARKS.md ("FP8 sampling") records its figures. With a real FLUX.1-dev / SD3 folder on
a GPU it gives the same table at full size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from d4k_jax.data import demo
from d4k_jax.pipelines import pipeline_class

# (dtype, fp8) against (dtype, fp8): FP8's change in fp32, bf16's own change, FP8's change in bf16
PAIRS = [
    ("float32", False, "float32", True),
    ("float32", False, "bfloat16", False),
    ("bfloat16", False, "bfloat16", True),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def sample(pipeline: str, model: str, dtype: str, fp8: bool, size: int, steps: int, images: int, length: int):
    """uint8 images [images, size, size, 3] of the demo captions (seed 7), from the pipelines' default noise."""
    captions = [c for _, c in demo.demo_examples(images, 8, seed=7)]
    pipe = pipeline_class(model).from_pretrained(pipeline, dtype=jnp.dtype(dtype), fp8=fp8)
    assert pipe.transformer.module.config.fp8 is fp8
    out = pipe(captions, height=size, width=size, num_inference_steps=steps, max_sequence_length=length)
    return np.asarray(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(Path(demo.__file__).parent / "demo_pipeline"))
    parser.add_argument("--model", default="flux", choices=["flux", "sd3"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max_sequence_length", type=int, default=16, help="the demo's captions are short")
    args = parser.parse_args(argv)
    settings = (args.size, args.steps, args.images, args.max_sequence_length)
    runs = {(d, f) for pair in PAIRS for d, f in (pair[:2], pair[2:])}
    images = {(d, f): sample(args.pipeline, args.model, d, f, *settings) for d, f in runs}
    name = lambda dtype, fp8: dtype + (" + FP8" if fp8 else "")
    print(f"{args.pipeline}: {args.images} images at {args.size}², {args.steps} steps, the same noise")
    for a_dtype, a_fp8, b_dtype, b_fp8 in PAIRS:
        value = psnr(images[a_dtype, a_fp8], images[b_dtype, b_fp8])
        print(f"  {name(a_dtype, a_fp8):>10} vs {name(b_dtype, b_fp8):<16} PSNR {value:.2f} dB")


if __name__ == "__main__":
    main()
