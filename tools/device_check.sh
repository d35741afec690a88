#!/usr/bin/env bash
# One prepared accelerator session: issue 16's measurements (MFU and sampling speed on one GPU), each lever
# alone, with profiles. Parts run in the order given and each has its own time limit, so one failure or
# overrun cannot take the others down; no part starts once BUDGET_S seconds have gone. Results: one JSON
# line per measurement in $OUT/results.jsonl, top-15 op tables in $OUT/profile/ops.md, logs in $OUT/log.txt.
#
#   bash tools/device_check.sh                  # PARTS=core: the "before" and the remat lever (~9 min on an H100)
#   PARTS=levers bash tools/device_check.sh     # fused q/k/v and the Mosaic-GPU attention, sampling + training
#   PARTS=flags bash tools/device_check.sh      # each xla_flags.CANDIDATES entry alone, then the project's set
#   PARTS=baselines bash tools/device_check.sh  # diffusers in torch, and the degree-1 path vs commit 3228995
#   PARTS=lora bash tools/device_check.sh       # issue 17: the 4096² LoRA step's memory on one GPU (~2 min)
#   PARTS=fp8 bash tools/device_check.sh        # FP8 sampling (nn/fp8.py) against bf16: speed, GEMMs, PSNR (~6 min)
#   PARTS="attention sample_sd3" bash ...       # any list of the part names below
#
# Before the run, on the CPU machine: the device image has its own jax; carry flax/optax/... wheels in .whl/
# (`pip download --no-deps -d .whl flax==0.12.8 optax==0.2.8 ml-collections pytest pluggy iniconfig`), and for
# the baseline part
# `mkdir -p .baseline && git archive 3228995 d4k_jax tools | tar -x -C .baseline`; pass both as `carry`.
set -u
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT/profile"
SITE=""
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  SITE=/tmp/site
fi
export PYTHONPATH=${SITE:+$SITE:}$PWD
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
PROJECT_FLAGS=$(python3 -c "from d4k_jax import xla_flags; print(xla_flags.with_flags(''))")
export XLA_FLAGS="$PROJECT_FLAGS"  # the project's flags, as the CLIs set them
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tail -n 1 | tee -a "$OUT/log.txt"

run() {  # run SECONDS COMMAND...: one measurement, its log tail in log.txt
  local limit=$1; shift
  if (( SECONDS > BUDGET_S )); then echo "== skipped (budget): $*" | tee -a "$OUT/log.txt"; return; fi
  echo "== $* (limit ${limit}s, XLA_FLAGS=$XLA_FLAGS)" | tee -a "$OUT/log.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/part.log" 2>&1
  echo "rc=$? after $((SECONDS - t0))s" >>"$OUT/part.log"
  grep -v "^WARNING\|^I0000\|^W0000\|^E0000" "$OUT/part.log" | tail -n 24 | tee -a "$OUT/log.txt"
}
# DRY="--layers=1 --size=256 --batch=2 --microbatches=1 --repeats=1": the script's logic on a CPU, tiny models
bench() { local limit=$1; shift; run "$limit" python3 -m tools.bench_gpu "$@" ${DRY:-} --out "$OUT/results.jsonl"; }
with_flags() {  # with_flags "FLAGS" COMMAND...: one command under the project's flags plus FLAGS
  local saved=$XLA_FLAGS; export XLA_FLAGS="$1 $PROJECT_FLAGS"; shift; "$@"; export XLA_FLAGS=$saved
}
P="--profile $OUT/profile"
SAVE=save_attention  # nn.stack.REMAT_POLICIES: full remat, attention outputs kept
IMAGES=/tmp/d4k_images  # the sampling parts' uint8 images (48 MB each at 4096²: not under $OUT)

