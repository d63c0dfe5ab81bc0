"""What the run records say, as numbers and as the README's results section (imports no torch): bootstrap
intervals and paired differences over the test articles, the choices made on the validation articles, the table of
runs, the next-token table and sample summaries."""
from __future__ import annotations

import json
import re
from pathlib import Path

from peftsum.config import Config
from peftsum.records import BASELINES, METHODS, NEXT_TOKENS, best_val, chosen_runs, label, source_run, variant_of

LABELS = {**BASELINES, **METHODS}
ROUGE = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
TEMPERATURE_RUNS = {**METHODS, "chat": "chat template"}  # temperature-<key>-<t>: sweep.py temperature


def load_next_tokens(folder: Path) -> dict[str, dict]:
    """{run name: its next-token table} for the tables --inspect wrote into `folder` (sweep.py next_tokens)."""
    tables = {}
    for f in sorted(folder.glob("*" + NEXT_TOKENS)):
        try:
            table = json.loads(f.read_text())
            assert isinstance(table, dict) and table["rows"] and table["after_end"]
        except (ValueError, AssertionError, KeyError, TypeError):
            print(f"skipped {f}: not a next-token table")
            continue
        tables[f.name[:-len(NEXT_TOKENS)]] = table
    return tables


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean over test articles."""
    import numpy as np
    values = np.asarray(values, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), (n, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b over the same articles, and its 95 % paired-bootstrap interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return (sum(diffs) / len(diffs), *bootstrap_ci(diffs))


def by_article(examples: list[dict], key: str) -> dict[tuple[str, int], float]:
    """{(id, k): score} of each article that has the score: its id and which occurrence of that id it is, so that
    articles whose ids repeat or are null (records written before the ids were made unique) still pair one to one,
    in order, instead of collapsing into one."""
    seen, out = {}, {}
    for e in examples:
        article = str(e.get("id"))
        seen[article] = seen.get(article, 0) + 1
        if key in e:
            out[article, seen[article]] = e[key]
    return out


def repeats(text: str, n: int = 8) -> bool:
    """True when some run of n words occurs twice: the loop greedy decoding falls into ("the seed's greedy loops")."""
    words = text.split()
    runs = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(runs) != len(set(runs))


def natural(name: str) -> list:
    """A run name's sort key with its numbers as numbers: rank 4 before rank 16 before rank 32."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def scores(record: dict, key: str) -> list[float]:
    return [e[key] for e in record["examples"] if key in e]


