"""Per-device memory and collectives of one full-size transformer block under sequence parallelism (nn.ulysses),
read from the compiled program; nothing is executed, so it runs on 8 fake CPU devices:

  JAX_PLATFORMS=cpu python -m tools.sequence_parallel --degrees=1,2,4,8

For FLUX.1-dev (double and single block, 512 text tokens) and SD3-medium (joint block, 77 + 256 text tokens) at
4096² with the F16 VAE (16,384 image tokens), bf16, batch 1, parameters replicated: the compiled forward's
per-device memory (arguments + temporaries + outputs), and each collective's count and bytes per device (the
sizes of its results, at bf16: the CPU compiler widens them to f32), against Ulysses' analytic all-to-all
volume, 4 x B x L x D / degree elements per attention and device (q, k, v, o; plus the text's
4 x B x T x D / degree when its length divides the degree).
`--train` compiles the block's forward and backward instead (what a training step holds per block).
"""

from __future__ import annotations

import os

if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":  # before jax: 8 fake devices to compile for
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from d4k_jax import sharding
from d4k_jax.models.flux import DoubleBlock, FluxConfig, SingleBlock
from d4k_jax.models.mmdit import JointBlock, MMDiTConfig
from d4k_jax.nn.ulysses import token_axes

BLOCKS = flags.DEFINE_multi_string("blocks", ["flux_double", "flux_single", "sd3_joint"], "blocks to compile")
DEGREES = flags.DEFINE_string("degrees", "1,2,4,8", "sequence degrees")
SIZE = flags.DEFINE_integer("size", 4096, "image side in pixels (F16 VAE: size / 32 tokens per side)")
TRAIN = flags.DEFINE_bool("train", False, "compile forward + backward of the block (else the forward)")

_OP = re.compile(
    r"^\s*\S+ = (.*?) (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)(?:-start)?\(", re.M
)
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collective_elements(hlo: str) -> dict[str, tuple[int, int]]:
    """{kind: (ops, elements of their results per device)} of a compiled program's HLO text. Elements, not
    bytes: XLA:CPU widens bf16 collectives to f32 (its float normalization), where a GPU or TPU moves bf16."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for result, kind in _OP.findall(hlo):
        out[kind][0] += 1
        out[kind][1] += sum(int(np.prod([int(d) for d in dims.split(",") if d])) for _, dims in _SHAPE.findall(result))
    return {k: (n, e) for k, (n, e) in out.items()}


def _block(name: str, length: int):
    """(module, [B, L, D] image, [B, T, D] text, other call arguments, width D)."""
    bf16 = jnp.bfloat16
    sds = lambda *shape, dtype=bf16: jax.ShapeDtypeStruct(shape, dtype)
    if name.startswith("flux"):
        cfg, t = FluxConfig(), 512
        cls = DoubleBlock if name == "flux_double" else SingleBlock
        module = cls(cfg, dtype=bf16, param_dtype=bf16)
        rope = sds(t + length, cfg.attention_head_dim, dtype=jnp.float32)
        return module, sds(1, length, cfg.dim), sds(1, t, cfg.dim), (sds(1, cfg.dim), rope, rope), cfg.dim
    cfg, t = MMDiTConfig(num_layers=24, caption_projection_dim=1536), 333
    module = JointBlock(cfg, dtype=bf16, param_dtype=bf16)
    return module, sds(1, length, cfg.dim), sds(1, t, cfg.dim), (sds(1, cfg.dim),), cfg.dim


def measure(name: str, degree: int, size: int, train: bool) -> dict:
    length = (size // 32) ** 2
    module, image, text, rest, d = _block(name, length)
    small = lambda x: jnp.zeros((x.shape[0], min(x.shape[1], 8), *x.shape[2:]), x.dtype) if x.ndim == 3 else x
    init_args = ((small(image), small(text)), *(jnp.zeros(r.shape, r.dtype) for r in rest))
    if name.startswith("flux"):  # rope tables of the small sequences
        init_args = (*init_args[:2], jnp.zeros((16, 128)), jnp.zeros((16, 128)))
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args))
    mesh = sharding.make_mesh({"sequence": degree}, jax.devices()[:degree])

    def forward(p, img, txt, *a):
        (img, txt), _ = module.apply(p, (img, txt), *a)
        return img, txt

    def step(p, img, txt, *a):
        loss = lambda p, img, txt: sum(jnp.sum(x.astype(jnp.float32)) for x in forward(p, img, txt, *a))
        return jax.grad(loss, argnums=(0, 1, 2))(p, img, txt)

    with sharding.active(mesh):  # the models' own layouts: text split with the image only when T divides
        place = lambda x: sharding.logical_sharding(mesh, sharding.DEFAULT_RULES, token_axes(x.shape[1]))
        jitted = jax.jit(
            step if train else forward, in_shardings=(None, place(image), place(text), *[None] * len(rest))
        )
        compiled = jitted.lower(params, image, text, *rest).compile()
    m = compiled.memory_analysis()
    text_split = degree > 1 and text.shape[1] % degree == 0
    moved = 0 if degree == 1 else 4 * (length + text.shape[1] * text_split) * d // degree  # q, k, v, o per device
    return dict(
        block=name,
        degree=degree,
        gib=(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / 2**30,
        temp_gib=m.temp_size_in_bytes / 2**30,
        collectives=collective_elements(compiled.as_text()),
        analytic_mib=moved * 2 * (2 if train else 1) / 2**20,  # bf16; the backward repeats them
        text="-" if degree == 1 else "split" if text_split else "replicated",
    )


def main(argv) -> None:
    del argv
    mode = "forward + backward" if TRAIN.value else "forward"
    print(f"| block ({mode}) | degree | text | per-device GiB (temp) | collectives per device | all-to-all analytic |")
    print("|---|---|---|---|---|---|")
    for name in BLOCKS.value:
        for degree in (int(x) for x in DEGREES.value.split(",")):
            r = measure(name, degree, SIZE.value, TRAIN.value)
            ops = ", ".join(f"{k} {n}x = {2 * e / 2**20:.1f} MiB" for k, (n, e) in sorted(r["collectives"].items()))
            print(
                f"| {name} | {degree} | {r['text']} | {r['gib']:.2f} ({r['temp_gib']:.2f}) | {ops or 'none'} | "
                f"{r['analytic_mib']:.1f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
