"""Every figure and results table, from the run records that main*.py and sweep.py write.

  python3 report.py             every set of runs under runs/ (one folder per model and data, e.g. runs/smollm2):
                                its figures into plots/<set>/, its table into README.md between the markers
                                <!-- results:<set>:start --> and <!-- results:<set>:end -->
                                and the runs in runs/ itself (where main*.py write by default): their table
                                printed here, their figures into runs/plots/
  python3 report.py --runs DIR --out DIR --readme FILE [--section NAME] [--note TEXT]     one set, anywhere

A set's NOTE file (or --note) labels its figures and table: which model, data and machine the numbers come from;
its first line is each figure's one-line subtitle, the lines after it the table's caption (one line: both).
A figure whose runs are missing is skipped with a line saying which sweep makes them; a figure of an earlier report
that cannot be made again is removed, and the report says so. Nothing to report: exit code 2.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from peftsum.config import Config  # noqa: E402  (imports no torch)
from peftsum.records import (  # noqa: E402  (imports no torch)
    BASELINES, METHODS, NEXT_TOKENS, SHIPPED, best_val, chosen_runs, label, load_runs, shipped_runs,
    source_run, variant_of)

LABELS = {**BASELINES, **METHODS}
ROUGE = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
COLORS = {"prompt_tuning": "tab:blue", "last_layer": "tab:orange", "lora": "tab:green", "full": "tab:red"}
TEMPERATURE_RUNS = {**METHODS, "chat": "chat template"}  # temperature-<key>-<t>: sweep.py temperature
FORMATS = {"separator": ("-v", "a learned separator token"), "chat": ("-^", "the chat format")}  # prefix: style
CAPTIONS = {  # each figure's caption in the README: what to read in it
    "loss_curves.png": "Training (dashed) and validation (solid) loss per epoch; the star is the epoch whose weights "
                       "each method keeps (early stopping on validation loss).",
    "formats.png": "The same method trained with the separator \" TL;DR:\", with a learned separator token and in the "
                   "instruct model's chat format: validation (solid) and training (faded) loss per epoch.",
    "last_layer_overfitting.png": "The head alone at each learning rate: the validation loss turns up while the "
                                  "training loss keeps falling (overfitting).",
    "rouge.png": "Test ROUGE F1 of every method and baseline with 95 % bootstrap intervals over the test articles.",
    "rouge_vs_temperature.png": "ROUGE-Lsum against sampling temperature (top-p 0.9; dotted: greedy), on the "
                                "validation articles (left, where the starred temperature is chosen) and the test "
                                "articles; the dashed line is the scripts' default.",
    "sweeps.png": "Each hyperparameter sweep: best validation loss (left) and test ROUGE-Lsum (right; the band is its "
                  "95 % bootstrap interval over the test articles); the star is the setting chosen on validation loss.",
    "cost.png": "What each method costs to train: peak memory, seconds per epoch, trainable parameters, and the "
                "bytes its trained weights take (at the precision the run saved them in).",
}
FIGURES = tuple(CAPTIONS)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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


class Report:
    def __init__(self, runs: dict, out: Path, note: str, next_tokens: dict | None = None,
                 validation: dict | None = None, shipped: dict | None = None):
        self.runs, self.out, self.written, self.validation = runs, out, [], validation or {}
        self.shipped = shipped or {}  # {method: the run whose weights models/ holds}
        lines = note.strip().split("\n")
        self.subtitle, self.note = lines[0].strip(), " ".join(" ".join(lines[1:] or lines).split())
        self.tables = {n: next_tokens[n] for n in (*BASELINES, *METHODS) if n in (next_tokens or {})}

    def save(self, fig, name: str, title: str) -> None:
        fig.suptitle(title + (f"\n({self.subtitle})" if self.subtitle else ""), fontsize=9)
        rows = {}  # each row of plots: one legend beside its last plot, off the data, with every line of the row once
        for ax in fig.axes:
            rows.setdefault(ax.get_subplotspec().rowspan.start, []).append(ax)
        for axes in rows.values():
            lines = {}
            for ax in axes:
                for handle, text in zip(*ax.get_legend_handles_labels()):
                    lines.setdefault(text, handle)
            if lines:
                axes[-1].legend(lines.values(), lines.keys(), fontsize=7, framealpha=0.85, loc="upper left",
                                bbox_to_anchor=(1.02, 1), borderaxespad=0)
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.written.append(name)

    def need(self, names: list[str], sweep: str) -> bool:
        missing = [n for n in names if n not in self.runs]
        if missing:
            print(f"skipped a figure: no runs {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                  f"(python3 sweep.py {sweep})")
        return not missing

    def loss_curves(self):
        methods = [m for m in METHODS if self.runs.get(m, {}).get("history")]
        if not self.need(methods or list(METHODS), "methods"):
            return
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for m in methods:
            h = self.runs[m]["history"]
            epochs = [e["epoch"] for e in h]
            ax.plot(epochs, [e["train_loss"] for e in h], "--o", color=COLORS[m], label=f"{METHODS[m]}, train")
            ax.plot(epochs, [e["val_loss"] for e in h], "-s", color=COLORS[m], label=f"{METHODS[m]}, validation")
            kept = [e for e in h if e["epoch"] == self.runs[m].get("best_epoch")]
            ax.plot([e["epoch"] for e in kept], [e["val_loss"] for e in kept], "*", color=COLORS[m], markersize=15,
                    markeredgecolor="black")
        ax.set(xlabel="epoch", ylabel="loss (nats per summary token)", title="★ the epoch whose weights are kept "
               "(best validation loss)")
        ax.title.set_fontsize(8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "loss_curves.png", "Training and validation loss per epoch")

    def formats(self):
        """Each method's loss curves in each prompt format it was trained in: the separator " TL;DR:", a learned
        separator token (the seed: "a new token gives a better loss curve"), the instruct model's chat format."""
        methods = [m for m in METHODS if self.runs.get(m, {}).get("history") and
                   any(self.runs.get(f"{p}-{m}", {}).get("history") for p in FORMATS)]
        if not self.need(methods or ["separator-lora"], "separator"):
            return
        fig, axes = plt.subplots(1, len(methods), figsize=(6.4 * len(methods), 4), squeeze=False)
        for ax, m in zip(axes[0], methods):
            for name, (style, what) in {m: ("-s", 'separator " TL;DR:"'), **{f"{p}-{m}": v for p, v in
                                                                            FORMATS.items()}}.items():
                h = self.runs.get(name, {}).get("history")
                if h:
                    epochs = [e["epoch"] for e in h]
                    line, = ax.plot(epochs, [e["val_loss"] for e in h], style, label=f"{what}, validation")
                    ax.plot(epochs, [e["train_loss"] for e in h], style.replace("-", "--", 1).replace("-.", "--"),
                            color=line.get_color(), alpha=0.5, label=f"{what}, train")
            ax.set(xlabel="epoch", ylabel="loss (nats per summary token)", title=METHODS[m])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "formats.png", "Loss per epoch in each prompt format")

    def overfitting(self):
        """The last layer's train vs validation loss at each learning rate (the seed: 1e-3 overfits)."""
        by_lr = {}
        for n in sorted(self.runs):
            r = self.runs[n]
            if (n == "last_layer" or n.startswith("lr-last_layer-")) and r.get("history"):
                by_lr.setdefault(r["hparams"]["lr"], r)
        if len(by_lr) < 2:
            print("skipped a figure: the last layer needs runs at two learning rates "
                  "(python3 sweep.py lr --only 'lr-last_layer-*')")
            return
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for i, (lr, r) in enumerate(sorted(by_lr.items())):
            h = r["history"]
            color = plt.cm.viridis(0.85 * i / max(1, len(by_lr) - 1))  # stop before the yellow end
            ax.plot([e["epoch"] for e in h], [e["train_loss"] for e in h], "--o", color=color, label=f"lr {lr:g}, train")
            ax.plot([e["epoch"] for e in h], [e["val_loss"] for e in h], "-s", color=color, label=f"lr {lr:g}, val")
        ax.set(xlabel="epoch", ylabel="loss (nats per summary token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "last_layer_overfitting.png", "Last layer: training vs validation loss by learning rate")

    def rouge_bars(self):
        names = [n for n in LABELS if n in self.runs]
        if not self.need(names or ["lora"], "methods"):
            return
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            means = [self.runs[n]["test"][k] for k in ROUGE]
            cis = [bootstrap_ci(scores(self.runs[n], k)) if scores(self.runs[n], k) else (m, m)
                   for k, m in zip(ROUGE, means)]
            err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ROUGE))]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=LABELS[n],
                   color=COLORS.get(n, plt.cm.Greys(0.3 + 0.15 * i)))
        ax.set_xticks(range(len(ROUGE)), list(ROUGE.values()))
        ax.set(ylabel="F1 (%)")
        self.save(fig, "rouge.png", "Test ROUGE (F1) with 95 % bootstrap intervals")

    def temperature(self):
        """Test ROUGE-Lsum against the sampling temperature for each method and the chat template; beside it, where
        they were run (--eval-split validation), the same on the validation articles, the temperature each is given
        there starred: the choice made without the test set."""
        names = [n for n in self.runs if n.startswith("temperature-")]
        if not self.need(names or ["temperature-*"], "temperature"):
            return
        chosen = self.chosen_temperatures()
        panels = [("validation", self.validation), ("test", self.runs)] if chosen else [("test", self.runs)]
        fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4), squeeze=False, sharey=True)
        for ax, (split, runs) in zip(axes[0], panels):
            for m in TEMPERATURE_RUNS:
                named = {runs[n]["config"]["temperature"]: n for n in runs if n.startswith(f"temperature-{m}-")}
                what, own = self.decoded(m)
                if own in runs and not runs[own]["config"].get("greedy"):  # that run itself, at its temperature
                    named.setdefault(runs[own]["config"]["temperature"], own)
                pts = sorted((t, runs[n][split]["rougeLsum"], *bootstrap_ci(scores(runs[n], "rougeLsum")))
                             for t, n in named.items())
                if pts:
                    t, mean, lo, hi = zip(*pts)
                    ax.plot(t, mean, "-o", color=COLORS.get(m, "black"), label=f"{what}, top-p 0.9")
                    ax.fill_between(t, lo, hi, color=COLORS.get(m, "black"), alpha=0.12)
                if split == "test" and f"greedy-{m}" in runs:
                    ax.axhline(runs[f"greedy-{m}"]["test"]["rougeLsum"], color=COLORS.get(m, "black"), ls=":",
                               label=f"{what}, greedy")
                if split == "validation" and m in chosen:
                    t, value = chosen[m]
                    ax.plot([t], [value], "*", color=COLORS.get(m, "black"), markersize=15, markeredgecolor="black")
            ax.axvline(Config.temperature, color="grey", ls="--", lw=1,
                       label=f"the scripts' default, {Config.temperature:g}")
            ax.set(xlabel="sampling temperature", ylabel=f"{split} ROUGE-Lsum F1 (%)",
                   title="★ chosen on validation ROUGE-Lsum" if split == "validation" else
                   "test set" if len(panels) > 1 else "")
            ax.title.set_fontsize(8)
        self.save(fig, "rouge_vs_temperature.png", "ROUGE-Lsum against sampling temperature (95 % bootstrap band)")

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

    def sweeps(self):
        panels = [("lr", "learning rate", lambda r: r["hparams"]["lr"]),
                  ("prompt_tokens", "soft prompt tokens", lambda r: r["hparams"]["prompt_tokens"]),
                  ("lora_rank", "LoRA rank", lambda r: r["hparams"]["lora_rank"])]
        groups = {family: self.sweep_points(family, value) for family, _, value in panels}
        present = [p for p in panels if sum(map(len, groups[p[0]].values())) >= 2]
        for family, *_ in panels:
            if not any(p[0] == family for p in present):
                self.need([f"{family}-*"], family)
        if not present:
            return
        fig, axes = plt.subplots(len(present), 2, figsize=(8, 3 * len(present)), squeeze=False)
        for (family, xlabel, value), (a_loss, a_rouge) in zip(present, axes):
            for m, pts in groups[family].items():
                xs = [p[0] for p in pts]
                a_loss.plot(xs, [p[1] for p in pts], "-o", color=COLORS.get(m), label=METHODS.get(m, m))
                a_rouge.plot(xs, [p[2] for p in pts], "-o", color=COLORS.get(m), label=METHODS.get(m, m))
                a_rouge.fill_between(xs, [p[3] for p in pts], [p[4] for p in pts], color=COLORS.get(m), alpha=0.12,
                                     linewidth=0)  # the 95 % bootstrap interval over the test articles
                chosen = min(pts, key=lambda p: p[1])  # chosen on validation loss, never on the test set
                for ax, y in ((a_loss, chosen[1]), (a_rouge, chosen[2])):
                    ax.plot([chosen[0]], [y], "*", color=COLORS.get(m), markersize=14, markeredgecolor="black")
            xs = sorted({p[0] for pts in groups[family].values() for p in pts})
            for ax, ylabel in ((a_loss, "best validation loss (nats/token)"), (a_rouge, "test ROUGE-Lsum F1 (%)")):
                ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log", title="★ chosen on validation loss")
                ax.title.set_fontsize(8)
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
                ax.minorticks_off()
                ax.ticklabel_format(axis="y", useOffset=False)
        self.save(fig, "sweeps.png", "Validation loss and ROUGE-Lsum against each hyperparameter")

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

    def cost(self):
        methods = [m for m in METHODS if self.runs.get(m, {}).get("history")]
        if not self.need(methods or list(METHODS), "methods"):
            return
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
        labels, colors = [METHODS[m] for m in methods], [COLORS[m] for m in methods]
        cuda = any("cuda" in str(self.runs[m]["config"].get("device")) for m in methods)
        hist = lambda m: self.runs[m]["history"]
        stored = lambda r: r["trainable_parameters"] * (2 if r["config"].get("save_dtype") == "bf16" else 4)
        values = [[max(e["peak_memory_mb"] for e in hist(m)) for m in methods],
                  [sum(e["seconds"] for e in hist(m)) / len(hist(m)) for m in methods],
                  [self.runs[m]["trainable_parameters"] for m in methods],
                  [stored(self.runs[m]) / 1e6 for m in methods]]
        specs = [dict(ylabel="peak memory (MB)", title="GPU memory (allocator peak)" if cuda else
                      "memory (process peak RSS)"),
                 dict(ylabel="seconds per epoch (mean)", title="time"),
                 dict(ylabel="trainable parameters", yscale="log", title="parameters (log scale)"),
                 dict(ylabel="MB", yscale="log", title="weights stored per task (log scale)")]
        for ax, vals, spec, fmt in zip(axes, values, specs, ("{:,.0f}", "{:,.1f}", "{:,}", "{:,.2f}")):
            bars = ax.bar(labels, vals, color=colors)
            ax.bar_label(bars, [fmt.format(v) for v in vals], fontsize=7)
            ax.set(**spec)
            ax.margins(y=0.15)
            ax.tick_params(axis="x", labelsize=8)
        self.save(fig, "cost.png", "What each method costs")

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
        others = f"; the other {rest}, {'as the note above says' if self.note else 'made before records did, do not say'}"
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
                          f"{sum(e['tokens_per_s'] for e in h) / len(h):.0f}", f"{max(e['peak_memory_mb'] for e in h):.0f}"]
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
        return (f"- {label(a, self.runs[a], self.runs)} − {label(b, self.runs[b], self.runs)}: {mean:+.2f} ({lo:+.2f} to {hi:+.2f}), "
                f"{verdict}{cover}")

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

    def section(self, figure_dir: str) -> str:
        base = sorted({str(r.get("base_model")) for n, r in self.runs.items() if r.get("base_model")})
        test_n = sorted({r.get("n_examples", {}).get("test", r.get("test_examples")) for r in self.runs.values()}
                        - {None})
        head = (f"Base model: {', '.join(base) or '?'}; test articles: {', '.join(map(str, test_n)) or '?'}. "
                f"Written by `python3 report.py` from the run records in `runs/`.")
        if self.note:
            head = f"**{self.note}**\n\n" + head
        figures = [line for f in self.written for line in (f"![{f}]({figure_dir}/{f})", "", f"*{CAPTIONS[f]}*", "")]
        diffs = self.differences()
        chosen = [line, ""] if (line := self.chosen_line()) else []
        if made := self.machines_line():
            head += f"\n\n{made}"
        return "\n".join([head, "", *chosen, *self.table_rows(), "", *figures,
                          *(["Differences in ROUGE-Lsum (paired bootstrap over the same test articles, 95 %):", "",
                             *diffs, ""] if diffs else []),
                          *self.temperature_lines(),
                          *self.next_token_rows(),
                          *(["Three test articles, each run's summary beside the reference:", "", *self.samples()]
                            if self.samples() else [])]).rstrip() + "\n"


