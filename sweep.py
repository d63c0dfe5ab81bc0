"""Run one family of experiments; each run writes its own record to runs/ (never another's). Then `python3 report.py`.

  python3 sweep.py methods        the three methods at their defaults (weights to models/), the hard-prompt
                                  baseline, zero-shot " TL;DR:" (GPT-2 paper) and lead-3 (no model)
  python3 sweep.py lr             learning rate 1e-4, 3e-4, 1e-3, 3e-3 for each method
  python3 sweep.py prompt_tokens  soft prompt length 1, 8, 24, 64
  python3 sweep.py lora_rank      LoRA rank 4, 8, 16, 32 (alpha = 2 x rank)
  python3 sweep.py temperature    temperature 0.3 ... 1.5 on the saved weights of `methods` (inference only)
  python3 sweep.py decoding       greedy vs top-p on the saved weights of `methods` (inference only)

Every flag after the family goes to every run, e.g. `--model /tmp/gpt2-tiny --data DIR --max-steps 20`.
"""
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent
SCRIPTS = {"prompt_tuning": "main.py", "last_layer": "main1.py", "lora": "main2.py"}


def family_runs(family: str) -> list[tuple[str, str, list[str]]]:
    """(run name, script, flags) of every run of a family."""
    weights = lambda name: ["--weights", str(ROOT / "runs" / f"{name}.safetensors")]
    if family == "methods":
        return [(m, s, ["--train"]) for m, s in SCRIPTS.items()] + [
            ("baseline", "main2.py", ["--baseline"]),
            ("zero_shot", "main2.py", ["--baseline", "--baseline-prompt-tokens", "0"])]
    if family == "lr":
        return [(f"lr-{m}-{lr}", s, ["--train", "--lr", lr, *weights(f"lr-{m}-{lr}")])
                for m, s in SCRIPTS.items() for lr in ("1e-4", "3e-4", "1e-3", "3e-3")]
    if family == "prompt_tokens":
        return [(f"prompt_tokens-{n}", "main.py", ["--train", "--prompt-tokens", n, *weights(f"prompt_tokens-{n}")])
                for n in ("1", "8", "24", "64")]
    if family == "lora_rank":
        return [(f"lora_rank-{r}", "main2.py", ["--train", "--lora-rank", r, "--lora-alpha", str(2 * int(r)),
                                                *weights(f"lora_rank-{r}")]) for r in ("4", "8", "16", "32")]
    if family == "temperature":
        return [(f"temperature-{m}-{t}", s, ["--temperature", t]) for m, s in SCRIPTS.items()
                for t in ("0.3", "0.5", "0.7", "0.9", "1.1", "1.3", "1.5")]
    if family == "decoding":
        return [(f"greedy-{m}", s, ["--greedy"]) for m, s in SCRIPTS.items()]
    raise common.UsageError(f"unknown family '{family}': one of methods, lr, prompt_tokens, lora_rank, temperature, "
                            "decoding")


@dataclass
class NoMethod:
    pass


def lead_3(flags: list[str]) -> None:
    """Lead-3 needs no model: the first three sentences of each test article."""
    cfg, _ = common.parse_args(NoMethod, "", flags)
    rows = common.load_splits(common.Config(**{**vars(cfg), "train_size": 0, "val_size": 0}))["test"]
    record = dict(method="lead_3", base_model=None, config=vars(cfg), trainable_parameters=0)
    common.score_and_write(cfg, "lead_3", record, rows, [common.lead_3(r["article"]) for r in rows])


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    family, flags = argv[0], argv[1:]
    runs = family_runs(family)
    for name, script, extra in runs:
        print(f"=== {name}: {script} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, str(ROOT / script), *extra, "--run-name", name, *flags], check=True)
    if family == "methods":
        print("=== lead_3", flush=True)
        lead_3(flags)


if __name__ == "__main__":
    with common.cli_errors():
        try:
            main(sys.argv[1:])
        except subprocess.CalledProcessError as e:
            raise common.UsageError(f"a run failed (exit code {e.returncode}): {' '.join(e.cmd[1:])}") from None
