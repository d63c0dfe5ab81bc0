"""The CLI: what every entry script shares around its one change to the model. `setup` resolves the settings (an
evaluation follows the record of the weights it loads), checks all it can before the slow work and loads the base
model; `run` does the one thing the flags ask for.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from peftsum import evaluation, gguf_export, interop, runtime, training
from peftsum.config import (ROOT, TRAINING_FIELDS, Args, Config, check_config, check_context, fields_where, flag,
                            splits_read)
from peftsum.data import (chat_instruction_ids, data_files, data_folder, encode_examples, hub_dataset_cached,
                          load_splits, offline_dataset_error)
from peftsum.errors import Interrupted, UsageError, first_line
from peftsum.files import (check_free_space, check_name_length, check_writable, remove_orphans, weights_lock,
                           write_text)
from peftsum.generation import prepare_inference
from peftsum.interop import export_merged, export_peft, load_adapter
from peftsum.methods import apply_learned_separator, count_parameters, hard_prompt_ids, trainable_state
from peftsum.model import GPT
from peftsum.records import (METHODS, NEXT_TOKENS, SCRIPTS, RunRecord, checkpoint_path, local_path, out_folder,
                             portable_path, read_record, record_suffix, run_name)
from peftsum.runtime import init_distributed, resolve_device, resume_command, world
from peftsum.checkpoints import run_identity
from peftsum.training import run_length
from peftsum.weights import load_weights, save_weights, weights_record

DATA_FIELDS = ("data", "data_config", "val_size", "test_size", "data_seed")  # which articles: not a contradiction


@dataclass
class Job:
    """One run of an entry script, as `setup` resolved it: the method and mode, the settings (every default
    resolved, those an evaluation took from the weights' record included), the device, and the base model."""
    method: str
    mode: str
    cfg: Config
    hp: object
    device: torch.device
    dtype: torch.dtype
    model: GPT | None  # None until `setup` has checked everything else
    tokenizer: object

    @property
    def weights(self) -> Path:
        return weights_path(self.cfg.weights, self.method)

    @property
    def record_name(self) -> str:
        """The name of the run's record in --out."""
        cfg = self.cfg
        return cfg.run_name or run_name(self.method, baseline=cfg.baseline, chat=cfg.chat,
                                        baseline_prompt_tokens=cfg.baseline_prompt_tokens)

    @property
    def out(self) -> Path:
        return out_folder(self.cfg.out)


def setup(args: Args, method: str | Callable[[object], str]) -> Job:
    """Resolve the settings, check what can be checked before any slow work (device, weights, data, outputs, the
    lock and checkpoint of a training), seed, and load the base model. `method` is the method's name, or a function
    of the hyperparameters that gives it (main1.py: the head, or with --full every parameter), asked again once the
    record of the weights to evaluate has set them."""
    cfg, hp, mode = args.cfg, args.hp, args.mode
    name = method if callable(method) else lambda hp: method
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one process per GPU (or CPU rank)
        cfg = dataclasses.replace(cfg, device=init_distributed(cfg.device))
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    path = weights_path(cfg.weights, name(hp))
    if mode != "train" and not cfg.baseline and not path.exists():
        if checkpoint_path(path).is_file():
            raise UsageError(f"no weights at {portable_path(str(path))} yet: their training is unfinished (its "
                             f"checkpoint is {checkpoint_path(path).name}); continue it with --train --resume")
        raise UsageError(f"no weights at {portable_path(str(path))}: train them with --train, or evaluate the "
                         "untrained model with --baseline")
    if mode != "train" and path.is_dir() and not (path / "adapter_config.json").is_file():
        raise UsageError(f"--weights {path} is a folder without adapter_config.json, so not a peft adapter: pass a "
                         "weights file these scripts wrote, or a peft LoRA adapter folder")
    if mode != "train" and path.exists():  # a baseline is measured on the same model, data and prompt format
        if not cfg.baseline:  # a baseline loads none of these weights
            check_method(path, name, hp)
        cfg, hp = follow_record(path, cfg, hp, args.given)
        if not cfg.baseline:
            precision_note(path, cfg, dtype)
    if cfg.baseline and cfg.chat and "baseline_prompt_tokens" in args.given:
        why = "--chat" if "chat" in args.given else f"{path.name} was trained in the chat format, which a baseline " \
            "of it follows"
        raise UsageError(f"--baseline-prompt-tokens is the length of a hard prompt before article + separator, and "
                         f"the chat baseline has neither ({why}): for that baseline pass --weights of weights trained "
                         f"without --chat (python3 main2.py --baseline --baseline-prompt-tokens N follows LoRA's)")
    cfg = dataclasses.replace(cfg, compile=device.type == "cuda" if cfg.compile is None else cfg.compile)
    cfg = dataclasses.replace(cfg, model=cfg.model or default_base_model(cfg, mode, path))
    job = Job(name(hp), mode, cfg, hp, device, dtype, None, None)
    preflight(job)
    torch.manual_seed(cfg.seed)
    job.model, job.tokenizer = interop.load_model(cfg.model, device)
    check_context(cfg, hp, job.model.config.n_positions)
    return job


def follow_record(path: Path, cfg: Config, hp, given: frozenset[str]) -> tuple[Config, object]:
    """The settings with each `recorded` one (prompt format, article cut, the method's hyperparameters, the test
    data) taken from the run record of the weights at `path`, unless its flag was given; a given flag that
    contradicts how the weights were trained is said in one line. Weights without a record (a peft adapter) are
    checked when they load."""
    record = read_record(path)
    taken, notes = {}, []
    for obj, recorded in ((cfg, record.get("config")), (hp, record.get("hparams"))):
        if not isinstance(recorded, dict):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(obj)}
        shapes = fields_where(type(obj), "shapes")
        for name in fields_where(type(obj), "recorded"):
            if name not in recorded and name in shapes:  # a record older than the setting: trained without it
                recorded = {**recorded, name: defaults[name]}
            if name not in recorded or (name == "learned_separator" and cfg.baseline):
                continue  # a baseline trains no token: it takes the text separator the learned one started from
            value, default = recorded[name], getattr(obj, name)
            if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
                raise UsageError(f"the run record in {path} gives {flag(name)} as {value!r}, not a "
                                 f"{type(default).__name__}: retrain, or pass {flag(name)}")
            value = local_path(value) if name == "data" else value
            if name not in given:
                taken[id(obj), name] = value
            elif value != default and name in shapes:
                raise UsageError(f"{flag(name)} {default!r}, but {path.name} was trained with {value!r}: drop the "
                                 "flag, or pass other --weights")
            elif value != default and name not in DATA_FIELDS and not cfg.baseline:  # a baseline trained nothing
                notes.append(f"warning: {flag(name)} {default!r} overrides the {value!r} that {path.name} was trained "
                             "with: its summaries will differ from what training made")
    cfg = dataclasses.replace(cfg, **{n: v for (o, n), v in taken.items() if o == id(cfg)})
    hp = dataclasses.replace(hp, **{n: v for (o, n), v in taken.items() if o == id(hp)})
    check_config(cfg, hp)
    for note in notes:
        print(note, file=sys.stderr)
    return cfg, hp


