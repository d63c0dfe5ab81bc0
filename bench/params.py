"""Trainable parameters of each method across the GPT-2 family, counted on the real model code (on the meta device:
shapes only, nothing allocated or downloaded).

  python3 bench/params.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
METHODS = {
    "prompt tuning (24 tokens)": lambda m: common.apply_prompt_tuning(m, [0] * 24),
    "last layer": common.apply_last_layer,
    "LoRA (r=16, c_attn)": lambda m: common.apply_lora(m, 16, 32),
}

print("| model | parameters | " + " | ".join(METHODS) + " |")
print("|---|---|" + "---|" * len(METHODS))
for name, (n_layer, n_head, n_embd) in SIZES.items():
    config = common.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    cells = []
    for apply in METHODS.values():
        with torch.device("meta"):
            trainable, _ = common.count_parameters(apply(common.GPT(config)))
            total = common.count_parameters(common.GPT(config))[1]
        cells.append(f"{trainable:,} ({100 * trainable / total:.3g} %)")
    print(f"| {name} | {total:,} | " + " | ".join(cells) + " |")
