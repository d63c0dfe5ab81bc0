"""Evaluation: summaries of the test set, ROUGE as papers report it, and the run record with its predictions."""
from __future__ import annotations

import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch

from peftsum.config import Config
from peftsum.model import GPT
from peftsum.files import write_text
from peftsum.data import encode_examples, encode_prompts, length_batches
from peftsum.generation import generate, generate_batch, generate_stream
from peftsum.records import RunRecord, record_suffix


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


def show_prefill(bar):
    """on_prefill for a bar that counts articles: a prefill ends no article, and the first (a batch of the longest
    articles) can take minutes on a CPU, so the bar's postfix shows its prompt tokens done while it runs."""
    def show(done: int, total: int) -> None:
        bar.set_postfix_str(f"prefilling {done:,}/{total:,} tokens" if done < total else "")
    return show


def summarize(model: GPT, tokenizer, rows: list[dict], cfg: Config) -> list[str]:
    """Generated summaries (the new tokens only, never the article), in the order of `rows`. Without lookup, one
    stream (`generate_stream`): a row whose summary ends takes the next article, longest articles first; with
    lookup, batches of articles of similar length. A progress bar counts the articles done, and while a prefill
    runs, its prompt tokens done. Prints the articles per second."""
    prompts, n_cut = encode_prompts(rows, tokenizer, model.prompt_ids, cfg, model.config.n_positions,
                                    model.separator_ids)
    if n_cut:
        room = f"the {model.config.n_positions}-token context with {cfg.max_new_tokens} tokens left for the summary"
        limit = f"--max-article-tokens {cfg.max_article_tokens} (and {room})" if cfg.max_article_tokens else room
        print(f"{n_cut} of {len(rows)} articles cut to fit {limit}")
    batch = min(summary_batch_size(model, cfg, max(map(len, prompts)) + cfg.max_new_tokens), len(prompts))
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, greedy=cfg.greedy,
                    eos_id=tokenizer.eos_token_id, compile=cfg.compile)
    new: list[list[int]] = [[] for _ in prompts]
    busy, start = "", time.perf_counter()
    from tqdm import tqdm
    with tqdm(total=len(prompts), desc="summarizing", unit="article", file=sys.stdout, mininterval=1.0,
              disable=len(prompts) == 1) as bar:
        if cfg.lookup:
            for b, chunk in enumerate(length_batches([len(p) for p in prompts], batch)):
                seed = (cfg.seed + b * batch) % 2**64  # a 64-bit seed, as --seed is
                out, _ = generate_batch(model, [prompts[i] for i in chunk], cfg.max_new_tokens, seed=seed,
                                        lookup=cfg.lookup, on_prefill=show_prefill(bar), **sampling)
                for i, ids in zip(chunk, out):
                    new[i] = ids
                bar.update(len(chunk))
        else:
            order = length_batches([len(p) for p in prompts], len(prompts))[0]  # longest first
            out, stats = generate_stream(model, [prompts[i] for i in order], cfg.max_new_tokens, batch,
                                         seed=cfg.seed, on_finished=bar.update, on_prefill=show_prefill(bar),
                                         **sampling)
            for i, ids in zip(order, out):
                new[i] = ids
            if stats.busy_share is not None:
                busy = f"; {stats.busy_share:.0%} of the decoding row-steps were busy"
    seconds = time.perf_counter() - start
    print(f"summarized {len(prompts)} article{'s' * (len(prompts) != 1)} in {seconds:.1f} s, {len(prompts) / seconds:.2f} articles/s "
          f"(batch {batch}, {sum(map(len, new)) / seconds:.1f} new tokens/s{busy})")
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


