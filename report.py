"""Every figure and the results table, from the run records that main*.py and sweep.py wrote to runs/.

  python3 report.py                      figures into plots/, results table and samples into README.md
  python3 report.py --note "stand-in"    label every figure and the table (e.g. runs of a random-weight stand-in)

A figure whose runs are missing is skipped with a line saying which sweep makes them.
"""
import argparse
import json
import random
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

ROOT = Path(__file__).resolve().parent
METHODS = {"prompt_tuning": "prompt tuning", "last_layer": "last layer", "lora": "LoRA"}
BASELINES = {"lead_3": "lead-3", "zero_shot": "zero-shot TL;DR", "hard_prompt-24": "hard prompt", "chat": "chat template"}
ROUGE = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
COLORS = {"prompt_tuning": "tab:blue", "last_layer": "tab:orange", "lora": "tab:green"}
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def load_runs(folder: Path) -> dict[str, dict]:
    runs = {}
    for f in sorted(folder.glob("*.json")):
        record = json.loads(f.read_text())
        preds = f.with_name(f.stem + ".predictions.jsonl")
        record["examples"] = [json.loads(line) for line in open(preds)] if preds.exists() else []
        runs[f.stem] = record
    return runs


def bootstrap_ci(values: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean over test articles."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def best_val(record: dict) -> float:
    return min((h["val_loss"] for h in record.get("history", [])), default=float("nan"))


class Report:
    def __init__(self, runs: dict, out: Path, note: str):
        self.runs, self.out, self.note, self.written = runs, out, note, []

    def save(self, fig, name: str, title: str) -> None:
        note = "\n" + textwrap.fill(f"({self.note})", int(fig.get_figwidth() * 12)) if self.note else ""
        fig.suptitle(title + note, fontsize=10)
        for ax in fig.axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, framealpha=0.85)
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=110)
        plt.close(fig)
        self.written.append(name)

    def need(self, names: list[str], sweep: str) -> bool:
        missing = [n for n in names if n not in self.runs]
        if missing:
            print(f"skipped a figure: no runs {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                  f"(python3 sweep.py {sweep})")
        return not missing

    def loss_curves(self):
        if not self.need(list(METHODS), "methods"):
            return
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for m, label in METHODS.items():
            h = self.runs[m]["history"]
            epochs = [e["epoch"] for e in h]
            ax.plot(epochs, [e["train_loss"] for e in h], "--o", color=COLORS[m], label=f"{label}, train")
            ax.plot(epochs, [e["val_loss"] for e in h], "-s", color=COLORS[m], label=f"{label}, validation")
        ax.set(xlabel="epoch", ylabel="loss (nats per summary token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "loss_curves.png", "Training and validation loss per epoch")

    def overfitting(self):
        names = sorted((n for n in self.runs if n.startswith("lr-last_layer-")), key=lambda n: self.runs[n]["hparams"]["lr"])
        if not self.need(names or ["lr-last_layer-*"], "lr"):
            return
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for i, n in enumerate(names):
            h, lr = self.runs[n]["history"], self.runs[n]["hparams"]["lr"]
            color = plt.cm.viridis(0.85 * i / max(1, len(names) - 1))  # stop before the yellow end
            ax.plot([e["epoch"] for e in h], [e["train_loss"] for e in h], "--o", color=color, label=f"lr {lr:g}, train")
            ax.plot([e["epoch"] for e in h], [e["val_loss"] for e in h], "-s", color=color, label=f"lr {lr:g}, val")
        ax.set(xlabel="epoch", ylabel="loss (nats per summary token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.save(fig, "last_layer_overfitting.png", "Last layer: training vs validation loss by learning rate")

    def rouge_bars(self):
        names = [n for n in (*BASELINES, *METHODS) if n in self.runs]
        if not self.need(names or ["lora"], "methods"):
            return
        fig, ax = plt.subplots(figsize=(7.5, 4))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ex = self.runs[n]["examples"]
            means = [self.runs[n]["test"][k] for k in ROUGE]
            cis = [bootstrap_ci([e[k] for e in ex]) if ex and k in ex[0] else (m, m) for k, m in zip(ROUGE, means)]
            err = [[m - lo for m, (lo, _) in zip(means, cis)], [hi - m for m, (_, hi) in zip(means, cis)]]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ROUGE))]
            ax.bar(xs, means, width, yerr=err, capsize=2, label={**BASELINES, **METHODS}[n],
                   color=COLORS.get(n, plt.cm.Greys(0.35 + 0.2 * i)))
        ax.set_xticks(range(len(ROUGE)), list(ROUGE.values()))
        ax.set(ylabel="F1 (%)")
        self.save(fig, "rouge.png", "Test ROUGE (F1) with 95 % bootstrap intervals")

    def temperature(self):
        names = [n for n in self.runs if n.startswith("temperature-")]
        if not self.need(names or ["temperature-*"], "temperature"):
            return
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for m, label in METHODS.items():
            pts = sorted((self.runs[n]["config"]["temperature"], self.runs[n]["test"]["rougeLsum"])
                         for n in names if n.startswith(f"temperature-{m}-"))
            if pts:
                ax.plot(*zip(*pts), "-o", color=COLORS[m], label=f"{label}, top-p 0.9")
            if f"greedy-{m}" in self.runs:
                ax.axhline(self.runs[f"greedy-{m}"]["test"]["rougeLsum"], color=COLORS[m], ls=":",
                           label=f"{label}, greedy")
        ax.set(xlabel="sampling temperature", ylabel="ROUGE-Lsum F1 (%)")
        self.save(fig, "rouge_vs_temperature.png", "ROUGE-Lsum against sampling temperature")

    def sweeps(self):
        panels = [("lr", "learning rate", lambda r: r["hparams"]["lr"], True),
                  ("prompt_tokens", "soft prompt tokens", lambda r: r["hparams"]["prompt_tokens"], True),
                  ("lora_rank", "LoRA rank", lambda r: r["hparams"]["lora_rank"], True)]
        present = [p for p in panels if any(n.startswith(p[0] + "-") for n in self.runs)]
        for family, *_ in panels:
            if not any(p[0] == family for p in present):
                self.need([f"{family}-*"], family)
        if not present:
            return
        fig, axes = plt.subplots(len(present), 2, figsize=(8, 3 * len(present)), squeeze=False)
        for (family, label, value, log), (a_loss, a_rouge) in zip(present, axes):
            groups = {}
            for n, r in self.runs.items():
                if n.startswith(family + "-"):
                    groups.setdefault(r["method"], []).append((value(r), best_val(r), r["test"]["rougeLsum"]))
            for m, pts in groups.items():
                pts.sort()
                xs = [p[0] for p in pts]
                a_loss.plot(xs, [p[1] for p in pts], "-o", color=COLORS.get(m), label=METHODS.get(m, m))
                a_rouge.plot(xs, [p[2] for p in pts], "-o", color=COLORS.get(m), label=METHODS.get(m, m))
            xs = sorted({p[0] for pts in groups.values() for p in pts})
            for ax, ylabel in ((a_loss, "best validation loss (nats/token)"), (a_rouge, "ROUGE-Lsum F1 (%)")):
                ax.set(xlabel=label, ylabel=ylabel, xscale="log" if log else "linear")
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
                ax.minorticks_off()
                ax.ticklabel_format(axis="y", useOffset=False)
        self.save(fig, "sweeps.png", "Validation loss and ROUGE-Lsum against each hyperparameter")

    def cost(self):
        if not self.need(list(METHODS), "methods"):
            return
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        labels = list(METHODS.values())
        colors = [COLORS[m] for m in METHODS]
        cuda = any("cuda" in str(self.runs[m]["config"].get("device")) for m in METHODS)
        values = [[max(e["peak_memory_mb"] for e in self.runs[m]["history"]) for m in METHODS],
                  [sum(e["seconds"] for e in self.runs[m]["history"]) / len(self.runs[m]["history"]) for m in METHODS],
                  [self.runs[m]["trainable_parameters"] for m in METHODS]]
        specs = [dict(ylabel="peak memory (MB)", title="GPU memory (allocator peak)" if cuda else
                      "memory (process peak RSS)"),
                 dict(ylabel="seconds per epoch (mean)", title="time"),
                 dict(ylabel="trainable parameters", yscale="log", title="parameters (log scale)")]
        for ax, vals, spec, fmt in zip(axes, values, specs, ("{:,.0f}", "{:,.1f}", "{:,}")):
            bars = ax.bar(labels, vals, color=colors)
            ax.bar_label(bars, [fmt.format(v) for v in vals], fontsize=7)
            ax.set(**spec)
            ax.margins(y=0.15)
        for ax in axes:
            ax.tick_params(axis="x", labelsize=8)
        self.save(fig, "cost.png", "What each method costs")

    def table(self) -> str:
        rows = ["| run | trainable parameters | best val loss | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum (95 % CI) "
                "| s / epoch | peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|"]
        for n in (*BASELINES, *METHODS):
            if n not in self.runs:
                continue
            r, ex = self.runs[n], self.runs[n]["examples"]
            t, h = r["test"], r.get("history", [])
            lo, hi = bootstrap_ci([e["rougeLsum"] for e in ex]) if ex and "rougeLsum" in ex[0] else (t["rougeLsum"],) * 2
            rows.append(f"| {({**BASELINES, **METHODS})[n]} | {r.get('trainable_parameters', 0):,} | "
                        f"{best_val(r) if h else '–':.5} | {t['rouge1']:.2f} | {t['rouge2']:.2f} | {t['rougeL']:.2f} | "
                        f"{t['rougeLsum']:.2f} ({lo:.2f}–{hi:.2f}) | "
                        + (f"{sum(e['seconds'] for e in h) / len(h):.1f} | {max(e['peak_memory_mb'] for e in h):.0f} |"
                           if h else "– | – |"))
        base = {r.get("base_model") for n, r in self.runs.items() if n in METHODS or n in BASELINES} - {None}
        test_n = {r.get("test_examples") for r in self.runs.values()} - {None}
        head = (f"Base model: {', '.join(sorted(map(str, base))) or '?'}; test articles: "
                f"{', '.join(map(str, sorted(test_n))) or '?'}. Written by `python3 report.py` from `runs/`.")
        if self.note:
            head = f"**{self.note}.** " + head
        figures = " ".join(f"![{f}](plots/{f})" for f in self.written)
        return "\n".join([head, "", *rows, "", figures, "", "Sample predictions: [plots/samples.md](plots/samples.md)"])

    def samples(self, k: int = 3) -> None:
        ref_run = next((self.runs[n] for n in (*METHODS, *BASELINES) if n in self.runs and self.runs[n]["examples"]),
                       None)
        if ref_run is None:
            return
        lines = ["# Sample predictions", ""] + ([f"_{self.note}_", ""] if self.note else [])
        for ex in ref_run["examples"][:k]:
            lines += [f"## {ex['id']}", "", "**reference**", "", "> " + ex["reference"].replace("\n", "\n> "), ""]
            for n in (*METHODS, *BASELINES):
                match = [e for e in self.runs.get(n, {}).get("examples", []) if e["id"] == ex["id"]]
                if match:
                    text = match[0]["prediction"].replace("\n", " ") or "(empty)"
                    lines += [f"**{({**METHODS, **BASELINES})[n]}** (ROUGE-Lsum {match[0]['rougeLsum']:.1f})", "",
                              "> " + text, ""]
        (self.out / "samples.md").write_text("\n".join(lines))


def write_readme_table(readme: Path, text: str) -> None:
    content = readme.read_text()
    start, end = MARKERS
    if start not in content or end not in content:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=str(ROOT / "runs"), help="folder of run records")
    p.add_argument("--out", default=str(ROOT / "plots"), help="folder for the figures")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose results table to replace")
    p.add_argument("--note", default="", help="a label for every figure and the table")
    args = p.parse_args()
    runs = load_runs(Path(args.runs))
    if not runs:
        raise SystemExit(f"no run records in {args.runs}: run main*.py or sweep.py first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(runs, out, args.note)
    for figure in (report.loss_curves, report.overfitting, report.rouge_bars, report.temperature, report.sweeps,
                   report.cost):
        figure()
    report.samples()
    write_readme_table(Path(args.readme), report.table())
    print(f"wrote {', '.join(report.written)} and samples.md to {out}; the results table to {args.readme}")


if __name__ == "__main__":
    main()
