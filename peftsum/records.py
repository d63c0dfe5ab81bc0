"""Run records and run names: what a run writes about itself (into <out>/<name>.json and into the metadata of the
weights it trained), and the names its record gets. The CLI, `sweep.py` and `report.py` all read these rules from
here. Imports no torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from peftsum.config import ROOT

METHODS = {"prompt_tuning": "prompt tuning", "last_layer": "last layer", "lora": "LoRA", "full": "full fine-tuning"}
BASELINES = {"lead_3": "lead-3", "zero_shot": "zero-shot TL;DR", "hard_prompt-24": "hard prompt",
             "chat": "chat template"}
SHIPPED = ROOT / "models"  # where each script reads its method's weights by default
SCRIPTS = {"prompt_tuning": "main.py", "last_layer": "main1.py", "lora": "main2.py"}  # full: main1.py --full
VARIANTS = ("lr", "prompt_tokens", "lora_rank", "temperature", "greedy")  # families of runs that vary one setting


@dataclass
class RunRecord:
    """What a run did. `config` and `hparams` are the settings it ran with, after the defaults were resolved (an
    evaluation's include those it took from the weights' record); `data` is a folder relative to the repository
    when it lies inside it, else as given (a hub name, or a path elsewhere)."""
    method: str  # prompt_tuning, last_layer, lora, baseline or lead_3
    base_model: str | None
    config: dict
    hparams: dict = field(default_factory=dict)  # the method's hyperparameters; none for a baseline
    data: str = ""
    n_examples: dict = field(default_factory=dict)  # {split: examples the run actually used}
    trainable_parameters: int = 0
    total_parameters: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per training epoch
    best_epoch: int | None = None  # the epoch whose weights were kept (best validation loss)
    test: dict | None = None  # mean ROUGE F1 (%) over the test articles
    validation: dict | None = None  # the same over the validation articles, for --eval-split validation
    machine: dict = field(default_factory=dict)  # what it ran on and in: {"hardware", "precision"}. --dtype auto
    # is bf16 autocast on a CPU with bf16 units and fp32 elsewhere, so the same command's numbers depend on it

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def set_history(self, history: list[dict]) -> None:
        self.history = history
        losses = [e["val_loss"] for e in history]
        self.best_epoch = history[losses.index(min(losses))]["epoch"] if losses and not math.isnan(min(losses)) \
            else None


def portable_path(name: str) -> str:
    """A data folder or weights path as a record states it: relative to the repository when it lies inside it (so
    that the record holds in any clone), else unchanged (a hub name, or a folder elsewhere)."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return name


def local_path(name: str) -> str:
    """What a recorded folder names on this machine: a path relative to the repository, else unchanged."""
    return str(ROOT / name) if name and not Path(name).is_absolute() and (ROOT / name).exists() else name


def out_folder(out: str) -> Path:
    """Where a run writes its record and predictions: --out, else runs/ in the repository."""
    return Path(out) if out else ROOT / "runs"


NEXT_TOKENS = ".next_tokens.json"  # what --inspect writes beside the run records: <out>/<run name>.next_tokens.json
VALIDATION = ".validation.json"  # the record of a run scored on the validation split (--eval-split validation)


def record_suffix(split: str) -> str:
    """The end of the name of a run's record when it scores `split`: <name>.json for the test set, the one every
    table reports; <name>.validation.json for the validation set, where settings are chosen."""
    return VALIDATION if split == "validation" else ".json"


def checkpoint_path(weights: Path) -> Path:
    """Where a training into `weights` keeps its checkpoint until it ends."""
    return weights.with_name(weights.stem + ".ckpt.safetensors")


def run_name(method: str, *, baseline: bool, chat: bool, baseline_prompt_tokens: int) -> str:
    """The default name of a run's record: the method's, or the baseline's prompt."""
    if not baseline:
        return method
    return "chat" if chat else f"hard_prompt-{baseline_prompt_tokens}" if baseline_prompt_tokens else "zero_shot"


def variant_name(family: str, *parts) -> str:
    """The name of a run in one of the VARIANTS families, e.g. lr-lora-0.001, lora_rank-8, greedy-lora."""
    return "-".join([family, *map(str, parts)])


def variant_of(name: str) -> tuple[str, str]:
    """(family, the rest) of a variant's name, e.g. ("greedy", "lora"); ("", name) for any other run."""
    family, _, rest = name.partition("-")
    return (family, rest) if family in VARIANTS and rest else ("", name)


def label(name: str, record: dict, runs: dict[str, dict] | None = None) -> str:
    """A table label for a run: the method or baseline, and what differs from its defaults. A decoding variant is
    labelled by the trained run among `runs` whose weights it decoded (see `source_run`), else by its method."""
    labels = {**BASELINES, **METHODS}
    if name in labels:
        return labels[name]
    family, rest = variant_of(name)
    method = labels.get(record.get("method"), record.get("method"))
    if family in ("greedy", "temperature"):  # greedy-<run>, temperature-<run>-<t>
        run, _, t = rest.rpartition("-") if family == "temperature" else (rest, "", "")
        source = source_run(record, runs or {})
        decoded = label(source, runs[source]) if source else labels.get(run, run)
        return f"{decoded}, greedy" if family == "greedy" else f"{decoded}, temperature {t}"
    if family == "lr":
        return f"{method}, lr {record['hparams']['lr']:g}"
    if family == "lora_rank":
        return f"{method}, rank {rest}"
    if family == "prompt_tokens":
        return f"{method}, {rest} prompt token{'s' * (rest != '1')}"
    if name.startswith("hard_prompt-"):
        return f"hard prompt x {name.removeprefix('hard_prompt-')}"
    if name.startswith("chat-") and record.get("method") in METHODS:
        return f"{method}, trained in the chat format"
    if name.startswith("separator-") and record.get("method") in METHODS:
        return f"{method}, a learned separator token"
    return name


