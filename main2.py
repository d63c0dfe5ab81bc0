"""LoRA fine-tuning of GPT-2 for CNN/DailyMail summarization (Hu et al. 2021).

Adds a rank-16 update (alpha 32) to the fused q/k/v projection `c_attn` of every block; GPT-2 stays frozen:
589,824 trainable parameters on GPT-2 small (12 x 16 x (768 + 2304)). Merged into the weights for inference.

  python3 main2.py             summarize the test set with models/lora.safetensors, print ROUGE
  python3 main2.py --train     train, save, then evaluate
  python3 main2.py --baseline  untrained GPT-2 with the hard prompt "Summarize" repeated
"""
from dataclasses import dataclass

import common


@dataclass
class LoRA:
    lora_rank: int = common.arg(16, "rank r of the update B A", recorded=True)
    lora_alpha: float = common.arg(32.0, "the update is scaled by alpha / r", recorded=True)
    lr: float = common.arg(1e-3, "peak learning rate")


if __name__ == "__main__":
    with common.cli_errors():
        job = common.setup(common.parse_args(LoRA, __doc__), "lora")
        if not job.cfg.baseline:
            common.apply_lora(job.model, job.hp.lora_rank, job.hp.lora_alpha)
        common.run(job)
