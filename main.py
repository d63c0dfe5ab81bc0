"""Prompt tuning GPT-2 for CNN/DailyMail summarization (Lester et al. 2021).

Learns 24 soft embeddings placed before the article, initialized from the embeddings of "Summarize";
GPT-2 itself stays frozen: 18,432 trainable parameters on GPT-2 small (24 x 768).

  python3 main.py             summarize the test set with models/prompt_tuning.safetensors, print ROUGE
  python3 main.py --train     train, save, then evaluate
  python3 main.py --baseline  untrained GPT-2 with the hard prompt "Summarize" repeated
"""
from dataclasses import dataclass

import common


@dataclass
class PromptTuning:
    prompt_tokens: int = common.arg(24, "soft prompt length", recorded=True)
    lr: float = common.arg(1e-3, "peak learning rate")


if __name__ == "__main__":
    with common.cli_errors():
        job = common.setup(common.parse_args(PromptTuning, __doc__), "prompt_tuning")
        if not job.cfg.baseline:
            common.apply_prompt_tuning(job.model, common.hard_prompt_ids(job.tokenizer, job.hp.prompt_tokens))
        common.run(job)
