"""Data: CNN/DailyMail rows from a local folder or the hub, drawn by a seeded shuffle, and turned into token ids.
One example = prompt + article + separator + summary + EOS; the loss covers the summary and its EOS."""
from __future__ import annotations

import csv
import functools
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import constants

from peftsum import runtime
from peftsum.errors import UsageError, first_line
from peftsum.config import Config, MODES
from peftsum.model import IGNORE


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
        import pyarrow  # only a .parquet file needs it
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
    import datasets  # slow to import, and only a hub dataset needs it
    datasets.disable_progress_bars()
    offline = not runtime.hub_reachable()
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
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return ((Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))).exists()
            or (datasets_cache / name.replace("/", "___")).exists())


def draw_rows(table, n: int, seed: int, split: str) -> list[dict]:
    """n rows of a table (a list of dicts, or a `datasets` Dataset) drawn by a seeded shuffle, as
    {"id", "article", "highlights"}; rows with an empty article or summary are skipped and counted."""
    columns = table.column_names if hasattr(table, "column_names") else list(table[0])
    missing = {"article", "highlights"} - set(columns)
    if missing:
        raise UsageError(f"the {split} split has no column {', '.join(sorted(missing))}: "
                         "expected columns 'article' and 'highlights' ('id' optional)")
    order = np.random.default_rng(seed).permutation(len(table))[:n]  # what datasets' shuffle(seed=seed) draws
    picked = table.select(order) if hasattr(table, "select") else [table[i] for i in order]
    out = []
    ids = unique_ids([row.get("id") for row in picked], split)
    for row_id, row in zip(ids, picked):
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


def unique_ids(ids: list, split: str) -> list[str]:
    """One id per drawn row, each different, so that runs compare article by article: a row's own id, or where it
    has none (no 'id' column, a null or empty id) its place in the draw; a repeated id gets "#2", "#3", ... in the
    order drawn. The same data and seed give the same ids in every run. Says in one line what it changed."""
    out, seen, missing, repeated = [], set(), 0, 0
    for i, row_id in enumerate(ids):
        if row_id is None or str(row_id).strip() == "":
            missing += 1
            row_id = i
        row_id, k = str(row_id), 1
        while (new := row_id if k == 1 else f"{row_id}#{k}") in seen:
            k += 1
        repeated += k > 1
        seen.add(new)
        out.append(new)
    if repeated or missing < len(ids) and missing:
        print(f"the {split} split has {repeated} rows whose id repeats an earlier one and {missing} without an id: "
              "numbered apart (a repeat of <id> is <id>#2, a row without one is its place in the draw)")
    return out


def bos_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before every text (Llama 2's and TinyLlama's <s>; none for GPT-2 or SmolLM2).
    Our pieces are encoded without special tokens and joined, so the BOS is added once, at the very start."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    return full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []


CHAT_INSTRUCTION = "Summarize the following news article in three sentences.\n\n"


def prompt_format(tokenizer, prompt_ids: list[int], cfg: Config, separator_ids: list[int] | None = None
                  ) -> tuple[list[int], list[int]]:
    """(ids before the article, ids after it): [BOS] + prompt + | article | + separator (`separator_ids`, else the
    --separator text's); with --chat, the instruct model's own chat template around CHAT_INSTRUCTION + article,
    ending where the assistant's turn begins, and a soft prompt there takes the instruction's place (it starts
    from the instruction's tokens: chat_instruction_ids)."""
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    if not cfg.chat:
        return bos_ids(tokenizer) + prompt_ids, encode(cfg.separator) if separator_ids is None else separator_ids
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer of '{cfg.model}' has no chat template: --chat needs an instruct model")
    marker = "\x00ARTICLE\x00"  # the template is applied to text with a marker, then split around it
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    if prompt_ids:
        return encode(before.removesuffix(CHAT_INSTRUCTION)) + prompt_ids, encode(after)
    return encode(before), encode(after)


def chat_instruction_ids(tokenizer) -> list[int]:
    """The tokens of the --chat instruction, where a soft prompt in the chat format starts."""
    return tokenizer.encode(CHAT_INSTRUCTION, add_special_tokens=False)


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


def encode_examples(rows: list[dict], tokenizer, prompt_ids: list[int], cfg: Config, n_ctx: int,
                    separator_ids: list[int] | None = None):
    """Training examples as (ids, n_context): ids = prompt + article + separator + summary + EOS, and the loss
    covers ids[n_context:], the summary and its EOS. The EOS is a target so the model learns to stop."""
    head, tail = prompt_format(tokenizer, prompt_ids, cfg, separator_ids)
    articles = tokenizer([r["article"] for r in rows], add_special_tokens=False).input_ids
    summaries = tokenizer([" " + r["highlights"].strip() for r in rows], add_special_tokens=False).input_ids
    out = []
    for article, summary in zip(articles, summaries):
        summary = summary[:cfg.max_summary_tokens] + [tokenizer.eos_token_id]
        context = encode_prompt(article, head, tail, len(summary), n_ctx, cfg.max_article_tokens)
        out.append((context + summary, len(context)))
    return out


def encode_prompts(rows: list[dict], tokenizer, prompt_ids: list[int], cfg: Config, n_ctx: int,
                   separator_ids: list[int] | None = None):
    """Generation prompts (prompt + article + separator), leaving room for `max_new_tokens`. Returns the prompts
    and how many articles were cut."""
    head, tail = prompt_format(tokenizer, prompt_ids, cfg, separator_ids)
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