def check_method(path: Path, name: Callable[[object], str], hp) -> None:
    """Weights of another method are refused from their record before anything else is read from it (a setting of
    another method's record would be a misleading complaint), and before the model loads (`load_weights` checks
    again, for weights whose record this did not read). The method expected is the one this script runs with the
    record's own hyperparameters (main1.py: the head, or with --full every parameter)."""
    record = read_record(path)
    recorded, hparams = record.get("method"), record.get("hparams")
    own = {f.name for f in dataclasses.fields(hp)}
    method = name(dataclasses.replace(hp, **{k: v for k, v in (hparams or {}).items() if k in own}))
    if recorded in METHODS and recorded != method:
        raise UsageError(f"{path} holds weights of method '{recorded}', not '{method}': evaluate them with "
                         f"python3 {SCRIPTS.get(recorded, 'main1.py --full')}, or pass other --weights")


def precision_note(path: Path, cfg: Config, dtype: torch.dtype) -> None:
    """Say it when these weights' record was made in other arithmetic than this run's (--dtype auto is bf16 autocast
    on a CPU with bf16 units, fp32 elsewhere): sampling turns the last bits of a logit into other words, so the
    summaries, and ROUGE, differ from the record's by chance, not by a fault."""
    recorded, now = read_record(path).get("machine", {}).get("precision"), runtime.precision_name(dtype)
    if recorded and recorded != now:
        why = f"--dtype {cfg.dtype}" if cfg.dtype != "auto" else "this CPU has no bf16 units" if now == "fp32" else \
            "--dtype auto on this machine"
        again = "; --dtype fp32 computes as it did" if recorded == "fp32" and cfg.dtype == "auto" else ""
        print(f"note: {path.name} was trained and scored in {recorded}, this run is {now} ({why}): its summaries and "
              f"ROUGE will differ a little from its record's{again}", file=sys.stderr)