def source_run(record: dict, runs: dict[str, dict]) -> str | None:
    """The trained run of `runs` whose weights a decoding variant (greedy-<run>, temperature-<run>-<t>) decoded:
    an evaluation copies the weights' training history into its record, so it is the run of the same method with
    the same epochs' validation losses (the method's own run if several match). None for a baseline, or when that
    run is not among `runs`."""
    losses = epoch_losses(record)
    found = [n for n, r in runs.items() if losses and variant_of(n)[0] not in ("greedy", "temperature")
             and r.get("method") == record.get("method") and epoch_losses(r) == losses]
    return record.get("method") if record.get("method") in found else next(iter(found), None)


def load_runs(folder: Path, split: str = "test") -> dict[str, dict]:
    """{run name: record with its per-article predictions under "examples"} of the runs scored on `split` (test:
    <name>.json; validation: <name>.validation.json); files that are not run records of ours (other JSON, a broken
    file, a run whose predictions file is broken) are skipped with a line."""
    runs, suffix = {}, record_suffix(split)
    for f in sorted(folder.glob("*" + suffix)):
        if f.name.endswith(NEXT_TOKENS) or (split == "test" and f.name.endswith(VALIDATION)) or \
                f.name == "data_ids.json":  # read elsewhere; the ids of the set's articles
            continue
        try:
            record = json.loads(f.read_text())
            assert isinstance(record, dict) and isinstance(record.get(split), dict)
        except (ValueError, AssertionError):
            print(f"skipped {f}: not a run record")
            continue
        preds = f.with_suffix(".predictions.jsonl")
        try:
            record["examples"] = [json.loads(line) for line in open(preds, encoding="utf-8") if line.strip()] \
                if preds.exists() else []
        except (ValueError, OSError):  # not JSON (cut short, edited), not UTF-8, or not a file
            print(f"skipped {f}: its predictions {preds.name} are not readable JSON lines")
            continue
        runs[f.name[:-len(suffix)]] = record
    return runs


def best_val(record: dict) -> float:
    """A run's lowest validation loss over its epochs (NaN for a run that trained nothing)."""
    return min((h["val_loss"] for h in record.get("history", [])), default=float("nan"))


def chosen_runs(runs: dict[str, dict]) -> dict[str, str]:
    """{method: its trained run with the lowest best validation loss}: the configuration validation chooses, never
    the test set (runs that only decode saved weights again, greedy or at another temperature, are not
    configurations; on a tie, the method's run at its defaults)."""
    best = {}
    for n in sorted(runs, key=lambda n: n not in METHODS):
        r, m = runs[n], runs[n].get("method")
        if m in METHODS and r.get("history") and not n.startswith(("greedy-", "temperature-")) and \
                (m not in best or best_val(r) < best_val(runs[best[m]])):
            best[m] = n
    return best


def read_record(path: Path, key: str = "record") -> dict:
    """The JSON object under `key` in a safetensors file's metadata: a weights file's run record ("record"), a
    checkpoint's state ("state"); {} for a peft adapter folder or an unreadable file (loading the weights then says
    what is wrong with it). Reads the header only."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            value = json.loads((f.metadata() or {}).get(key, "{}"))
    except Exception:  # a folder, or not safetensors: loading explains
        return {}
    return value if isinstance(value, dict) else {}


def run_name_of(saved: dict) -> str:
    """The name of the run whose record a weights file holds: its --run-name, else its method's ('' for no record)."""
    return str(saved.get("config", {}).get("run_name") or saved.get("method") or "")


def is_run(weights: Path, name: str, record: dict) -> bool:
    """Whether `weights` holds what the run `name` with this record trained: its name and its epochs' validation
    losses (a file trained again under the same name, or under another --out, differs in them)."""
    saved = read_record(weights)
    return run_name_of(saved) == name and epoch_losses(saved) == epoch_losses(record)


def epoch_losses(record: dict) -> list:
    """A run's validation loss after each epoch: what identifies its trained weights wherever its record is copied
    (into the weights file, into the record of an evaluation of them)."""
    return [e.get("val_loss") for e in record.get("history", [])]


def shipped_runs(runs: dict[str, dict], folder: Path = SHIPPED) -> dict[str, str]:
    """{method: the run of `runs` whose weights are <folder>/<method>.safetensors}, for the methods shipped from
    these records (weights trained elsewhere, or on another base model, are none of them)."""
    shipped = {}
    for method in METHODS:
        name = run_name_of(read_record(folder / f"{method}.safetensors"))
        if name in runs and is_run(folder / f"{method}.safetensors", name, runs[name]):
            shipped[method] = name
    return shipped
