"""A training's resumable state: `TrainState`, which a checkpoint saves and restores exactly, and the run identity
that lets a checkpoint continue only the run it belongs to (settings, base model, data, number of processes)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from peftsum.errors import UsageError
from peftsum.config import Config, RUNTIME_FIELDS
from peftsum.runtime import peak_memory_mb, world
from peftsum.model import GPT
from peftsum.methods import trainable_state
from peftsum.weights import json_object, read_safetensors, write_safetensors
from peftsum.data import length_batches


@dataclass
class EpochSums:
    """Running sums of the current epoch."""
    loss: torch.Tensor | float = 0.0  # summed loss; a device tensor while training, so that no step waits for it
    targets: int = 0  # target tokens
    tokens: int = 0  # real input tokens
    pads: int = 0  # padding positions
    seconds: float = 0.0  # training time so far

    def as_dict(self) -> dict:
        return {k: float(v) if torch.is_tensor(v) else v for k, v in dataclasses.asdict(self).items()}


CHECKPOINT_FORMAT = 2  # format 1 (before run identities) is refused: it cannot say which run it belongs to


@dataclass
class TrainState:
    """Where a training run is, and all it needs to continue exactly. A checkpoint is this state plus the trained
    tensors, the optimizer's moments and the scaler; `identity` says what is trained (settings, base model, data:
    see `run_identity`), so that a checkpoint continues only its own run."""
    identity: dict
    order: torch.Tensor  # state of the data-order generator at the start of the current epoch
    best: dict[str, torch.Tensor]  # the best-validation weights so far
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done
    batch: int = 0  # optimizer steps done in the current epoch
    best_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best validation loss
    history: list[dict] = field(default_factory=list)  # one entry per epoch
    sums: EpochSums = field(default_factory=EpochSums)
    bad_step: torch.Tensor | None = None  # first step whose loss was not finite (-1: none), on the device: no sync
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # held while it changes

    @classmethod
    def start(cls, params: dict[str, torch.Tensor], identity: dict, seed: int) -> TrainState:
        return cls(identity, torch.Generator().manual_seed(seed).get_state(),
                   {n: p.detach().clone() for n, p in params.items()})

    def done(self, epochs: int, total: int, patience: int) -> bool:
        """Whether the run is over: all epochs or steps done, or stopped early (a resumed run too)."""
        stopped_early = bool(self.history) and self.bad_epochs >= patience
        return self.epoch >= epochs or self.step >= total or stopped_early

    def epoch_batches(self, lengths: list[int], batch_size: int) -> tuple[list[list[int]], torch.Tensor]:
        """This epoch's micro-batches, rebuilt from the saved generator state (so a resumed epoch has the same
        order), and the generator's state after drawing them: the next epoch's."""
        gen = torch.Generator()
        gen.set_state(self.order)
        return length_batches(lengths, batch_size, gen), gen.get_state()

    def count(self, loss: torch.Tensor, group, targets: int, seconds: float) -> None:
        """Add one optimizer step: summed loss `loss` over `targets` target tokens of the micro-batches `group`."""
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, device=loss.device)
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), self.step, self.bad_step)
        s = self.sums
        s.loss = s.loss + loss
        s.tokens += sum(real for _, _, real in group)
        s.pads += sum(y.numel() - real for _, y, real in group)
        s.targets += targets
        s.seconds = seconds
        self.step += 1
        self.batch += 1

    def progress(self, opt) -> dict[str, str]:
        """The bar's loss, learning rate and tokens/s (a host sync: only about once a second)."""
        s = self.sums
        return dict(loss=f"{float(s.loss) / max(s.targets, 1):.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                    tok_s=f"{s.tokens / max(s.seconds, 1e-9):.0f}")

    def end_epoch(self, val_loss: float, params: dict, order: torch.Tensor, extra_seconds: float, device) -> str:
        """Record the finished epoch, keep the best weights, count epochs without improvement; returns its log line."""
        s = self.sums
        seconds = max(s.seconds + extra_seconds, 1e-9)
        entry = dict(epoch=self.epoch + 1, step=self.step, train_loss=float(s.loss) / max(s.targets, 1),
                     val_loss=val_loss, seconds=seconds, tokens_per_s=s.tokens / seconds,
                     padding=s.pads / max(s.tokens + s.pads, 1), peak_memory_mb=peak_memory_mb(device))
        self.history.append(entry)
        if val_loss < self.best_loss:
            self.best_loss, self.bad_epochs = val_loss, 0
            self.best = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.bad_epochs += 1
        self.epoch, self.batch, self.order, self.sums = self.epoch + 1, 0, order, EpochSums()
        return (f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f} | val loss {val_loss:.4f} | "
                f"{seconds:.1f} s | {entry['tokens_per_s']:.0f} tok/s | padding {entry['padding']:.1%}")

    def check_finite(self, checkpoint: Path | None, all_ranks: bool = True) -> None:
        """Stop with the first step whose loss was not finite. A host sync; under DDP every rank stops together
        (unless not `all_ranks`: this rank's losses only, without a collective)."""
        if self.bad_step is None:
            return
        if world()[1] > 1 and all_ranks:
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        if self.bad_step.item() >= 0:
            last = f"the last good checkpoint is {checkpoint} (--resume)" if checkpoint and checkpoint.is_file() else \
                "no checkpoint was written before it"
            raise UsageError(f"the loss became NaN or infinite at step {int(self.bad_step) + 1}; stopped: {last}; "
                             "try a lower --lr or --dtype fp32")

    def save(self, path: Path | None, model: GPT, opt, scaler, all_ranks: bool = True) -> None:
        """Check on every rank (or, not `all_ranks`, on this one) that the loss stayed finite (a checkpoint never
        holds a diverged run), then write the checkpoint on rank 0, atomically: the state as JSON metadata; trained
        tensors, best tensors, optimizer moments and rank 0's data order as tensors."""
        self.check_finite(path, all_ranks)
        if path is None or world()[0] != 0:
            return
        params = trainable_state(model)
        name_of = {id(p): n for n, p in params.items()}
        tensors = {f"param.{n}": p for n, p in params.items()} | {f"best.{n}": t for n, t in self.best.items()}
        for p, moments in opt.state.items():
            tensors |= {f"opt.{name_of[id(p)]}.{k}": v for k, v in moments.items()}
        tensors["order"] = self.order
        meta = {k: getattr(self, k) for k in ("step", "epoch", "batch", "best_loss", "bad_epochs", "history")}
        meta |= dict(format=CHECKPOINT_FORMAT, run=self.identity, scaler=scaler.state_dict(), sums=self.sums.as_dict())
        write_safetensors(path, tensors, {"state": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, model: GPT, opt, scaler, identity: dict) -> TrainState:
        """The state saved at `path`, its tensors restored into model, optimizer and scaler. A checkpoint that is
        unreadable, of an older format, of another model or method, or of another run is a UsageError."""
        hint = "remove it to train from the start"
        metadata, tensors = read_safetensors(path, hint)
        meta = json_object(metadata.get("state"), f"the training state in {path}", hint)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"the checkpoint {path} was not written by this version (it does not record which run "
                             f"it belongs to): {hint}")
        problem = state_problem(meta)
        if problem:
            raise UsageError(f"the checkpoint {path} is damaged or was edited ({problem}): {hint}")
        differences = run_differences(meta["run"], identity)
        if differences:
            raise UsageError(f"the checkpoint {path} belongs to another run ({'; '.join(differences)}): rerun with "
                             f"its settings, or {hint}")
        params = trainable_state(model)
        if any(tensors.get(f"param.{n}", torch.empty(0)).shape != p.shape for n, p in params.items()):
            raise UsageError(f"the checkpoint {path} belongs to another model or method: {hint}")
        problem = tensors_problem(tensors, params)
        if problem:
            raise UsageError(f"the checkpoint {path} is damaged or was edited ({problem}): {hint}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        opt_state = opt.state_dict()  # the optimizer's params are trainable_state's, in the same order
        opt_state["state"] = {i: {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
                              for i, n in enumerate(params)}
        opt_state["state"] = {i: m for i, m in opt_state["state"].items() if m}
        opt.load_state_dict(opt_state)
        try:
            if meta["scaler"]:
                scaler.load_state_dict(meta["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise UsageError(f"the checkpoint {path} is damaged or was edited (its gradient scaler): {hint}") from None
        fields = {k: meta[k] for k in ("step", "epoch", "batch", "best_loss", "bad_epochs", "history")}
        return cls(meta["run"], tensors["order"], {n: tensors[f"best.{n}"].to(p.device) for n, p in params.items()},
                   sums=EpochSums(**meta["sums"]), **fields)


STATE_TYPES = dict(run=dict, step=int, epoch=int, batch=int, bad_epochs=int, best_loss=float, history=list,
                   scaler=dict, sums=dict)  # a checkpoint's JSON state; counts are ints >= 0, a float may be an int
HISTORY_KEYS = ("epoch", "step", "train_loss", "val_loss", "seconds", "tokens_per_s", "padding", "peak_memory_mb")


def is_a(value, kind: type) -> bool:
    """isinstance for JSON values: a bool is no number, an int is a float, a count is an int >= 0."""
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind) and \
        (kind is not int or value >= 0)


def state_problem(meta: dict) -> str | None:
    """What is wrong with a checkpoint's JSON state (a field missing or of another type), or None."""
    for name, kind in STATE_TYPES.items():
        if not is_a(meta.get(name), kind):
            want = {int: "a count", float: "a number", list: "a list", dict: "an object"}[kind]
            return f"'{name}' is {json.dumps(meta.get(name))[:40]}, not {want}"
    if set(meta["sums"]) != {f.name for f in dataclasses.fields(EpochSums)} or \
            not all(is_a(v, float) for v in meta["sums"].values()):
        return "'sums' is not the epoch's running sums"
    if not all(isinstance(e, dict) and all(is_a(e.get(k), float) for k in HISTORY_KEYS) for e in meta["history"]):
        return "'history' is not a list of epochs"
    return None


def tensors_problem(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a checkpoint's tensors for these trainable parameters (best weights and AdamW moments
    of their shapes, a data-order generator state), or None."""
    for n, p in params.items():
        if tensors.get(f"best.{n}", torch.empty(0)).shape != p.shape:
            return f"best.{n} is missing or not of shape {tuple(p.shape)}"
        moments = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        if moments and (set(moments) != {"step", "exp_avg", "exp_avg_sq"} or moments["step"].numel() != 1 or
                        any(moments[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq"))):
            return f"the optimizer moments of {n} are not AdamW's step, exp_avg and exp_avg_sq of {tuple(p.shape)}"
    try:
        torch.Generator().set_state(tensors["order"])
    except (KeyError, RuntimeError, TypeError):
        return "'order' is not a generator state"
    return None


def replayed_order(seed: int, epochs: int, lengths: list[int], batch_size: int) -> torch.Tensor:
    """The data-order generator's state at the start of epoch `epochs` of a rank seeded `seed`: as TrainState
    draws it, one epoch's batches after another."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        length_batches(lengths, batch_size, gen)
    return gen.get_state()


def run_identity(method: str, cfg: Config, hp, model: GPT, train_set, val_set) -> dict:
    """What a training run is, as its checkpoint records it: the settings that shape the trained weights (all but
    RUNTIME_FIELDS), the base model (name, and a fingerprint of its frozen weights) and a fingerprint of the
    training and validation examples (which covers the data, the subsets, the tokenizer and the prompt format), and
    the number of torchrun processes (each trains on its share of the examples, in its own order)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    frozen = [t.detach().flatten()[::max(1, t.numel() // 4096)] for t in model.parameters() if not t.requires_grad]
    return dict(settings=settings | vars(hp) | {"method": method}, base_model=model.name, ranks=world()[1],
                base_weights=fingerprint(t.float().cpu().numpy().tobytes() for t in frozen),  # ~4,096 values each
                data=fingerprint(torch.tensor(ids + [-n]).numpy().tobytes() for ids, n in train_set + val_set))


def fingerprint(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def run_differences(saved: dict, now: dict) -> list[str]:
    """What differs between the run a checkpoint belongs to and this one, in words a user can act on."""
    was = saved.get("settings", {})
    out = [f"{k if k == 'method' else '--' + k.replace('_', '-')} {was.get(k)!r} there, {v!r} now"
           for k, v in now.get("settings", {}).items() if was.get(k) != v]
    if saved.get("base_weights") != now.get("base_weights"):
        out.append(f"base model {saved.get('base_model')!r} there, {now.get('base_model')!r} now" +
                   (" with other weights" if saved.get("base_model") == now.get("base_model") else ""))
    if saved.get("data") != now.get("data"):
        out.append("other training or validation examples")
    ranks = saved.get("ranks", 1), now.get("ranks", 1)  # a checkpoint from before ranks were recorded: one process
    if ranks[0] != ranks[1]:
        out.append(f"{ranks[0]} training processes (torchrun --nproc-per-node={ranks[0]}) there, {ranks[1]} now"
                   if ranks[0] > 1 else f"one training process there, {ranks[1]} (torchrun) now")
    return out