@torch.no_grad()
def next_tokens(model: GPT, tokenizer, row: dict, cfg: Config, after: int = 24) -> dict:
    """Teacher-forced next-token predictions on the summary of one example: each context token, the reference's
    next token and the model's most likely one (the seed's "GPT-2 is already good at next-word prediction"); then
    what the model predicts past the summary's end token, where training never puts a target (the seed's "the words
    after the end are weird"): its five most likely next tokens and `after` tokens of greedy continuation."""
    (ids, n_context), = encode_examples([row], tokenizer, model.prompt_ids, cfg, model.config.n_positions,
                                        model.separator_ids)
    logits = model(torch.tensor([ids], device=model.lm_head.weight.device))[0]  # ids end with the end token
    predicted = logits.argmax(-1).tolist()
    word = lambda i: tokenizer.decode([i]) if i < model.config.vocab_size else "<learned separator>"
    probs, top = logits[-1].float().softmax(-1).topk(5)
    past, = generate(model, [ids], min(after, model.config.n_positions - len(ids)), greedy=True, eos_id=None)
    return {"article_id": row.get("id"),
            "rows": [[word(ids[t]), word(ids[t + 1]), word(predicted[t])] for t in range(n_context - 1, len(ids) - 1)],
            "end_token": word(ids[-1]), "after_end": [[word(i), p] for p, i in zip(probs.tolist(), top.tolist())],
            "continuation": tokenizer.decode(past)}


def next_token_table(table: dict, n: int = 20) -> str:
    """`next_tokens` as text: the first `n` rows, the accuracy over all, and what follows the end token."""
    rows, w = table["rows"], lambda text: repr(text)
    lines = [f"{'context':>16} {'reference next':>16} {'model argmax':>16}"]
    lines += [f"{w(c):>16} {w(r):>16} {w(a):>16}" + ("" if a == r else "   x") for c, r, a in rows[:n]]
    hits = sum(a == r for _, r, a in rows)
    lines.append(f"top-1 next-token accuracy on this summary: {hits}/{len(rows)} = {hits / len(rows):.1%}")
    lines.append(f"after the summary's end token {w(table['end_token'])}, where no training target ever is, the most "
                 "likely next: " + ", ".join(f"{w(t)} {p:.1%}" for t, p in table["after_end"]))
    lines.append(f"greedy decoding past the end token: {w(table['continuation'])}")
    return "\n".join(lines)


def format_rouge(scores: dict[str, float]) -> str:
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    return "  ".join(f"{k:>9}" for k in keys) + "\n" + "  ".join(f"{scores[k]:9.2f}" for k in keys)


def record_path(out: Path, name: str, overwrite: bool = False, suffix: str = ".json") -> Path:
    """Where the run record of `name` goes: <out>/<name>.json, or with `overwrite` off, if that exists, the first
    free one of <name>-2.json, <name>-3.json, ... (`suffix`: another file of the run's, e.g. .next_tokens.json)"""
    if overwrite:
        return out / f"{name}{suffix}"
    return next(p for k in itertools.count(1) if not (p := out / f"{name}{f'-{k}' if k > 1 else ''}{suffix}").exists())


def score_and_write(out: Path, name: str, record: RunRecord, rows: list[dict], predictions: list[str],
                    overwrite: bool = False, split: str = "test") -> Path:
    """Score predictions against the references of `split`, print the ROUGE table, and write each prediction with
    its reference and scores (<out>/<name>.predictions.jsonl), then the run record (<out>/<name>.json; scored on
    validation: <name>.validation.json and .validation.predictions.jsonl), each atomically: a record on disk is
    always whole and has its predictions beside it. An existing record of that name is kept (this one becomes
    <name>-2, -3, ...) unless `overwrite`. Returns the record's path."""
    scores = rouge_scores(predictions, [r["highlights"] for r in rows])
    setattr(record, split, {k: sum(s[k] for s in scores) / max(1, len(scores)) for k in ROUGE_KEYS})
    print(("" if split == "test" else f"ROUGE on the {split} set, not the test set:\n") +
          format_rouge(getattr(record, split)))
    suffix = record_suffix(split)
    path = record_path(out, name, overwrite, suffix)
    write_text(path.with_suffix(".predictions.jsonl"), "".join(
        json.dumps({"id": r["id"], "reference": r["highlights"], "prediction": p} | sc) + "\n"
        for r, p, sc in zip(rows, predictions, scores)))
    write_text(path, json.dumps(record.as_dict(), indent=2))
    kept = f" ({out / name}{suffix} exists: --overwrite replaces it)" if path.name != name + suffix else ""
    print(f"wrote {path} and .predictions.jsonl{kept}")
    return path
