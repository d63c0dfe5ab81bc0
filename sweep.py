"""Run one family of experiments; each run writes its own record to --out (never another's). Then `python3 report.py`.

  python3 sweep.py methods        the three methods at their defaults, the hard-prompt baseline, zero-shot
                                  " TL;DR:" (GPT-2 paper) and lead-3 (no model)
  python3 sweep.py chat           an instruct model's own chat format ("Summarize ...", its chat template)
  python3 sweep.py chat_train     LoRA and prompt tuning trained in that format (chat-lora, chat-prompt_tuning: the
                                  soft prompt in the instruction's place, starting from its 12 tokens)
  python3 sweep.py separator      LoRA with a learned separator token instead of " TL;DR:" (separator-lora)
  python3 sweep.py full           full fine-tuning, every parameter (main1.py --full, lr 5e-5): the ceiling
  python3 sweep.py lr             learning rate 1e-4, 3e-4, 1e-3, 3e-3 for each method
  python3 sweep.py prompt_tokens  soft prompt length 1, 8, 24, 64
  python3 sweep.py lora_rank      LoRA rank 4, 8, 16, 32 (alpha = 2 x rank)
  python3 sweep.py temperature    temperature 0.3 ... 1.5 on the saved weights of `methods` and on the chat template
                                  (inference only; with --eval-split validation, to choose one on validation ROUGE)
  python3 sweep.py decoding       greedy instead of top-p: the saved weights of `methods`, and zero-shot
  python3 sweep.py next_tokens    the next-token table of a test article and what follows its end token, for the
                                  saved weights of `methods` and zero-shot (--inspect: <out>/<run>.next_tokens.json)

  python3 sweep.py ship           no run: each method's configuration chosen on validation (its trained run in --out
                                  with the lowest validation loss) becomes its shipped weights, the file the script
                                  reads by default (models/<method>.safetensors), copied from --weights-dir; the
                                  weights it replaces are kept there under their run's name. Then run
                                  temperature, decoding and next_tokens again (--overwrite): they decode the shipped
                                  weights. --only METHOD ships that method alone

Options of the sweep itself:
  --only PATTERN [PATTERN ...]    run only the runs whose names match (shell patterns: 'temperature-lora-*')
  --weights-dir DIR               where weights go and are read (default: models/ for `methods` and the
                                  inference families, runs/ for the hyperparameter sweeps and for ship)
  --to DIR                        ship: where the chosen weights go (default: models/, where the scripts read)

Every other flag goes to every run, e.g. `--model DIR --data DIR --out runs/mine --max-steps 20`; one that the
sweep sets for its runs (what it varies, the mode, --weights, --run-name) is refused.

A run whose record is in --out already (<name>.json; with --eval-split validation, <name>.validation.json) is
skipped (--overwrite runs it again). Ctrl-C or SIGTERM reaches the run under way once: it finishes its step and
writes its checkpoint, and the command the sweep prints continues it (that run resumes from its checkpoint): the
same command, or with --overwrite the same for the runs it had not finished.
"""
import argparse
import fnmatch
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import common
from peftsum.files import copy_file, weights_lock
from peftsum.records import (METHODS, NEXT_TOKENS, SCRIPTS, SHIPPED, VALIDATION, RunRecord, checkpoint_path,
                             chosen_runs, is_run, load_runs, out_folder, portable_path, read_record, record_suffix,
                             run_name_of, variant_name)

ROOT = Path(__file__).resolve().parent
FAMILIES = ("methods", "chat", "chat_train", "separator", "full", "lr", "prompt_tokens", "lora_rank", "temperature",
            "decoding", "next_tokens")
SWEPT = ROOT / "runs"  # where the hyperparameter sweeps train into by default (gitignored)


