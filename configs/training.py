"""The WLF fine-tuning recipe shared by configs/flux_wlf.py and configs/sd3_wlf.py (REFERENCE.md §3).

The full configs are the reference run (8 x 80 GB GPUs, 4096², lr 1e-6 constant, 20k steps); `:tiny`
trains the embedded demo pipeline from its random initialisation on the procedural demo set on a CPU.
"""

from pathlib import Path

import ml_collections

PER_DEVICE_BATCH = {"sd3": 8, "flux": 4}  # the reference's, on 8 GPUs
_DATA = Path(__file__).resolve().parent.parent / "d4k_jax" / "data"
DEMO_PIPELINES = {"flux": str(_DATA / "demo_pipeline"), "sd3": str(_DATA / "demo_pipeline_sd3")}
DEMO_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a purple background",
    "a green triangle on a white background",
    "a white diamond on a black background",
    "a blue circle on a orange background",
    "a orange square on a green background",
    "a purple triangle on a yellow background",
    "a black diamond on a red background",
)


def add_training(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    model = c.model
    c.param_dtype = "float32"  # fp32 master weights; `dtype` (bfloat16) is the compute dtype
    c.data = ml_collections.ConfigDict(
        dict(
            folder="",  # Aesthetic-4K-style root (split/metadata.jsonl), built into data_dir on first use
            data_dir="",  # built TFDS datasets; default WORKDIR/data
            split="train",
            resolution=4096,
            worker_count=8,  # grain worker processes decoding 4K images
            demo_images=0,  # > 0: write this many procedural demo images as the folder (the :tiny run)
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=20_000,
            batch_size=PER_DEVICE_BATCH[model],  # per device; global = this x data x fsdp devices
            mesh={"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1},  # FSDP over every device; all axes listed
            # axes spread across hosts (GPU) / slices (TPU), the slower network: there `mesh` is one host's mesh
            # and axis a has mesh[a] x mesh_dcn[a] devices (sharding.make_mesh). Default: data parallel across
            # hosts, FSDP within each; one host: no effect. -1: the rest of the hosts
            mesh_dcn={"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1},
            # logical axis -> mesh axes, e.g. (("batch", ("data", "fsdp")), ("embed", "fsdp"), ...); None:
            # d4k_jax.sharding.DEFAULT_RULES (batch over data x fsdp, params' embed axis over fsdp)
            rules=ml_collections.config_dict.placeholder(tuple),
            # gradient accumulation, one image per device per pass: the 4096² activations, not the state, set
            # the peak (compiled memory, BENCHMARKS.md): SD3 then fits one 80 GB device, Flux fsdp=8
            microbatches=PER_DEVICE_BATCH[model],
            encode_passes=PER_DEVICE_BATCH[model],  # VAE-encode one image per device at a time
            # nn.stack.REMAT_POLICIES: full, save_attention, dots, dots_no_batch, none. "save_attention" is "full" but
            # keeps each attention's output (and softmax statistics) so the backward pass does not rerun the attention
            # forward (64 % of SD3's FLOPs at 4096²), at ~51 MB per layer per image in flight (SD3; Flux ~101 MB)
            remat="full",
            lr=1e-6,
            schedule="constant",  # or "cosine" (to 0 at `steps`)
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=1e-4,
            clip_norm=1.0,
            text_length=77,  # T5 tokens in training (the reference scripts)
            nan_policy="stop",  # or "skip"
            log_every=10,
            checkpoint_every=5_000,
            keep=2,
            peak_flops=0.0,  # per device, for MFU on devices d4k_jax does not know; 0: look it up
            export=True,  # write WORKDIR/pipeline (the trained transformer + the other components) at the end
            # resuming (a checkpoint in WORKDIR) with fields changed that alter what is trained is refused
            # (d4k_jax/train_config.py lists the fields a resume may change); True accepts them, logged
            allow_config_change=False,
            # LoRA: rank > 0 trains only low-rank adapters (float32, AdamW above) on the frozen transformer, which
            # is then stored in `dtype` (no gradient, optimizer state or float32 copy; checkpoints hold the adapters,
            # their optimizer state and the step). alpha None: the rank (scale 1, as peft); dropout on the adapters'
            # inputs; targets: peft module names separated by commas, "" for the diffusers training scripts'
            # attention q/k/v/out of both streams (d4k_jax/lora.py DEFAULT_TARGETS)
            lora=dict(rank=0, alpha=ml_collections.config_dict.placeholder(float), dropout=0.0, targets=""),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            loss="wlf",  # or "flow": the fine-tune-without-WLF ablation
            timesteps="reference",  # or "shifted_uniform"
            shift=3.0,
            guidance=3.5,  # Flux's guidance input in training
            wavelet="haar",
            level=1,
            subband_weights=ml_collections.config_dict.placeholder(tuple),  # e.g. (0.5, 1.0, 1.0, 1.5)
            latent_shift=True,  # False: the SD3 script's quirk, latents * scale without the shift
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            every=1_000,  # 0: no sampling during training (a final sample grid is always written)
            prompts=DEMO_PROMPTS[:4],
            height=1024,
            width=1024,
            steps=c.sample.steps,
            guidance=c.sample.guidance,
            max_sequence_length=c.sample.max_sequence_length,
            # computed on each evaluation's samples and logged as eval_<name>; the network metrics
            # (clip, aesthetics) also need their weights below, else they are logged as not computed once
            metrics="glcm,cr",
            weights=dict(clip="", aesthetic_head="", aesthetic_clip=""),
        )
    )
    if arg == "tiny":
        c.pipeline = DEMO_PIPELINES[model]
        c.data.update(resolution=64, worker_count=0, demo_images=2048)
        c.train.update(
            steps=2000,
            batch_size=32,
            mesh={"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1},
            microbatches=1,
            encode_passes=1,
            remat="none",
            lr=2e-3,  # from a random initialisation, not the reference's fine-tuning rate
            schedule="cosine",
            warmup_steps=30,
            weight_decay=0.0,
            text_length=16,
            log_every=10,
            checkpoint_every=1000,
        )
        # noise levels shifted towards 1 (as SD3 samples them): a from-scratch model learns the layout first,
        # and the shapes show up in minutes rather than staying faint blobs (uniform sigmas, the Flux recipe)
        c.loss.update(timesteps="shifted_uniform", shift=3.0)
        c.eval.update(every=1000, prompts=DEMO_PROMPTS, height=64, width=64, steps=20, guidance=3.5)
        c.eval.max_sequence_length = 16
        c.sample.update(height=64, width=64, steps=20, guidance=3.5)
    return c


def tiny_lora(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`:tiny_lora`: `:tiny`, training rank-16 adapters on every attention and MLP Linear of the demo transformer
    (frozen) instead of the whole model; a higher learning rate, as LoRA recipes use."""
    attention = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
    mlp = "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2" + (",proj_mlp" if c.model == "flux" else "")
    c.train.lora.update(rank=16, targets=f"{attention},{mlp}")
    c.train.update(lr=1e-2)
    return c
