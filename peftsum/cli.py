"""The CLI: what every entry script shares around its one change to the model. `setup` checks all it can before
the slow work and loads the base model; `run` dispatches on the mode."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from peftsum import runtime, interop, gguf_export, training, evaluation
from peftsum.errors import Interrupted, UsageError, first_line
from peftsum.config import Config, MODES, ROOT, out_folder, resolve_mode, run_name
from peftsum.runtime import init_distributed, resolve_device, world
from peftsum.model import GPT
from peftsum.methods import count_parameters, hard_prompt_ids, trainable_state
from peftsum.files import check_free_space, check_writable, load_weights, remove_orphans, save_weights, weights_lock
from peftsum.data import (data_files, data_folder, encode_examples, hub_dataset_cached, load_splits,
                          offline_dataset_error)
from peftsum.generation import prepare_inference
from peftsum.interop import export_merged, export_peft, load_adapter
from peftsum.training import run_identity, run_length
from peftsum.evaluation import next_token_table, score_and_write


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
    model, tokenizer = interop.load_model(cfg.model, device)
    return model, tokenizer, device, dtype


def preflight(cfg: Config, mode: str, method: str, path: Path) -> None:
    """Every input this run reads exists, every output can be written, and a training neither races another run
    for the same weights nor discards (or silently skips) a checkpoint: a mistake costs seconds, not an epoch."""
    gguf_export.check_flags(cfg, method)
    if mode == "article" and cfg.article != "-" and not Path(cfg.article).is_file():
        raise UsageError(f"cannot read the article at {cfg.article}: no such file")
    if mode != "train" and not cfg.baseline and not path.exists():
        raise UsageError(f"no weights at {path}: train them with --train, "
                         "or evaluate the untrained model with --baseline")
    folder = data_folder(cfg.data) if MODES[mode] else None
    if folder:
        data_files(folder, MODES[mode])
    elif MODES[mode] and not hub_dataset_cached(cfg.data) and not runtime.hub_reachable():
        raise offline_dataset_error(cfg.data)  # now, not after loading the model
    for target in filter(None, (cfg.export_peft, cfg.export_merged, cfg.export_gguf)):
        if Path(target).exists():
            raise UsageError(f"{target} exists: an export never overwrites; remove it or pass another path")
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


def weights_path(cfg: Config, method: str) -> Path:
    return Path(cfg.weights) if cfg.weights else ROOT / "models" / f"{method}.safetensors"


def checkpoint_path(weights: Path) -> Path:
    return weights.with_name(weights.stem + ".ckpt.safetensors")


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
        record["history"] = training.train(model, train_set, val_set, cfg, hp.lr, device, dtype, checkpoint_path(path),
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
    predictions = evaluation.summarize(model, tokenizer, splits["test"], cfg)
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
    print("summary:", evaluation.summarize(model, tokenizer, [{"article": article}], cfg)[0])
    return record


def export_weights(method, model: GPT, tokenizer, cfg: Config, hp, dtype, record: dict, splits: dict) -> dict:
    load_trained(method, model, cfg, record)
    if cfg.export_peft:
        export_peft(model, Path(cfg.export_peft))
        print(f"wrote the peft adapter {cfg.export_peft}")
    if cfg.export_gguf:  # after the peft adapter, which needs the LoRA layers a merged GGUF folds away
        print(gguf_export.export_for_cli(method, model, tokenizer, cfg))
    if cfg.export_merged:
        export_merged(model, tokenizer, Path(cfg.export_merged))
        print(f"wrote the transformers checkpoint {cfg.export_merged}")
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