def preflight(job: Job) -> None:
    """Every input this run reads exists, every output can be written, and a training neither races another run
    for the same weights nor replaces finished ones, nor discards (or silently skips) a checkpoint: a mistake costs
    seconds, not an epoch."""
    cfg, mode, path = job.cfg, job.mode, job.weights
    gguf_export.check_flags(cfg, job.method)
    if cfg.export_peft and cfg.chat and job.method == "prompt_tuning":
        raise UsageError("this soft prompt was trained in the instruction's place inside the chat template, where a "
                         "peft adapter cannot put it (peft puts its virtual tokens before everything): evaluate it "
                         "with these scripts")
    if mode == "article" and cfg.article != "-":
        read_article(cfg.article)  # a missing, empty or undecodable file: said now, not after loading the model
    splits = splits_read(cfg, mode)
    folder = data_folder(cfg.data) if splits else None
    if folder:
        data_files(folder, splits)
    elif splits and not hub_dataset_cached(cfg.data) and not runtime.hub_reachable():
        raise offline_dataset_error(cfg.data)  # now, not after loading the model
    for name in ("export_peft", "export_merged", "export_gguf"):
        if target := getattr(cfg, name):
            if Path(target).exists():
                raise UsageError(f"{target} exists: an export never overwrites; remove it or pass another path")
            check_writable(Path(target).resolve().parent)
            check_name_length(Path(target), flag(name))
    if world()[0] != 0:
        return
    if mode in ("train", "evaluate"):
        check_writable(job.out)
        check_free_space(job.out, 2 ** 20 + 4096 * cfg.test_size, "the run record and predictions", "--out")
        suffix = record_suffix(cfg.eval_split)
        record = evaluation.record_path(job.out, job.record_name, cfg.overwrite, suffix)
        for p in (record, record.with_suffix(".predictions.jsonl")):
            if p.is_dir():
                raise UsageError(f"{p} is a folder, where this run writes its record: pass another --run-name")
            check_name_length(p, "--run-name", "--out")
        own = job.out / (job.record_name + suffix)
        for p in (own, own.with_suffix(".predictions.jsonl")):
            remove_orphans(p)
    if mode == "inspect":
        check_writable(job.out)
        path = evaluation.record_path(job.out, job.record_name, cfg.overwrite, NEXT_TOKENS)
        if path.is_dir():
            raise UsageError(f"{path} is a folder, where this run writes its table: pass another --run-name")
        check_name_length(path, "--run-name", "--out")
        remove_orphans(path)
    if mode == "train":
        if path.is_dir():
            raise UsageError(f"--weights {path} is a folder (a peft adapter?): --train writes one weights file; "
                             f"pass a file path, e.g. {path / (job.method + '.safetensors')}")
        if checkpoint_path(path).is_dir():
            raise UsageError(f"{checkpoint_path(path)} is a folder, where this training writes its checkpoint: "
                             "move it away or pass another --weights")
        check_writable(path.parent)
        for p in (path, checkpoint_path(path)):
            check_name_length(p, "--weights")
        with weights_lock(path):
            check_checkpoint(checkpoint_path(path), cfg.resume, path)
            if path.exists() and not cfg.resume and not cfg.overwrite:
                raise UsageError(f"{portable_path(str(path))} holds finished weights: pass --weights with another "
                                 "path for the new ones, or --overwrite to replace them")
            for p in (path, checkpoint_path(path)):
                remove_orphans(p)


def check_checkpoint(checkpoint: Path, resume: bool, weights: Path) -> None:
    """A training never discards a checkpoint, and --resume never quietly starts from scratch."""
    if resume and not checkpoint.is_file():
        done = f"the run that trained {weights} has finished; " if weights.exists() else ""
        raise UsageError(f"--resume, but there is no checkpoint at {checkpoint}: {done}drop --resume to train from "
                         "the start")
    if not resume and checkpoint.exists():
        raise UsageError(f"{checkpoint} holds an unfinished training: continue it with --resume, or remove it to "
                         "train from the start")