def family_runs(family: str, weights_dir: Path | None = None) -> list[tuple[str, str, list[str]]]:
    """(run name, script, flags) of every run of a family."""
    method_weights = lambda m: ["--weights", str((weights_dir or SHIPPED) / f"{m}.safetensors")]
    sweep_weights = lambda name: ["--weights", str((weights_dir or SWEPT) / f"{name}.safetensors")]
    if family == "methods":
        return [(m, s, ["--train", *method_weights(m)]) for m, s in SCRIPTS.items()] + [
            ("hard_prompt-24", "main2.py", ["--baseline"]),
            ("zero_shot", "main2.py", ["--baseline", "--baseline-prompt-tokens", "0"])]
    if family == "chat":
        return [("chat", "main2.py", ["--baseline", "--chat"])]
    if family == "chat_train":
        return [("chat-lora", "main2.py", ["--train", "--chat", *sweep_weights("chat-lora")]),
                ("chat-prompt_tuning", "main.py", ["--train", "--chat", *sweep_weights("chat-prompt_tuning")])]
    if family == "separator":
        return [("separator-lora", "main2.py", ["--train", "--learned-separator", *sweep_weights("separator-lora")])]
    if family == "full":
        return [("full", "main1.py", ["--train", "--full", "--lr", "5e-5", *sweep_weights("full")])]
    if family == "lr":
        return [(n, s, ["--train", "--lr", lr, *sweep_weights(n)]) for m, s in SCRIPTS.items()
                for lr in ("1e-4", "3e-4", "1e-3", "3e-3") if (n := variant_name("lr", m, lr))]
    if family == "prompt_tokens":
        return [(name, "main.py", ["--train", "--prompt-tokens", n, *sweep_weights(name)])
                for n in ("1", "8", "24", "64") if (name := variant_name("prompt_tokens", n))]
    if family == "lora_rank":
        return [(name, "main2.py", ["--train", "--lora-rank", r, "--lora-alpha", str(2 * int(r)), *sweep_weights(name)])
                for r in ("4", "8", "16", "32") if (name := variant_name("lora_rank", r))]
    if family == "temperature":
        temperatures = ("0.3", "0.5", "0.7", "0.9", "1.1", "1.3", "1.5")
        return [(variant_name("temperature", m, t), s, ["--temperature", t, *method_weights(m)])
                for m, s in SCRIPTS.items() for t in temperatures] + [
            (variant_name("temperature", "chat", t), "main2.py", ["--temperature", t, "--baseline", "--chat"])
            for t in temperatures]
    if family == "decoding":
        return [(variant_name("greedy", m), s, ["--greedy", *method_weights(m)]) for m, s in SCRIPTS.items()] + [
            (variant_name("greedy", "zero_shot"), "main2.py",
             ["--greedy", "--baseline", "--baseline-prompt-tokens", "0"])]
    if family == "next_tokens":
        return [(m, s, ["--inspect", *method_weights(m)]) for m, s in SCRIPTS.items()] + [
            ("zero_shot", "main2.py", ["--inspect", "--baseline", "--baseline-prompt-tokens", "0"])]
    raise common.UsageError(f"unknown family '{family}': one of {', '.join(FAMILIES)}")


@dataclass
class NoMethod:
    pass


