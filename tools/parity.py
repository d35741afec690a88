"""Reproducibility check against the PyTorch reference, on your own weights:

  python -m tools.parity --pipeline=/models/FLUX.1-dev [--dtype=bfloat16] [--prompt="..."] [--json=report.json]

Loads the diffusers pipeline (torch, on CUDA when available) and the d4k_jax pipeline from the same
folder, feeds both the same inputs and compares every component: the text encoders (same token ids),
the transformer at three timesteps (same latents and text states), the VAE encode and decode, and the
whole pipeline from the same initial noise. Prints a table of max abs and relative errors (max |ours -
ref| / max |ref|), writes it as JSON, and exits 1 when a component exceeds its tolerance: 1e-4 in
float32 (DESIGN.md); in bfloat16 5e-2 per component and 1e-1 for the pipeline, since two bf16
implementations round differently at every layer.

F16 pipelines (vae/config.json with "stride": 2, as Diffusion-4K checkpoints and d4k_jax/data/demo_pipeline):
diffusers has no F16 VAE, so the VAE rows compare against the torch F16 reference (tools/torch_f16.py) on
the same weights, and the whole-pipeline row runs diffusers' pipeline at the size whose latents are the F16
ones (output_type="latent") and decodes them with that reference. The text encoders and the transformer
are compared against diffusers as for F8.

A component that fails to run is a row with the error (ok: no); a folder that is not a Flux / SD3
diffusers pipeline, or that diffusers cannot load, ends with one `error:` line and exit status 2.
--verbose shows the tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 1e-1)}  # (component, whole pipeline)
KINDS = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
SIGMAS = (1.0, 0.5, 0.05)


def errors(ours, ref) -> dict:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return {"max_abs": float("inf"), "rel": float("inf"), "note": f"shape {ours.shape} vs {ref.shape}"}
    diff = np.abs(ours - ref).max()
    return {"max_abs": float(diff), "rel": float(diff / max(np.abs(ref).max(), 1e-30))}


def check_folder(folder: Path) -> str:
    """'flux' or 'sd3', or a user error naming what is wrong; reads no weights and imports no torch."""
    from d4k_jax.diffusion.flow import FLUX_DEV, SD3_MEDIUM
    from d4k_jax.pipelines import base
    from d4k_jax.pipelines.scheduler import load_scheduler

    base.pipeline_dir(folder)
    try:
        kind = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{folder / 'model_index.json'}: not a JSON object with a _class_name ({e})") from e
    if kind not in KINDS:
        raise ValueError(f"{folder}: {kind!r} is not a Flux or SD3 pipeline (expected one of {sorted(KINDS)})")
    load_scheduler(folder, FLUX_DEV if KINDS[kind] == "flux" else SD3_MEDIUM)  # refuses what d4k_jax lacks
    return KINDS[kind]


class Rows(list):
    """The report's rows; `check` turns a comparison that raises into a failed row instead of a traceback."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def check(self, names: list[str], compare: Callable[[], list[tuple]]) -> None:
        try:
            pairs = compare()
        except Exception as e:
            if self.verbose:
                traceback.print_exc()
            note = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
            self.extend({"component": n, "max_abs": float("nan"), "rel": float("inf"), "note": note} for n in names)
            return
        self.extend({"component": n, **errors(ours, ref)} for n, (ours, ref) in zip(names, pairs, strict=True))


def load(folder: Path, kind: str, dtype: str):
    """(diffusers pipeline, ours, torch device, torch dtype)."""
    import jax.numpy as jnp
    import torch
    from diffusers import DiffusionPipeline

    from d4k_jax.pipelines import pipeline_class

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        ref = DiffusionPipeline.from_pretrained(folder, dtype=tdtype).to(device)
    except Exception as e:
        raise ValueError(
            f"{folder}: diffusers cannot load this pipeline ({type(e).__name__}: {str(e)[:300]}); tools.parity "
            "needs a diffusers pipeline folder with safetensors weights (not a converted directory)"
        ) from e
    ours = pipeline_class(kind).from_pretrained(folder, dtype=jnp.dtype(dtype))
    return ref, ours, device, tdtype


