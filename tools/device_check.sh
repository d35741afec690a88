#!/usr/bin/env bash
# One prepared accelerator session (tools/bench_gpu.py): issue 6's training figures, the sampling targets
# and the diffusers baseline, GLCM throughput. Each part has its own time limit so one failure or
# overrun cannot take the others down; results go to $OUT/results.jsonl, logs to $OUT/log.txt.
# Usage on the device machine: bash tools/device_check.sh   (wheels for missing packages in .whl/)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$OUT/log.txt"
part() {  # part SECONDS ARGS...: one bench_gpu run
  local limit=$1; shift
  echo "== $* (limit ${limit}s)" | tee -a "$OUT/log.txt"
  local t0=$SECONDS
  timeout "$limit" python3 -m tools.bench_gpu "$@" --out "$OUT/results.jsonl" >"$OUT/part.log" 2>&1
  echo "rc=$? after $((SECONDS - t0))s" >>"$OUT/part.log"
  grep -v "^WARNING\|^I0000\|^W0000" "$OUT/part.log" | tail -n 8 | tee -a "$OUT/log.txt"
}
part "${TRAIN_S:-160}" train --model=sd3 --batch=8 --microbatches=8 --steps=2
part "${SAMPLE_S:-70}" sample --model=sd3 --steps=4
part "${FLUX_S:-90}" sample --model=flux --steps=4
echo "== glcm" | tee -a "$OUT/log.txt"; timeout 60 python3 -m tools.bench_glcm --batch=8 2>&1 | tail -n 3 | tee -a "$OUT/log.txt"
part 45 torch_sample --model=sd3 --steps=4
part 60 torch_sample --model=flux --steps=4
echo "== results" && cat "$OUT/results.jsonl"