def weights_path(weights: str, method: str) -> Path:
    return Path(weights) if weights else ROOT / "models" / f"{method}.safetensors"


def default_base_model(cfg: Config, mode: str, path: Path) -> str:
    """--model when it is not given: the base model recorded in the weights to load (for --baseline too: the
    baseline of the same model), or in the checkpoint to resume; else gpt2."""
    if mode == "train":
        return cfg.resume and recorded_base_model(checkpoint_path(path), "state") or "gpt2"
    base = recorded_base_model(path, "record")
    if base is None and path.is_file() and not cfg.baseline:  # say what is wrong with the weights, not gpt2's load
        base = weights_record(path).get("base_model")
        if not (isinstance(base, str) and base):
            raise UsageError(f"the run record in {path} names no base model (base_model: {json.dumps(base)}): "
                             "pass --model with the model it was trained on")
    return base or "gpt2"


def recorded_base_model(path: Path, key: str) -> str | None:
    """The base model recorded in a weights file's run record (key "record"), a checkpoint's state (key "state") or
    a peft adapter's config; None when there is none to read (loading then says what is wrong with the file)."""
    if path.is_dir():
        try:
            config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError):  # loading explains what is wrong with the folder
            return None
        return config.get("base_model_name_or_path") if isinstance(config, dict) else None
    value = read_record(path, key)
    value = value.get("run", value)
    base = value.get("base_model") if isinstance(value, dict) else None
    return base if isinstance(base, str) and base else None


def run(job: Job) -> RunRecord:
    """Do the one thing the flags ask for with the model the method changed: train then evaluate, evaluate on the
    test set (or --eval-split), inspect one example, summarize --article, or export. Returns the run's record."""
    cfg, model = job.cfg, job.model
    if cfg.baseline:
        model.prompt_ids = [] if cfg.chat else hard_prompt_ids(job.tokenizer, cfg.baseline_prompt_tokens)
    elif cfg.learned_separator:
        apply_learned_separator(model, job.tokenizer, cfg.separator)
    trainable, total = count_parameters(model)
    record = RunRecord(method="baseline" if cfg.baseline else job.method, base_model=model.name,
                       config=dataclasses.asdict(dataclasses.replace(cfg, data=portable_path(cfg.data))),
                       hparams={} if cfg.baseline else vars(job.hp), data=portable_path(cfg.data),
                       trainable_parameters=trainable, total_parameters=total,
                       machine={"hardware": runtime.machine(job.device), "precision": runtime.precision_name(job.dtype)})
    if world()[0] != 0 and job.mode != "train":
        return record  # under torchrun, only the training runs on every rank
    splits = load_splits(cfg, splits_read(cfg, job.mode))
    record.n_examples = {split: len(rows) for split, rows in splits.items()}
    print(describe(job, splits))
    do = {"train": train_and_evaluate, "evaluate": evaluate_split, "inspect": inspect_example,
          "article": summarize_article, "export": export_weights}[job.mode]
    return do(job, record, splits)