def compare(
    folder: Path, dtype: str, prompt: str, height: int, width: int, steps: int, verbose: bool = False
) -> list[dict]:
    import torch

    kind = check_folder(folder)
    ref, ours, device, tdtype = load(folder, kind, dtype)
    flux = kind == "flux"
    vae = ours.vae.module
    _, h, w, c = ours.latent_shape(1, height, width)  # or a named error
    rng = np.random.default_rng(0)
    s = SimpleNamespace(
        ref=ref,
        ours=ours,
        flux=flux,
        prompt=prompt,
        c=c,
        h=h,
        w=w,
        device=device,
        tdtype=tdtype,
        t=lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(device, tdtype),
        n=lambda a: a.float().cpu().numpy(),
        latents=rng.normal(size=(1, h, w, c)).astype(np.float32),
        image=rng.uniform(-1, 1, (1, height, width, 3)).astype(np.float32),
        z=rng.normal(size=(1, h, w, vae.config.latent_channels)).astype(np.float32),
    )
    f16 = vae.config.stride == 2
    where = ", F16 reference" if f16 else ""
    rows = Rows(verbose)
    with torch.no_grad():
        rows.check(["text encoders: sequence", "text encoders: pooled"], lambda: _text(s))
        for sigma in SIGMAS:
            rows.check([f"transformer at sigma {sigma}"], lambda sigma=sigma: [_transformer(s, sigma)])
        rows.check([f"vae encode (mean{where})", f"vae decode{where and f' ({where[2:]})'}"], lambda: _vae(s, f16))
        rows.check([f"pipeline ({steps} steps, {height}x{width}{where})"], lambda: [_pipeline(s, steps, f16)])
    return list(rows)


def _text(s) -> list[tuple]:
    if s.flux:
        s.ref_text, s.ref_pooled, _ = s.ref.encode_prompt(s.prompt, None, max_sequence_length=512)
        text, pooled = s.ours.encode_prompt([s.prompt], 512)
    else:
        s.ref_text, _, s.ref_pooled, _ = s.ref.encode_prompt(s.prompt, None, None, do_classifier_free_guidance=False)
        text, pooled = s.ours.encode_prompt([s.prompt], 256)
    return [(text, s.n(s.ref_text)), (pooled, s.n(s.ref_pooled))]


def _transformer(s, sigma: float) -> tuple:
    """On the same latents and the reference's text states."""
    import jax.numpy as jnp
    import torch
    from diffusers import FluxPipeline as TorchFlux

    module, params = s.ours.transformer
    apply = _jitted(s, "transformer", lambda p, *a: module.apply({"params": p}, *a))
    x = s.t(s.latents.transpose(0, 3, 1, 2))
    if s.flux:
        g = torch.full((1,), 3.5, device=s.device, dtype=s.tdtype) if module.config.guidance_embeds else None
        out = s.ref.transformer(
            hidden_states=TorchFlux._pack_latents(x, 1, s.c, s.h, s.w),
            timestep=s.t([sigma]),
            guidance=g,
            pooled_projections=s.ref_pooled,
            encoder_hidden_states=s.ref_text,
            txt_ids=torch.zeros(s.ref_text.shape[1], 3, device=s.device, dtype=s.tdtype),
            img_ids=TorchFlux._prepare_latent_image_ids(1, s.h // 2, s.w // 2, s.device, s.tdtype),
            return_dict=False,
        )[0]
        want = TorchFlux._unpack_latents(out, s.h * 8, s.w * 8, 8)
        guidance = None if g is None else jnp.array([3.5])
        got = apply(params, s.latents, jnp.array([sigma]), s.n(s.ref_text), s.n(s.ref_pooled), guidance)
    else:
        want = s.ref.transformer(
            hidden_states=x,
            timestep=torch.tensor([sigma * 1000], device=s.device),
            encoder_hidden_states=s.ref_text,
            pooled_projections=s.ref_pooled,
            return_dict=False,
        )[0]
        got = apply(params, s.latents, jnp.array([sigma * 1000]), s.n(s.ref_text), s.n(s.ref_pooled))
    return got, s.n(want).transpose(0, 2, 3, 1)


def _jitted(s, name: str, fn: Callable) -> Callable:
    """One compiled program per component, shared by the calls on same-shaped inputs (the three sigmas)."""
    import jax

    cache = s.__dict__.setdefault("jitted", {})
    return cache.setdefault(name, jax.jit(fn))


def _vae(s, f16: bool) -> list[tuple]:
    """diffusers' VAE for F8; the torch F16 reference on the same weights for F16."""
    import jax

    vae, params = s.ours.vae
    x, z = s.t(s.image.transpose(0, 3, 1, 2)), s.t(s.z.transpose(0, 3, 1, 2))
    if f16:
        from tools.torch_f16 import f16_decode, f16_encode

        ref_mean = f16_encode(s.ref.vae, x)[0]
        ref_image = f16_decode(s.ref.vae, z, shifted=vae.config.shifted_tail)
    else:
        ref_mean = s.ref.vae.encode(x).latent_dist.mean
        ref_image = s.ref.vae.decode(z).sample
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(params, s.image)
    image = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, s.z)
    return [(mean, s.n(ref_mean).transpose(0, 2, 3, 1)), (image, s.n(ref_image).transpose(0, 2, 3, 1))]


