#!/usr/bin/env bash
# The GPU rows of the README's speed tables, as one prepared run for a lent GPU machine (sized for about 8 minutes on
# one H100, not yet timed there; it needs only torch, transformers and peft, no network: random weights). Prints:
# generation, ours (compiled decode step, a CUDA graph) vs transformers `generate`, bf16, batch 8 and 64, with
# articles/s and the 3,000-article estimate; one training step per method vs transformers + peft (fp32, and bf16
# both); each with the card's name. Not run on a GPU yet: no GPU was lent to this project so far.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for shape in gpt2-shape smollm2-shape; do
  python3 bench/generate.py --device cuda --model $shape --dtypes bf16 --compile --batches 8 64 --articles 128 \
      --runs 3 --engines ours transformers
  python3 bench/train.py --device cuda --model $shape --runs 5
done
