"""The report's figures, drawn from the run records with matplotlib (imports no torch): loss curves, the prompt
formats, the head's overfitting, test ROUGE, ROUGE against temperature, the hyperparameter sweeps, and the cost of
each method. Each is drawn only where its runs exist; otherwise a line says which sweep makes them."""
from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure  # a figure that only saves to files: no pyplot, no window, no global backend
from matplotlib.ticker import MaxNLocator

from peftsum.config import Config
from peftsum.records import METHODS
from peftsum.results import LABELS, ROUGE, TEMPERATURE_RUNS, Results, bootstrap_ci, scores

COLORS = {"prompt_tuning": "tab:blue", "last_layer": "tab:orange", "lora": "tab:green", "full": "tab:red"}
FORMATS = {"": ("-s", 'separator " TL;DR:"', "tab:blue"),  # run-name prefix: line style, label, one color everywhere
           "separator": ("-v", "a learned separator token", "tab:purple"),
           "chat": ("-^", "the chat format", "tab:orange")}
CAPTIONS = {  # each figure's caption in the README: what to read in it
    "loss_curves.png": "Training (dashed) and validation (solid) loss per epoch; the star is the epoch whose weights "
                       "each method keeps (early stopping on validation loss).",
    "formats.png": "The same method trained with the separator \" TL;DR:\", with a learned separator token and in the "
                   "instruct model's chat format: validation (solid) and training (faded) loss per epoch, one color per "
                   "format; the star is the epoch each run kept.",
    "last_layer_overfitting.png": "The head alone at each learning rate: the validation loss turns up while the "
                                  "training loss keeps falling (overfitting); the star is the epoch each run kept.",
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


def star_kept_epoch(ax, run: dict, color) -> None:
    """A star on the validation curve of `run` at the epoch whose weights it kept (early stopping)."""
    kept = [e for e in run["history"] if e["epoch"] == run.get("best_epoch")]
    ax.plot([e["epoch"] for e in kept], [e["val_loss"] for e in kept], "*", color=color, markersize=15,
            markeredgecolor="black")


def subplots(*grid: int, figsize: tuple[float, float], **kw):
    """(figure, axes) as pyplot's `subplots` makes them, on a figure of its own that pyplot never holds."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


class Figures:
    """The figures of one set of runs, each a PNG file in `out`; `written` names those drawn, in order."""

    def __init__(self, results: Results, out: Path):
        self.results, self.runs, self.validation = results, results.runs, results.validation
        self.out, self.written = out, []

    def draw(self) -> list[str]:
        """Every figure whose runs exist; the names of the files written."""
        for figure in (self.loss_curves, self.formats, self.overfitting, self.rouge_bars, self.temperature,
                       self.sweeps, self.cost):
            figure()
        return self.written

    def save(self, fig, name: str, title: str) -> None:
        fig.suptitle(title + (f"\n({self.results.subtitle})" if self.results.subtitle else ""), fontsize=9)
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
        fig, ax = subplots(figsize=(6.4, 4))
        for m in methods:
            h = self.runs[m]["history"]
            epochs = [e["epoch"] for e in h]
            ax.plot(epochs, [e["train_loss"] for e in h], "--o", color=COLORS[m], label=f"{METHODS[m]}, train")
            ax.plot(epochs, [e["val_loss"] for e in h], "-s", color=COLORS[m], label=f"{METHODS[m]}, validation")
            star_kept_epoch(ax, self.runs[m], COLORS[m])
        ax.set(xlabel="epoch", ylabel="loss (nats per summary token)", title="★ the epoch whose weights are kept "
               "(best validation loss)")
        ax.title.set_fontsize(8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "loss_curves.png", "Training and validation loss per epoch")

    def formats(self):
        """Each method's loss curves in each prompt format it was trained in: the separator " TL;DR:", a learned
        separator token (the seed: "a new token gives a better loss curve"), the instruct model's chat format."""
        methods = [m for m in METHODS if self.runs.get(m, {}).get("history") and
                   any(self.runs.get(f"{p}-{m}", {}).get("history") for p in FORMATS if p)]
        if not self.need(methods or ["separator-lora"], "separator"):
            return
        fig, axes = subplots(1, len(methods), figsize=(6.4 * len(methods), 4), squeeze=False)
        for ax, m in zip(axes[0], methods):
            for prefix, (style, what, color) in FORMATS.items():
                run = self.runs.get(f"{prefix}-{m}" if prefix else m, {})
                if h := run.get("history"):
                    epochs = [e["epoch"] for e in h]
                    ax.plot(epochs, [e["val_loss"] for e in h], style, color=color, label=f"{what}, validation")
                    ax.plot(epochs, [e["train_loss"] for e in h], "--" + style[1:], color=color, alpha=0.5,
                            label=f"{what}, train")
                    star_kept_epoch(ax, run, color)
            ax.set(xlabel="epoch", ylabel="loss (nats per summary token)", title=f"{METHODS[m]} (★ the epoch kept)")
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
        fig, ax = subplots(figsize=(7.5, 4.2))
        for i, (lr, r) in enumerate(sorted(by_lr.items())):
            h = r["history"]
            color = colormaps["viridis"](0.85 * i / max(1, len(by_lr) - 1))  # stop before the yellow end
            epochs = [e["epoch"] for e in h]
            ax.plot(epochs, [e["train_loss"] for e in h], "--o", color=color, label=f"lr {lr:g}, train")
            ax.plot(epochs, [e["val_loss"] for e in h], "-s", color=color, label=f"lr {lr:g}, val")
            star_kept_epoch(ax, r, color)
        ax.set(xlabel="epoch", ylabel="loss (nats per summary token)", title="★ the epoch kept (best validation loss)")
        ax.title.set_fontsize(8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "last_layer_overfitting.png", "Last layer: training vs validation loss by learning rate")

    def rouge_bars(self):
        names = [n for n in LABELS if n in self.runs]
        if not self.need(names or ["lora"], "methods"):
            return
        fig, ax = subplots(figsize=(8, 4))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            means = [self.runs[n]["test"][k] for k in ROUGE]
            cis = [bootstrap_ci(scores(self.runs[n], k)) if scores(self.runs[n], k) else (m, m)
                   for k, m in zip(ROUGE, means)]
            err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ROUGE))]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=LABELS[n],
                   color=COLORS.get(n, colormaps["Greys"](0.3 + 0.15 * i)))
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
        chosen = self.results.chosen_temperatures()
        panels = [("validation", self.validation), ("test", self.runs)] if chosen else [("test", self.runs)]
        fig, axes = subplots(1, len(panels), figsize=(6.4 * len(panels), 4), squeeze=False, sharey=True)
        for ax, (split, runs) in zip(axes[0], panels):
            for m in TEMPERATURE_RUNS:
                named = {runs[n]["config"]["temperature"]: n for n in runs if n.startswith(f"temperature-{m}-")}
                what, own = self.results.decoded(m)
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

    def sweeps(self):
        panels = [("lr", "learning rate", lambda r: r["hparams"]["lr"]),
                  ("prompt_tokens", "soft prompt tokens", lambda r: r["hparams"]["prompt_tokens"]),
                  ("lora_rank", "LoRA rank", lambda r: r["hparams"]["lora_rank"])]
        groups = {family: self.results.sweep_points(family, value) for family, _, value in panels}
        present = [p for p in panels if sum(map(len, groups[p[0]].values())) >= 2]
        for family, *_ in panels:
            if not any(p[0] == family for p in present):
                self.need([f"{family}-*"], family)
        if not present:
            return
        fig, axes = subplots(len(present), 2, figsize=(8, 3 * len(present)), squeeze=False)
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

    def cost(self):
        methods = [m for m in METHODS if self.runs.get(m, {}).get("history")]
        if not self.need(methods or list(METHODS), "methods"):
            return
        fig, axes = subplots(1, 4, figsize=(13, 3.4))
        labels = [METHODS[m].replace(" ", "\n", 1) for m in methods]  # two lines: four labels fit under four bars
        colors = [COLORS[m] for m in methods]
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