def _pipeline(s, steps: int, f16: bool) -> tuple:
    """From the same noise. diffusers gets the pixel size whose latents (at its F8 factor) are ours; for F16 it
    stops at the latents, which the F16 reference decodes as the pipeline does ((x / 2 + 0.5) clamped)."""
    from diffusers import FluxPipeline as TorchFlux

    ref, factor = s.ref, s.ref.vae_scale_factor
    height, width = s.h * factor, s.w * factor
    x = s.t(s.latents.transpose(0, 3, 1, 2))
    if s.flux:
        x = TorchFlux._pack_latents(x, 1, s.c, s.h, s.w)
    out = ref(
        s.prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        latents=x,
        output_type="latent" if f16 else "np",
    ).images
    if f16:
        from tools.torch_f16 import f16_decode

        z = TorchFlux._unpack_latents(out, height, width, factor) if s.flux else out
        z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
        image = f16_decode(ref.vae, z, shifted=s.ours.vae.module.config.shifted_tail)
        out = s.n((image / 2 + 0.5).clamp(0, 1)).transpose(0, 2, 3, 1)
    got = s.ours(
        [s.prompt],
        height=s.image.shape[1],
        width=s.image.shape[2],
        num_inference_steps=steps,
        latents=s.latents,
        output="float",
    )
    return got, out


def report(rows: list[dict], dtype: str) -> int:
    """Prints the table; the number of components outside their tolerance."""
    component_tol, pipeline_tol = TOLERANCE[dtype]
    failed = 0
    print(f"{'component':52s} {'max abs':>12s} {'relative':>12s} {'tolerance':>10s}  ok")
    for row in rows:
        tol = pipeline_tol if row["component"].startswith("pipeline") else component_tol
        row["tolerance"], row["ok"] = tol, bool(row["rel"] <= tol)
        failed += not row["ok"]
        ok = "yes" if row["ok"] else "NO"
        note = f"  {row['note']}" if "note" in row else ""
        print(f"{row['component']:52s} {row['max_abs']:12.3e} {row['rel']:12.3e} {tol:10.0e}  {ok}{note}")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="diffusers Flux or SD3 pipeline folder (F8 or F16 VAE)")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    p.add_argument("--prompt", default="a photo of a red fox in the snow, highly detailed")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", default="parity.json", help="where to write the report")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of failed components and errors")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    try:
        return _run(args)
    except Exception as e:
        if args.verbose or os.environ.get("D4K_TRACEBACK"):
            raise
        from d4k_jax import cli

        text = cli.message(e)
        if text is None:  # not a user error: still one line, with the way to the traceback
            print(f"error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)", file=sys.stderr)
            return 1
        print(f"error: {text}", file=sys.stderr)
        return cli.EXIT_USER_ERROR


def _run(args) -> int:
    import jax

    folder, out = Path(args.pipeline), Path(args.json)
    check_folder(folder)  # before torch and the weights
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--json {out}: folder {out.parent} does not exist")
    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs
    rows = compare(folder, args.dtype, args.prompt, args.height, args.width, args.steps, args.verbose)
    failed = report(rows, args.dtype)
    finite = [{k: v if not isinstance(v, float) or np.isfinite(v) else None for k, v in r.items()} for r in rows]
    out.write_text(json.dumps({"pipeline": args.pipeline, "dtype": args.dtype, "rows": finite}, indent=2))  # no NaN
    print(f"{len(rows) - failed} of {len(rows)} components within tolerance; report written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