def lead_3(flags: list[str]) -> None:
    """Lead-3 needs no model: the first three sentences of each article (of the test set, or --eval-split)."""
    cfg = common.parse_args(NoMethod, "", flags).cfg
    rows = common.load_splits(cfg, (cfg.eval_split,))[cfg.eval_split]
    record = RunRecord(method="lead_3", base_model=None, config=vars(cfg), data=portable_path(cfg.data),
                       n_examples={cfg.eval_split: len(rows)})
    common.score_and_write(out_folder(cfg.out), "lead_3", record, rows, [common.lead_3(r["article"]) for r in rows],
                           cfg.overwrite, cfg.eval_split)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    p = argparse.ArgumentParser(prog="sweep.py", add_help=False, allow_abbrev=False)
    p.add_argument("--only", nargs="+", default=["*"])
    p.add_argument("--weights-dir", type=Path)
    p.add_argument("--to", type=Path)
    own, flags = p.parse_known_args(argv[1:])
    family = argv[0]
    if family == "ship":
        shared, _ = SHARED_FLAGS.parse_known_args(flags)
        ship(out_folder(shared.out), own.weights_dir or SWEPT, own.to or SHIPPED, own.only, flags)
        return
    if own.to:
        raise common.UsageError("--to says where `sweep.py ship` copies the chosen weights: only with ship")
    runs = [r for r in family_runs(family, own.weights_dir) if any(fnmatch.fnmatch(r[0], o) for o in own.only)]
    if not runs and not (family == "methods" and any(fnmatch.fnmatch("lead_3", o) for o in own.only)):
        raise common.UsageError(f"no run of '{family}' matches --only {' '.join(own.only)}")
    refuse_swept_flags(family, flags)
    shared, _ = SHARED_FLAGS.parse_known_args(flags)
    out = out_folder(shared.out)
    with_lead_3 = family == "methods" and any(fnmatch.fnmatch("lead_3", o) for o in own.only)
    for i, (name, script, extra) in enumerate(runs):
        if done(name, out / (name + (NEXT_TOKENS if "--inspect" in extra else record_suffix(shared.eval_split))),
                shared.overwrite):
            continue
        weights = Path(extra[extra.index("--weights") + 1]) if "--train" in extra else None
        # a checkpoint is this run's unfinished training (--overwrite too: it replaces records, not work under way)
        resume = weights is not None and checkpoint_path(weights).exists() and not shared.resume
        print(f"=== {name}: {script} {' '.join(extra)}" + (" --resume (from its checkpoint)" if resume else ""),
              flush=True)
        code = run([sys.executable, str(ROOT / script), *extra, *["--resume"] * resume, "--run-name", name, *flags])
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            left = [n for n, *_ in runs[i:]] + ["lead_3"] * with_lead_3
            print(f"the sweep stopped in {name}; continue it with: {continuation(family, own, flags, left)}",
                  file=sys.stderr)
            sys.exit(code)
        if code:
            raise common.UsageError(f"a run failed (exit code {code}): {script} {' '.join(extra)} --run-name {name}")
    if with_lead_3:
        if done("lead_3", out / ("lead_3" + record_suffix(shared.eval_split)), shared.overwrite):
            return
        print("=== lead_3", flush=True)
        lead_3(flags)


def refuse_swept_flags(family: str, flags: list[str]) -> None:
    """Refuse a flag of the user's that the sweep sets for its runs (what it varies, the mode, the weights, the
    run's name), in any of its runs, --only or not: the user's flags come last, so the script would take theirs,
    and a record would carry a name that says otherwise (argparse also takes an abbreviation: --temp for
    --temperature). Flags after `--` are values, not options."""
    sets = {f for _, _, extra in family_runs(family) for f in extra if f.startswith("--")} | {"--run-name"}
    options = flags[:flags.index("--")] if "--" in flags else flags
    for flag in (f.split("=")[0] for f in options if f.startswith("--")):
        taken = sorted(s for s in sets if s.startswith(flag))
        if taken:
            raise common.UsageError(f"{flag}: `sweep.py {family}` sets {taken[0]} itself for its runs (their "
                                    "records are named after what it sets); drop it, or run the script with it")


