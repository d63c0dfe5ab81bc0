"""Last-layer fine-tuning of GPT-2 for CNN/DailyMail summarization.

Trains only the language-modeling head, untied from the input embeddings (GPT-2 ties them); the body is frozen
and runs without autograd: 38,597,376 trainable parameters on GPT-2 small (50,257 x 768).

  python3 main1.py             summarize the test set with models/last_layer.safetensors, print ROUGE
  python3 main1.py --train     train, save, then evaluate
  python3 main1.py --baseline  untrained GPT-2 with the hard prompt "Summarize" repeated
"""
from dataclasses import dataclass

import common


@dataclass
class LastLayer:
    lr: float = common.arg(1e-4, "peak learning rate (1e-3 overfits: the seed's finding)")


if __name__ == "__main__":
    with common.cli_errors():
        job = common.setup(common.parse_args(LastLayer, __doc__), "last_layer")
        if not job.cfg.baseline:
            common.apply_last_layer(job.model)
        common.run(job)