def describe(job: Job, splits: dict) -> str:
    """The run in a few lines a person reads at its start: model, method, trainable parameters, data, device,
    precision, and (training) steps. The full configuration goes into the run record."""
    cfg, hp, model = job.cfg, job.hp, job.model
    c, (trainable, total) = model.config, count_parameters(model)
    precision = runtime.precision_name(job.dtype)
    doing = {"train": "training", "evaluate": "evaluating", "inspect": "inspecting", "article": "summarizing with",
             "export": "exporting"}[job.mode]
    lines = [f"{doing} {'baseline' if cfg.baseline else job.method} on {model.name} ({c.family}, {c.n_layer} layers "
             f"x {c.n_embd}, {total / 1e6:.1f}M parameters) | trainable parameters: {trainable:,} of {total:,}"]
    if splits:
        lines.append(f"data: {portable_path(cfg.data)} | " + ", ".join(f"{len(rows):,} {split}"
                                                                        for split, rows in splits.items()))
    prompt = "chat template" if cfg.chat else f"a learned separator token (from {cfg.separator!r})" \
        if cfg.learned_separator and not cfg.baseline else f"separator {cfg.separator!r}"
    cut = f", articles cut to {cfg.max_article_tokens} tokens" if cfg.max_article_tokens else ""
    lines.append(f"device: {job.device} | {precision} | compile {'on' if cfg.compile else 'off'} | {prompt}{cut}")
    if job.mode == "train":
        per_epoch, steps, warmup = run_length(cfg, len(splits["train"]), world()[1])
        short = f" (shortened from {cfg.warmup_steps}: not shorter than the run)" if warmup != cfg.warmup_steps else ""
        lines.append(f"training: up to {steps:,} steps ({cfg.epochs} epochs of {per_epoch:,}"
                     f"{f', --max-steps {cfg.max_steps}' if cfg.max_steps else ''}) | batch {cfg.batch_size} x "
                     f"{cfg.grad_accum} | lr {hp.lr:g}, warmup {warmup} steps{short} | early stop after "
                     f"{cfg.patience} epochs without improvement")
    if job.mode in ("train", "evaluate"):
        sampling = "greedy" if cfg.greedy else f"temperature {cfg.temperature}, top-p {cfg.top_p}" + \
            (f", top-k {cfg.top_k}" if cfg.top_k else "")
        lines.append(f"summaries: {sampling}, up to {cfg.max_new_tokens} tokens | record: "
                     f"{portable_path(str(job.out))}/{job.record_name}{record_suffix(cfg.eval_split)}")
    return "\n".join(lines)


def train_and_evaluate(job: Job, record: RunRecord, splits: dict) -> RunRecord:
    """--train: train under the weights' lock (checkpoints beside the weights), save the weights, evaluate on the
    test set (or --eval-split), and save them again with the scores in their record."""
    cfg, model, path, rank = job.cfg, job.model, job.weights, world()[0]
    train_set, val_set = (encode_examples(splits[s], job.tokenizer, model.prompt_ids, cfg, model.config.n_positions,
                                          model.separator_ids) for s in ("train", "validation"))
    with weights_lock(path) if rank == 0 else nullcontext():
        if rank == 0:  # weights + checkpoint (4 tensors per trained one), each twice while it is renamed
            check_free_space(path.parent, 10 * 4 * sum(p.numel() for p in trainable_state(model).values()),
                             "its weights and checkpoints", "--weights")
        identity = run_identity(job.method, cfg, job.hp, model, train_set, val_set)
        record.set_history(training.train(model, train_set, val_set, cfg, job.hp.lr, job.device, job.dtype,
                                          checkpoint_path(path), identity))
        if rank != 0:
            return record  # rank 0 saves and evaluates
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.save_dtype]
        trained = {n: p.detach().to("cpu", dtype).contiguous() for n, p in trainable_state(model).items()}
        save_weights(path, trained, record.as_dict())
        checkpoint_path(path).unlink(missing_ok=True)
        print(f"saved {path}")
        evaluate_split(job, record, splits, load=False)
        save_weights(path, trained, record.as_dict())  # the weights file keeps the full record of the run
    return record


def prompt_tuning_init(job: Job, given: frozenset[str]) -> list[int]:
    """The tokens a soft prompt starts from: "Summarize" repeated to --prompt-tokens; with --chat, the chat
    instruction's own tokens, in the instruction's place (so that the untrained prompt is the chat template's
    zero-shot), and --prompt-tokens is their number: another one given is refused."""
    if not job.cfg.chat:
        return hard_prompt_ids(job.tokenizer, job.hp.prompt_tokens)
    ids = chat_instruction_ids(job.tokenizer)
    if "prompt_tokens" in given and job.hp.prompt_tokens != len(ids):
        raise UsageError(f"with --chat the soft prompt starts as the instruction's {len(ids)} tokens, in its place: "
                         f"drop --prompt-tokens {job.hp.prompt_tokens}")
    job.hp = dataclasses.replace(job.hp, prompt_tokens=len(ids))
    return ids


def load_trained(job: Job, record: RunRecord) -> None:
    """The method's trained weights (a weights file, or a peft adapter folder) into the model, their training's
    history and example counts into the record; none for --baseline."""
    if job.cfg.baseline:
        return
    path = job.weights
    if path.is_dir():
        load_adapter(path, job.model)
    else:
        trained = load_weights(path, job.model, job.method)
        history = trained.get("history")
        record.set_history(history if isinstance(history, list) else [])
        counts = trained.get("n_examples")
        record.n_examples = {**(counts if isinstance(counts, dict) else {}), **record.n_examples}
        config = trained.get("config")
        if isinstance(config, dict):  # how these weights were trained (epochs, warmup, batch, ...)
            record.config = {**record.config, **{k: config[k] for k in TRAINING_FIELDS if k in config}}
    print(f"loaded {portable_path(str(path))}")


