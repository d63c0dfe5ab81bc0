#!/usr/bin/env bash
# The GPU rows of the README's speed tables, as one prepared run for a lent GPU machine (about 10 minutes on one
# H100; it needs only torch, transformers and peft there, no network): the generation benchmark at batch 8 and 64
# in bf16 with the compiled (CUDA-graph) decode step, then the training benchmark (theirs fp32 vs ours fp32, and
# ours bf16 + compile). Not run on a GPU yet: no GPU was lent to this project so far.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/generate.py --device cuda --dtype bf16 --compile --batches 8 64 --runs 3
python3 bench/train.py --device cuda --runs 5
