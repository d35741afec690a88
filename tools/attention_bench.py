"""Attention kernels at the 4096² shapes: cuDNN vs jax's Mosaic-GPU FlashAttention-3 kernel (our padded wrapper).

    python -m tools.attention_bench [--out FILE]           # on an H100: B=2, N=24, K 64/128, L 16,717/16,896, bf16
    python -m tools.attention_bench --dry                  # on a CPU: tiny shapes, XLA vs the wrapper's stand-in
    python -m tools.attention_bench --mgpu-config=64,128,2 --mgpu-config=64,128,3 --passes=fwd   # sweep blocks

Each case (implementation x head dim x length x pass) is timed alone and reported as one line (and one JSON line
appended to --out); one that fails reports its error and the rest go on. "mgpu" goes through
`dot_product_attention(implementation="mgpu")`, so its padding to the kernel's 128-token tiles, the float16 casts
and the corrections are in the time. SD3 is K=64 at 16,717 tokens (16,384 image + 333 text), Flux K=128 at
16,896 (16,384 + 512); all four combinations run.

FLOPs as FlashAttention counts them, over the real (unpadded) lengths: forward 4·B·N·L²·K, backward 2.5x the
forward, so "fwd_bwd" (one jax.vjp with a random cotangent: the forward and the backward) counts 3.5x the forward.
Times: the best of 3 runs of `--repeats` back-to-back calls (dispatch overlaps the GPU), per call.
max_abs_diff: the largest |difference| to the reference implementation's outputs (cuDNN; XLA with --dry), of the
output (fwd) or of dq, dk, dv (fwd_bwd), in the compute dtype, with ref_max_abs the reference's largest |value|.
"""

from __future__ import annotations

import argparse
import time

from tools.bench_gpu import _report  # one printed line and one JSON line per result


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _implementations(args) -> dict:
    """name -> (q, k, v) -> out, in reporting order (the reference first)."""
    from d4k_jax.nn import attention, mgpu_attention

    plain = lambda impl: lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl)
    impls = {name: plain(name) for name in args.impls.split(",") if name != "mgpu_ref"}
    if "mgpu_ref" in args.impls.split(","):  # the wrapper around its plain-jnp stand-in (runs anywhere)
        stand_in = mgpu_attention.reference_kernel(128, 128)
        impls["mgpu_ref"] = lambda q, k, v: mgpu_attention.attention(q, k, v, q.shape[-1] ** -0.5, stand_in)
    for text in args.mgpu_config:  # block_q,block_kv,steps[,block_q_dq,block_kv_dq,block_q_dkv,block_kv_dkv]
        impls[f"mgpu[{text}]"] = _mgpu_with(_ints(text))
    return impls


def _mgpu_with(blocks: list[int]):
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    from d4k_jax.nn import mgpu_attention

    def run(q, k, v):
        tuning = dict(mgpu_attention.TUNING[q.shape[-1]])
        names = ("block_q", "block_kv", "max_concurrent_steps", "block_q_dq", "block_kv_dq", "block_q_dkv")
        tuning.update(zip((*names, "block_kv_dkv"), blocks, strict=False))
        kernel = mgpu_attention.mosaic_kernel(q.shape[-1], attention_mgpu.TuningConfig(**tuning))
        return mgpu_attention.attention(q, k, v, q.shape[-1] ** -0.5, kernel)

    return run


def _best_time(fn, inputs, repeats: int) -> float:
    import jax

    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            out = fn(*inputs)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def _case(args, name, fn, head_dim, length, pass_, references) -> dict:
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if args.dry else jnp.bfloat16
    shape = (args.batch, length, args.heads, head_dim)
    keys = jax.random.split(jax.random.key(length * 1000 + head_dim), 4)
    q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    if pass_ == "fwd":
        program, inputs = jax.jit(fn), (q, k, v)
    else:
        program, inputs = jax.jit(lambda q, k, v, c: jax.vjp(fn, q, k, v)[1](c)), (q, k, v, cotangent)
    t = time.perf_counter()
    outputs = jax.block_until_ready(program(*inputs))
    first_s = time.perf_counter() - t
    seconds = _best_time(program, inputs, args.repeats)
    flops = 4 * args.batch * args.heads * length**2 * head_dim * (1 if pass_ == "fwd" else 3.5)
    row = dict(ms=seconds * 1e3, tflops=flops / seconds / 1e12, first_call_s=first_s)
    key = (head_dim, length, pass_)
    if key not in references:
        references[key] = (name, outputs)
    else:
        ref_name, ref = references[key]
        leaves = zip(jax.tree.leaves(outputs), jax.tree.leaves(ref), strict=True)
        diff = max(float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) for a, b in leaves)
        ref_max = max(float(jnp.abs(b.astype(jnp.float32)).max()) for b in jax.tree.leaves(ref))
        row.update(reference=ref_name, max_abs_diff=diff, ref_max_abs=ref_max)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="", help="comma-separated; default cudnn,mgpu (xla,mgpu_ref with --dry)")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--lengths", default="", help="default 16717,16896 (141,256 with --dry)")
    parser.add_argument("--passes", default="fwd,fwd_bwd")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=0, help="default 24 (2 with --dry)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mgpu-config", action="append", default=[], help="also time the kernel with these blocks")
    parser.add_argument("--dry", action="store_true", help="tiny float32 shapes on any backend (argument checks)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.impls = args.impls or ("xla,mgpu_ref" if args.dry else "cudnn,mgpu")
    args.lengths = args.lengths or ("141,256" if args.dry else "16717,16896")
    args.heads = args.heads or (2 if args.dry else 24)
    if args.dry:
        args.repeats = min(args.repeats, 2)

    import jax

    device = jax.devices()[0].device_kind
    references: dict = {}
    impls = _implementations(args)
    for head_dim in _ints(args.head_dims):
        for length in _ints(args.lengths):
            for pass_ in args.passes.split(","):
                for name, fn in impls.items():
                    row = dict(bench="attention", impl=name, device=device, batch=args.batch, heads=args.heads,
                               head_dim=head_dim, length=length, dtype="float32" if args.dry else "bfloat16",
                               **{"pass": pass_})  # fmt: skip
                    try:
                        row.update(_case(args, name, fn, head_dim, length, pass_, references))
                    except Exception as e:  # one kernel failing must not stop the others
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    _report(args, row)


if __name__ == "__main__":
    main()
