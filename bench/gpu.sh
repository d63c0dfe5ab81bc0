#!/usr/bin/env bash
# The GPU rows of docs/speed.md, as one prepared run for a GPU lent for minutes: it needs only torch, transformers and
# peft, no network (random weights of SmolLM2-135M's shape). Sized from one H200 lease (docs/speed.md), where each
# training row's process took ~25 s, almost all outside its timed steps, and eager generation of 16 prompts ~85 s:
# about 10 minutes in all. What that lease left unmeasured comes first. Prints the card, then:
# 1. generation, ours with its decode step compiled (a CUDA graph, the scripts' default on CUDA) against
#    transformers `generate`, bf16, batch 8;
# 2. a training step of LoRA and prompt tuning against transformers + peft in bf16: eager, with gradient
#    checkpointing (ours and theirs) and with --compile (the scripts' default on CUDA), each row's peak memory.
# Each step stops at its limit, so that one slow step cannot take the others' time; its log goes to LOGDIR.
#
#   bash bench/gpu.sh [LOGDIR]      # LOGDIR default runs/gpu-bench
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-runs/gpu-bench}
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__)"
step() {  # step NAME SECONDS COMMAND...: the command's output on screen and in LOGDIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
step generate-compiled 200 python3 bench/generate.py --device cuda --model smollm2-shape --dtypes bf16 --compile \
    --batches 8 --articles 16 --runs 1 --engines ours transformers
step train 360 python3 bench/train.py --device cuda --model smollm2-shape --methods lora prompt_tuning --dtypes bf16 \
    --compile --runs 10