part() {
  case $1 in
    # issue 16 lever 2: cuDNN vs Mosaic-GPU flash attention, B=2, N=24, head dim 64/128, 16,717/16,896 tokens
    attention) run 120 python3 -m tools.attention_bench --out "$OUT/results.jsonl" ;;
    # the "before" of the training figures, with a profile (the targets: MFU >= 35 % / 40 %)
    train_full) bench 170 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=full $P ;;
    train_save) bench 170 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=$SAVE $P ;;
    train_save_latents) bench 150 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=$SAVE --latents ;;
    train_full_latents) bench 150 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=full --latents ;;
    sample_sd3) bench 90 sample --model=sd3 --steps=4 --images $IMAGES $P ;;
    sample_flux) bench 110 sample --model=flux --steps=4 --images $IMAGES $P ;;
    # the optional FP8 mode (nn/fp8.py): s/step, FP8 GEMMs in the program, PSNR against the bf16 part's
    # images (run sample_sd3 / sample_flux first), and a profile to see which GEMM kernels ran
    sample_sd3_fp8) bench 90 sample --model=sd3 --steps=4 --model_opt=fp8=true --images $IMAGES $P ;;
    sample_flux_fp8) bench 110 sample --model=flux --steps=4 --model_opt=fp8=true --images $IMAGES $P ;;
    # the trained demo pipeline's FP8 vs bf16 PSNR with the GPU's FP8 GEMMs (the CPU's are exact products: 44.9 dB);
    # needs the tokenizers' packages on the device image (else it fails alone)
    fp8_psnr) run 120 python3 -m tools.fp8_psnr ;;
    # issue 16 lever 3 and 2 in the pipelines
    sample_sd3_fused) bench 90 sample --model=sd3 --steps=4 --model_opt=fused_qkv=true ;;
    sample_flux_fused) bench 110 sample --model=flux --steps=4 --model_opt=fused_qkv=true ;;
    sample_sd3_mgpu) bench 90 sample --model=sd3 --steps=4 --attention=mgpu $P ;;
    sample_flux_mgpu) bench 110 sample --model=flux --steps=4 --attention=mgpu ;;
    train_save_fused) bench 170 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=$SAVE \
      --model_opt=fused_qkv=true ;;
    train_save_mgpu) bench 170 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=$SAVE --attention=mgpu ;;
    # the GPU-only tests (cuDNN at odd lengths and the Mosaic kernel against XLA); conftest defaults to the CPU
    gpu_tests) run 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -k gpu \
      tests/test_cudnn_odd_lengths.py tests/test_mgpu_attention.py ;;
    # Flux's 16,461-token train step (77 T5 tokens: odd, padded for cuDNN). NOT FLUX.1-dev: 2 + 4 blocks (1.31B),
    # since full fine-tuning with AdamW (~177 GiB of state) fits no single GPU; a smoke test, never an MFU figure
    train_flux_smoke) bench 150 train --model=flux --layers=2 --batch=2 --microbatches=2 --latents --steps=2 \
      --remat=$SAVE ;;
    # issue 16 lever 4: each candidate flag alone on SD3 sampling, then none at all
    flags)
      for name in $(python3 -c "from d4k_jax import xla_flags; print(*xla_flags.CANDIDATES)"); do
        flags=$(python3 -c "from d4k_jax import xla_flags as x; print(x.with_flags('', x.CANDIDATES['$name']))")
        with_flags "$flags" bench 90 sample --model=sd3 --steps=4
      done
      local saved=$XLA_FLAGS; export XLA_FLAGS=""; bench 90 sample --model=sd3 --steps=4; export XLA_FLAGS=$saved ;;
    train_flags)  # the candidates that helped sampling, together, on the training step
      with_flags "${TRAIN_FLAGS:---xla_gpu_enable_triton_gemm=false}" \
        bench 170 train --model=sd3 --batch=8 --microbatches=8 --steps=2 --remat=$SAVE ;;
    # the diffusers baseline on the same card (the >= 1.3x target) and issue 15's degree-1 no-regression check
    torch) bench 60 torch_sample --model=sd3 --steps=4; bench 80 torch_sample --model=flux --steps=4 ;;
    baseline)
      if [ -d .baseline/d4k_jax ]; then
        for m in sd3 flux; do  # python -m puts the working directory first: run from .baseline
          run 110 bash -c "cd .baseline && PYTHONPATH=$SITE python3 -m tools.bench_gpu sample --model=$m --steps=4 \
            ${DRY:-} --out $OUT/baseline_3228995.jsonl"
        done
      else echo "== baseline: no .baseline/ (see the header)" | tee -a "$OUT/log.txt"; fi ;;
    # issue 17: the 4096² LoRA train step's compiled memory on one GPU (the CPU analysis holds an fp32 copy of the
    # bf16 base; BENCHMARKS.md "LoRA training at 4096²"): does FLUX.1-dev fit one 80 GB device?
    lora_memory) run 150 python3 -m tools.lora_bench --model=flux --ranks=16,64 --latents
      run 100 python3 -m tools.lora_bench --model=sd3 --ranks=16,64 ;;
    *) echo "== unknown part $1" | tee -a "$OUT/log.txt" ;;
  esac
}

case ${PARTS:-core} in
  core) PARTS="attention train_full train_save sample_sd3 sample_flux train_save_latents gpu_tests" ;;
  levers) PARTS="sample_sd3_fused sample_sd3_mgpu sample_flux_fused sample_flux_mgpu train_save_fused train_save_mgpu" ;;
  fp8) PARTS="sample_sd3 sample_sd3_fp8 sample_flux sample_flux_fp8 fp8_psnr" ;;
  flags) PARTS="flags train_flags" ;;
  baselines) PARTS="torch baseline train_full_latents train_flux_smoke" ;;
  lora) PARTS="lora_memory" ;;
esac
for p in $PARTS; do part "$p"; done
echo "== results ($SECONDS s)" && cat "$OUT/results.jsonl" "$OUT/baseline_3228995.jsonl" 2>/dev/null