def evaluate_split(job: Job, record: RunRecord, splits: dict, load: bool = True) -> RunRecord:
    """Summarize the test set (or --eval-split validation), score it, write the run record and the predictions."""
    if load:
        load_trained(job, record)
    prepare_inference(job.model, job.dtype, job.cfg.compile)
    rows = splits[job.cfg.eval_split]
    predictions = evaluation.summarize(job.model, job.tokenizer, rows, job.cfg)
    evaluation.score_and_write(job.out, job.record_name, record, rows, predictions, job.cfg.overwrite,
                               job.cfg.eval_split)
    return record


def inspect_example(job: Job, record: RunRecord, splits: dict) -> RunRecord:
    load_trained(job, record)
    prepare_inference(job.model, job.dtype, job.cfg.compile)
    table = evaluation.next_tokens(job.model, job.tokenizer, splits["test"][0], job.cfg)
    path = evaluation.record_path(job.out, job.record_name, job.cfg.overwrite, NEXT_TOKENS)
    weights = None if record.method == "baseline" else portable_path(str(job.weights))
    fields = {"run": job.record_name, "method": record.method, "base_model": record.base_model, "weights": weights,
              **table}
    write_text(path, "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items() if k != "rows")
               + ',\n "rows": [\n' + ",\n".join(f"  {json.dumps(r)}" for r in table["rows"]) + "]\n}\n")
    print(f"{evaluation.next_token_table(table)}\nwrote {portable_path(str(path))}")
    return record



def summarize_article(job: Job, record: RunRecord, splits: dict) -> RunRecord:
    article = read_article(job.cfg.article)
    load_trained(job, record)
    prepare_inference(job.model, job.dtype, job.cfg.compile)
    print("summary:", evaluation.summarize(job.model, job.tokenizer, [{"article": article}], job.cfg)[0])
    return record


def export_weights(job: Job, record: RunRecord, splits: dict) -> RunRecord:
    load_trained(job, record)
    if job.cfg.export_peft:
        export_peft(job.model, Path(job.cfg.export_peft))
        print(f"wrote the peft adapter {job.cfg.export_peft}")
    if job.cfg.export_gguf:  # after the peft adapter, which needs the LoRA layers a merged GGUF folds away
        print(gguf_export.export_for_cli(job.method, job.model, job.tokenizer, job.cfg))
    if job.cfg.export_merged:
        export_merged(job.model, job.tokenizer, Path(job.cfg.export_merged))
        print(f"wrote the transformers checkpoint {job.cfg.export_merged}")
    return record


def read_article(source: str) -> str:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the article at {source}: {first_line(e, 100)}") from None
    if not text.strip():
        raise UsageError(f"the article at {source} is empty")
    return text


@contextmanager
def cli_errors():
    """A UsageError ends the program with its message on one line and exit code 2, no traceback; an interrupted
    training with one line that says how to continue, and exit code 128 + the signal's number. Outside training,
    SIGTERM stops the program as Ctrl-C does: one line, exit code 143, and every `finally` (a lock's release) runs."""
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
        print(e.line(resume_command()), file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    except torch.OutOfMemoryError:
        print("error: out of memory on the GPU: try a smaller --batch-size (and --eval-batch-size) with a larger "
              "--grad-accum, which keeps the effective batch", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if not peer_failure(e):
            raise
        rank, n_ranks = world()
        print(f"error: rank {rank} of {n_ranks}: another process of this torchrun job ended ({peer_failure(e)}), so "
              "this one ends too; that process's output says why, and --resume continues from the last checkpoint",
              file=sys.stderr)
        sys.exit(1)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def peer_failure(e: RuntimeError) -> str:
    """What a collective's error says when another rank of the job ended (gloo: "Connection closed by peer"; NCCL:
    a DistBackendError), in a few words; "" for any other error."""
    if world()[1] == 1:
        return ""
    text = first_line(e, 400)
    for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out"):
        if words.lower() in text.lower():
            return words.lower()
    return "a collective failed" if isinstance(e, torch.distributed.DistBackendError) else ""