class Results:
    """One set of runs: {name: record} scored on the test set, those scored on validation, the next-token tables,
    and {method: the run whose weights models/ holds}, read from the folder `source` (as the section names it).
    `note` labels them: its first line is the figures' subtitle, the rest the section's caption (one line: both)."""

    def __init__(self, runs: dict, note: str = "", next_tokens: dict | None = None, validation: dict | None = None,
                 shipped: dict | None = None, source: str = "runs"):
        self.runs, self.validation, self.shipped, self.source = runs, validation or {}, shipped or {}, source
        lines = note.strip().split("\n")
        self.subtitle, self.note = lines[0].strip(), " ".join(" ".join(lines[1:] or lines).split())
        self.tables = {n: next_tokens[n] for n in (*BASELINES, *METHODS) if n in (next_tokens or {})}

    def decoded(self, m: str) -> tuple[str, str]:
        """(label, run) of the weights that the temperature and greedy runs of `m` decoded: a method's shipped
        weights, which need not be its run at the defaults; the chat template is itself."""
        names = [n for n in (*self.runs, *self.validation) if n.startswith(f"temperature-{m}-") or n == f"greedy-{m}"]
        record = self.runs.get(names[0]) or self.validation[names[0]] if names else {}
        own = source_run(record, self.runs) or m
        return label(own, self.runs[own]) if own in self.runs else TEMPERATURE_RUNS[m], own

    def chosen_temperatures(self) -> dict[str, tuple[float, float]]:
        """{method or "chat": (temperature, validation ROUGE-Lsum)} with the highest validation ROUGE-Lsum among
        its runs scored on validation (sweep.py temperature --eval-split validation); at least two temperatures."""
        chosen = {}
        for m in TEMPERATURE_RUNS:
            pts = [(r["config"]["temperature"], r["validation"]["rougeLsum"]) for n, r in self.validation.items()
                   if n.startswith(f"temperature-{m}-")]
            if len(pts) >= 2:
                chosen[m] = max(pts, key=lambda p: p[1])
        return chosen

    def sweep_points(self, family: str, value) -> dict[str, list[tuple]]:
        """{method: [(setting, best validation loss, test ROUGE-Lsum, its 95 % interval's ends), ...] by setting}: the
        family's runs, and each method's run at its defaults, the same configuration as the family's run at that
        setting (kept once)."""
        groups = {}
        for n, r in self.runs.items():
            if n.startswith(family + "-") or (n in METHODS and any(o.startswith(f"{family}-") and
                                                                   self.runs[o].get("method") == n for o in self.runs)):
                try:
                    rouge = r["test"]["rougeLsum"]
                    groups.setdefault(r["method"], {}).setdefault(value(r), (value(r), best_val(r), rouge, *(
                        bootstrap_ci(scores(r, "rougeLsum")) if scores(r, "rougeLsum") else (rouge, rouge))))
                except KeyError:  # a record without that hyperparameter (another method's default run)
                    continue
        return {m: sorted(points.values()) for m, points in groups.items()}

    def chosen(self) -> dict[str, str]:
        return chosen_runs(self.runs)

    def chosen_line(self) -> str:
        """What ★ means, and which runs the weights in `models/` are (when they come from these records)."""
        chosen = self.chosen()
        if not chosen:
            return ""
        line = ("★ marks each method's configuration with the lowest validation loss: the one chosen on the 40 "
                "validation articles, never on the test set.")
        if not self.shipped:
            return line
        rows = [label(n, self.runs[n], self.runs) + (" ★" if chosen.get(m) == n else f" (not {METHODS[m]}'s ★)")
                for m, n in self.shipped.items()]
        return line + f" The weights in `models/`, which the scripts read with no flags, are these rows: " \
            f"{'; '.join(rows)}."

    def machines_line(self) -> str:
        """Which records name the machine and precision they ran in (records have since 2026-12-03; --dtype auto is
        bf16 autocast on a CPU with bf16 units and fp32 elsewhere), so that a row made on other hardware than the
        note's says so."""
        made = {}
        for n, r in self.runs.items():
            if (m := r.get("machine")) and m.get("precision"):
                made.setdefault(f"{m['precision']} on {m.get('hardware', '?')}", []).append(label(n, r, self.runs))
        if not made:
            return ""
        said = "; ".join(" and ".join(f'"{row}"' for row in sorted(rows)) + f" ran in {where}"
                         for where, rows in sorted(made.items()))
        rest = len(self.runs) - sum(map(len, made.values()))
        why = "as the note above says" if self.note else "made before records did, do not say"
        others = f"; the other {rest}, {why}"
        return f"Records that name their machine: the rows {said}{others if rest else ''}."

    def table_rows(self) -> list[str]:
        """Baselines, then the methods, then their variants (other learning rates, prompt lengths, ranks, formats,
        greedy decoding); ★ on each method's configuration chosen on validation."""
        variants = sorted((n for n in self.runs
                          if n.startswith(("lr-", "prompt_tokens-", "lora_rank-", "chat-", "separator-", "greedy-",
                                           "hard_prompt-")) and n not in LABELS), key=natural)
        chosen = set(self.chosen().values())
        rows = ["| run | trainable parameters | best val loss | " + " | ".join(f"{v} (95 % CI)" for v in ROUGE.values())
                + " | repeating summaries | epochs | s / epoch | tokens / s | peak memory (MB) |", "|---" * 12 + "|"]
        for n in [n for n in LABELS if n in self.runs] + variants:
            r, h = self.runs[n], self.runs[n].get("history", [])
            cells = [label(n, r, self.runs) + " ★" * (n in chosen), f"{r.get('trainable_parameters', 0):,}",
                     f"{best_val(r):.3f}" if h else "–"]
            for k in ROUGE:
                lo, hi = bootstrap_ci(scores(r, k)) if scores(r, k) else (r["test"][k],) * 2
                cells.append(f"{r['test'][k]:.2f} ({lo:.1f}–{hi:.1f})")
            examples = r.get("examples", [])
            cells.append(f"{sum(repeats(e['prediction']) for e in examples)} / {len(examples)}" if examples else "–")
            if h:
                cells += [str(len(h)), f"{sum(e['seconds'] for e in h) / len(h):.0f}",
                          f"{sum(e['tokens_per_s'] for e in h) / len(h):.0f}",
                          f"{max(e['peak_memory_mb'] for e in h):.0f}"]
            else:
                cells += ["–"] * 4
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    def differences(self) -> list[str]:
        """Paired-bootstrap differences in ROUGE-Lsum on the same test articles, significant where the 95 % interval
        excludes zero: each method against each baseline and each other method, then each run of a variant
        (greedy decoding, another learning rate, rank or prompt length) against the run it varies, and a method
        trained in the chat format against the chat prompt with no training and against the method trained with the
        separator, and a method with a learned separator token against the same method with the text separator."""
        names = [n for n in LABELS if n in self.runs and scores(self.runs[n], "rougeLsum")]
        pairs = [(a, b) for i, a in enumerate(names) if a in METHODS for b in names[:i]]
        for name in sorted(self.runs, key=natural):
            kind, rest = variant_of(name)
            base = (source_run(self.runs[name], self.runs) or rest) if kind == "greedy" else \
                self.runs[name].get("method")  # greedy-<run>: the run it decoded again; lr-<method>-<lr>, ...
            if kind in ("greedy", "lr", "lora_rank", "prompt_tokens") and base in self.runs:
                pairs.append((base, name))
            if name.startswith("chat-") and self.runs[name].get("method") in METHODS:  # trained in the chat format:
                pairs += [(name, b) for b in ("chat", self.runs[name]["method"]) if b in self.runs]  # vs its prompt
            if name.startswith("separator-") and self.runs[name].get("method") in self.runs:
                pairs.append((name, self.runs[name]["method"]))
        return [line for a, b in pairs if (line := self.difference(a, b))]

    def difference(self, a: str, b: str) -> str | None:
        scores_a, scores_b = (by_article(self.runs[n].get("examples", []), "rougeLsum") for n in (a, b))
        common = [k for k in scores_a if k in scores_b]
        if not common:
            return None
        mean, lo, hi = paired_difference([scores_a[k] for k in common], [scores_b[k] for k in common])
        verdict = "**significant**" if lo > 0 or hi < 0 else "not significant"
        n = max(len(scores_a), len(scores_b))
        cover = f" (the {len(common)} of {n} articles both runs summarized)" if len(common) < n else ""
        return (f"- {label(a, self.runs[a], self.runs)} − {label(b, self.runs[b], self.runs)}: "
                f"{mean:+.2f} ({lo:+.2f} to {hi:+.2f}), {verdict}{cover}")

    def temperature_lines(self) -> list[str]:
        """Each temperature chosen on validation, and on the test set each method at its chosen temperature against
        the chat template at its own (paired bootstrap), where those test runs exist."""
        chosen = self.chosen_temperatures()
        if not chosen:
            return []
        def at(m: str) -> str:  # the test run of m at its chosen temperature (at the default: m's own run too)
            name, own = f"temperature-{m}-{chosen[m][0]:g}", self.decoded(m)[1]
            return own if name not in self.runs and chosen[m][0] == Config.temperature and own in self.runs else name
        lines = ["The sampling temperature chosen on the validation articles (highest validation ROUGE-Lsum, "
                 "`python3 sweep.py temperature --eval-split validation`): " + ", ".join(
                     f"{self.decoded(m)[0]} {t:g} ({v:.2f})" for m, (t, v) in chosen.items()) + ".", ""]
        pairs = [(at(m), at("chat")) for m in chosen if m != "chat" and "chat" in chosen]
        pairs += [(at(m), "chat") for m in chosen if m != "chat" and ("chat" not in chosen or at("chat") != "chat")]
        found = [line for a, b in pairs if a in self.runs and b in self.runs and (line := self.difference(a, b))]
        if found:
            lines += ["On the test set, each at the temperature chosen on validation (paired bootstrap, 95 %):", "",
                      *found, ""]
        return lines

    def samples(self, k: int = 3) -> list[str]:
        """For the first k test articles, the reference and each run's summary."""
        first = next((self.runs[n] for n in (*METHODS, *BASELINES) if self.runs.get(n, {}).get("examples")), None)
        if first is None:
            return []
        lines = []
        for ex in first["examples"][:k]:
            lines += ["<details>", f"<summary>test article {ex['id']}</summary>", "", "**reference**", "",
                      "> " + ex["reference"].strip().replace("\n", "\n> "), ""]
            for n in (*METHODS, *BASELINES):
                match = [e for e in self.runs.get(n, {}).get("examples", []) if e["id"] == ex["id"]]
                if match:
                    text = " ".join(match[0]["prediction"].split()) or "(empty)"
                    lines += [f"**{LABELS[n]}** (ROUGE-Lsum {match[0]['rougeLsum']:.1f})", "", "> " + text, ""]
            lines += ["</details>", ""]
        return lines

    def next_token_rows(self, n: int = 20) -> list[str]:
        """The assignment's next-word table for each run that has one, side by side on the same test article: the
        summary teacher-forced, each run's most likely next token; then what each predicts past the end token."""
        tables = self.tables
        if not tables or len({(t["article_id"], len(t["rows"])) for t in tables.values()}) != 1:
            return []
        code = lambda text: "`" + repr(text).replace("`", "'") + "`"
        cell = lambda text: code(text).replace("|", "\\|")  # a table cell: GitHub reads | as the next cell
        first = next(iter(tables.values()))
        name = {r: label(self.shipped[r], self.runs[self.shipped[r]]) if r in self.shipped and
                Path(t.get("weights", "")) == Path("models", f"{r}.safetensors") else LABELS[r]
                for r, t in tables.items()}  # a method's table decodes its shipped weights: the run they are
        lines = [f"The next-token table of test article {first['article_id']} (`python3 sweep.py next_tokens`): "
                 f"its reference summary teacher-forced, each run's most likely next token (**bold**: the "
                 f"reference's), the first {n} of {len(first['rows'])} positions:", "",
                 "| context | reference next | " + " | ".join(name[r] for r in tables) + " |",
                 "|---" * (2 + len(tables)) + "|"]
        for i, (context, reference, _) in enumerate(first["rows"][:n]):
            guesses = [t["rows"][i][2] for t in tables.values()]
            lines.append(f"| {cell(context)} | {cell(reference)} | " + " | ".join(
                f"**{cell(g)}**" if g == reference else cell(g) for g in guesses) + " |")
        hits = {r: sum(a == b for _, b, a in t["rows"]) for r, t in tables.items()}
        lines += ["", "Top-1 accuracy over the whole summary: " + ", ".join(
            f"{name[r]} {hits[r]}/{len(t['rows'])} ({hits[r] / len(t['rows']):.0%})" for r, t in tables.items())
            + f". Past the summary's end token {code(first['end_token'])}, where training puts no target:", ""]
        lines += [f"- {name[r]}: most likely next " + ", ".join(f"{code(w)} {p:.1%}" for w, p in t["after_end"][:3])
                  + f"; greedy decoding goes on with {code(t['continuation'])}" for r, t in tables.items()]
        return lines + [""]

    def section(self, figures: dict[str, str], figure_dir: str) -> str:
        """The README's results section: the table, then each figure ({file name: caption}, found in `figure_dir`
        relative to the README), the paired differences, the temperatures, the next-token table and three samples."""
        base = sorted({str(r.get("base_model")) for n, r in self.runs.items() if r.get("base_model")})
        test_n = sorted({r.get("n_examples", {}).get("test", r.get("test_examples")) for r in self.runs.values()}
                        - {None})
        head = (f"Base model: {', '.join(base) or '?'}; test articles: {', '.join(map(str, test_n)) or '?'}. "
                f"Written by `python3 report.py` from the run records in `{self.source}/`.")
        if self.note:
            head = f"**{self.note}**\n\n" + head
        shown = [line for f, caption in figures.items()
                 for line in (f"![{f}]({figure_dir}/{f})", "", f"*{caption}*", "")]
        diffs = self.differences()
        chosen = [line, ""] if (line := self.chosen_line()) else []
        if made := self.machines_line():
            head += f"\n\n{made}"
        return "\n".join([head, "", *chosen, *self.table_rows(), "", *shown,
                          *(["Differences in ROUGE-Lsum (paired bootstrap over the same test articles, 95 %):", "",
                             *diffs, ""] if diffs else []),
                          *self.temperature_lines(),
                          *self.next_token_rows(),
                          *(["Three test articles, each run's summary beside the reference:", "", *self.samples()]
                            if self.samples() else [])]).rstrip() + "\n"