def write_section(readme: Path, section: str, text: str) -> None:
    content = readme.read_text()
    start, end = f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->"
    if start not in content or end not in content:
        raise SystemExit(f"error: {readme} has no {start} ... {end} markers: add them where the table goes")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    atomic_write(readme, pattern.sub(lambda _: f"{start}\n{text}{end}", content))


def report(runs_dir: Path, out: Path, readme: Path | None, section: str, note: str, shipped: Path = SHIPPED) -> None:
    """The figures of the runs in `runs_dir` into `out`, and their section into `readme` between its markers (None:
    printed here); the section says which runs the weights in `shipped` are."""
    runs = load_runs(runs_dir)
    if not runs:
        print(f"error: no run records in {runs_dir}: run main*.py or sweep.py first", file=sys.stderr)
        sys.exit(2)
    if not note and (runs_dir / "NOTE").is_file():
        note = (runs_dir / "NOTE").read_text()
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(runs, out, note, load_next_tokens(runs_dir), load_runs(runs_dir, "validation"),
                 shipped_runs(runs, shipped))
    for figure in (rep.loss_curves, rep.formats, rep.overfitting, rep.rouge_bars, rep.temperature, rep.sweeps, rep.cost):
        figure()
    for stale in sorted(set(FIGURES) - set(rep.written)):
        if (out / stale).exists():
            (out / stale).unlink()
            print(f"removed {out / stale}: an earlier report's figure whose runs are not in {runs_dir}")
    if readme is None:
        print(rep.section(str(out)))
        print(f"wrote {', '.join(rep.written) or 'no figures'} to {out}")
        return
    try:
        figure_dir = out.resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        figure_dir = str(out)
    write_section(readme, section, rep.section(figure_dir))
    print(f"wrote {', '.join(rep.written) or 'no figures'} to {out}; the '{section}' results into {readme}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, help="one folder of run records (default: every folder under runs/)")
    p.add_argument("--out", type=Path, help="folder for its figures (default: plots/<folder name>)")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README whose results section to replace")
    p.add_argument("--section", help="the README section's name (default: the runs folder's name)")
    p.add_argument("--note", default="", help="a label for the figures and the table (default: the folder's NOTE)")
    args = p.parse_args()
    if args.runs:
        report(args.runs, args.out or ROOT / "plots" / args.runs.name, args.readme, args.section or args.runs.name,
               args.note)
        return
    sets = sorted(d for d in (ROOT / "runs").glob("*/") if any(d.glob("*.json")))
    own = any((ROOT / "runs").glob("*.json"))  # what main*.py write with their default --out
    if not sets and not own:
        print("error: no run records in runs/: run main*.py or sweep.py first", file=sys.stderr)
        sys.exit(2)
    for d in sets:
        report(d, ROOT / "plots" / d.name, args.readme, d.name, args.note)
    if own:
        report(ROOT / "runs", ROOT / "runs" / "plots", None, "runs", args.note)


if __name__ == "__main__":
    main()