def ship(out: Path, weights_dir: Path, to: Path, only: list[str], flags: list[str]) -> None:
    """Each method's configuration chosen on validation becomes the weights its script reads by default. The file
    shipped is checked to be that run's (its record's name and every epoch's validation loss), and the weights it
    replaces are kept in `weights_dir` under their own run's name: shipping loses nothing, and shipping again after
    more sweeps (or a `methods` run) undoes it."""
    runs = load_runs(out)
    chosen = {m: n for m, n in chosen_runs(runs).items()  # full fine-tuning is measured, not shipped
              if m in SCRIPTS and any(fnmatch.fnmatch(m, o) for o in only)}
    if not chosen:
        asked = ", ".join(SCRIPTS if only == ["*"] else only)
        raise common.UsageError(f"no trained run of {asked} in {out} to ship: train one first (python3 sweep.py "
                                "methods, or any sweep that trains)")
    plan = []  # (method, run, its weights, where the weights it replaces go): all checked before any file is copied
    for method, name in chosen.items():
        target = to / f"{method}.safetensors"
        if is_run(target, name, runs[name]):
            print(f"{METHODS[method]}: {name} (lowest validation loss) is shipped already: {portable_path(str(target))}")
            continue
        places = (weights_dir / f"{name}.safetensors", SHIPPED / f"{method}.safetensors")  # sweeps', `methods`'
        source = next((p for p in places if is_run(p, name, runs[name])), None)
        if source is None:
            raise common.UsageError(f"{places[0]} is not the weights of {name}, the run of {METHODS[method]} with the "
                                    f"lowest validation loss in {out}: pass the folder its sweep trained into as "
                                    f"--weights-dir, or train it again there (python3 sweep.py ... --only {name})")
        replaced = run_name_of(read_record(target)) or f"{method}.replaced"
        kept = weights_dir / f"{replaced}.safetensors" if target.exists() else None
        if kept and kept.exists() and kept.read_bytes() != target.read_bytes():
            raise common.UsageError(f"{target} is to be kept as {kept}, where another file of that name is: move that "
                                    "away, then ship again")
        plan.append((method, name, source, kept))
    for method, name, source, kept in plan:
        target = to / f"{method}.safetensors"
        with weights_lock(target):  # no training writes the shipped file meanwhile
            if kept and not kept.exists():
                copy_file(target, kept)
            copy_file(source, target)
        print(f"{METHODS[method]}: shipped {name} (lowest validation loss) as {portable_path(str(target))}" +
              (f"; the weights it replaced are kept as {portable_path(str(kept))}" if kept else ""))
    changed = [method for method, *_ in plan]
    stale = {family: found for family, patterns, ending in (  # the records of `out` that decode shipped weights
        ("temperature --eval-split validation", [f"temperature-{m}-*" for m in changed], VALIDATION),
        ("temperature", [f"temperature-{m}-*" for m in changed], ".json"),
        ("decoding", [f"greedy-{m}" for m in changed], ".json"),
        ("next_tokens", changed, NEXT_TOKENS))
        if (found := [p for p in patterns if any(ending == VALIDATION or not f.name.endswith(VALIDATION)
                                                 for f in out.glob(p + ending))])}
    if stale:  # each made again with `flags`: the same --out, model and data
        rest = [f for f in flags if f != "--overwrite"] + ["--weights-dir", str(to)] * (to != SHIPPED)
        print("these records decode the weights that were shipped before; make them again:", *[
            "  " + shlex.join(["python3", "sweep.py", *family.split(), "--overwrite", "--only", *patterns, *rest])
            for family, patterns in stale.items()], sep="\n")


def continuation(family: str, own: argparse.Namespace, flags: list[str], left: list[str]) -> str:
    """The command that continues a stopped sweep: the same one, which skips the runs whose records are written and
    resumes the stopped run from its checkpoint; with --overwrite, which would run the finished ones again too,
    the same one for the runs `left` alone."""
    if "--overwrite" not in flags:
        return shlex.join(["python3", *sys.argv])
    return shlex.join(["python3", "sweep.py", family, "--only", *left, *flags,
                       *(["--weights-dir", str(own.weights_dir)] if own.weights_dir else [])])


def done(name: str, written: Path, overwrite: bool) -> bool:
    """Whether the run `name` is done (its record `written` is there) and is skipped, as it says."""
    if written.exists() and not overwrite:
        print(f"=== {name}: skipped, {written} is there (--overwrite runs it again)", flush=True)
        return True
    return False


SHARED_FLAGS = argparse.ArgumentParser(add_help=False)  # the flags of the runs that the sweep itself reads
SHARED_FLAGS.add_argument("--out", default="")
SHARED_FLAGS.add_argument("--overwrite", action="store_true")
SHARED_FLAGS.add_argument("--resume", action="store_true")
SHARED_FLAGS.add_argument("--eval-split", default="test")


def run(command: list[str]) -> int:
    """Run one run to its end and return its exit code. It runs in its own process group, so that a Ctrl-C at the
    terminal reaches it once, from here (twice would mean "exit at once, without a checkpoint"), and so does a
    SIGTERM sent to the sweep alone (a scheduler's): the run finishes its step, writes its checkpoint and ends."""
    child = subprocess.Popen(command, process_group=0)
    forward = lambda signum, frame: child.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    with common.cli_errors():
        main(sys.argv[1:])
