"""Training: `train` is a short loop over epochs and steps of one `TrainState`, which a checkpoint saves and
restores; a checkpoint continues only the run it belongs to (`run_identity`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from peftsum.errors import Interrupted, UsageError
from peftsum.config import Config, RUNTIME_FIELDS
from peftsum.runtime import autocast, peak_memory_mb, reset_peak_memory, resume_command, world
from peftsum.model import GPT, IGNORE
from peftsum.methods import trainable_state
from peftsum.files import json_object, read_safetensors, remove_held_locks, write_safetensors
from peftsum.data import collate, collate_features, length_batches


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup to `lr`, then cosine decay to lr / 10 at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_length(cfg: Config, n_train: int, n_ranks: int = 1) -> tuple[int, int, int]:
    """(optimizer steps per epoch, steps of the whole run, warmup steps). The run ends at --max-steps or after
    --epochs, whichever comes first. A warmup as long as the run would never reach the peak learning rate, so it is
    shortened to a tenth of the run."""
    steps_per_epoch = max(1, math.ceil(n_train // n_ranks / cfg.batch_size) // cfg.grad_accum)
    total = min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch)
    return steps_per_epoch, total, cfg.warmup_steps if cfg.warmup_steps < total else total // 10


def example_len(example) -> int:
    return len(example[0])


def batch_of(examples):
    """(inputs, targets, number of real input positions) of token examples or of cached-feature examples."""
    if torch.is_tensor(examples[0][0]):
        x, y = collate_features(examples)
        return x, y, y.shape[1]
    x, y = collate(examples)
    return x, y, sum(len(ids) - 1 for ids, _ in examples)


@torch.no_grad()
def evaluate_loss(model: GPT, examples, batch_size: int, device, dtype) -> float:
    """Mean loss per target token over `examples`, `batch_size` at a time."""
    total, count = torch.zeros((), device=device), 0
    batches = length_batches([example_len(e) for e in examples], batch_size)
    for idx in tqdm(batches, desc="validation", unit="batch", file=sys.stdout, leave=False, mininterval=1.0):
        x, y, _ = batch_of([examples[i] for i in idx])
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            total += model(x, targets=y)
        count += (y != IGNORE).sum().item()
    return (total / max(count, 1)).item()


def validation_loss(model: GPT, examples, batch_size: int, device, dtype) -> float:
    """evaluate_loss on rank 0, shared with every rank, so that all take the same early-stopping decision."""
    rank, n_ranks = world()
    loss = evaluate_loss(model, examples, batch_size, device, dtype) if rank == 0 else 0.0
    if n_ranks > 1:
        v = torch.tensor([loss], device=device)
        dist.broadcast(v, 0)
        loss = v.item()
    return loss


def head_only(model: GPT) -> bool:
    """True when only the LM head trains: the body's outputs never change, so they can be computed once."""
    return all(p is model.lm_head.weight for p in trainable_state(model).values())


@torch.no_grad()
def cache_features(model: GPT, examples, batch_size: int, device, dtype):
    """(hidden states at the target positions, targets) of each example, from one pass of the frozen body, kept in
    the autocast dtype on the CPU; every epoch then runs the head alone. 21,000 CNN/DM examples x ~63 targets x
    768 take ~2 GB in bf16, which fits in memory."""
    out = [None] * len(examples)
    batches = length_batches([example_len(e) for e in examples], batch_size)
    for idx in tqdm(batches, desc="body features", unit="batch", file=sys.stdout, leave=False, mininterval=1.0):
        x, y = (t.to(device) for t in collate([examples[i] for i in idx]))
        with autocast(device, dtype):
            h = model.hidden(x)
        keep = y != IGNORE
        for i, row_h, row_keep, row_y in zip(idx, h, keep, y):
            out[i] = (row_h[row_keep].to("cpu", dtype), row_y[row_keep].cpu())
    return out


def training_examples(model: GPT, shard, val_set, cache: bool | None, batch_size: int, device, dtype):
    """What the steps read: token examples, or, when only the LM head trains (and `cache` is not False), the frozen
    body's outputs computed once. Returns (training examples, validation examples, seconds it took)."""
    t = time.perf_counter()
    if cache is not False and head_only(model):
        shard = cache_features(model, shard, batch_size, device, dtype)
        val_set = cache_features(model, val_set, batch_size, device, dtype) if world()[0] == 0 else val_set
    return shard, val_set, time.perf_counter() - t


@contextmanager
def frozen_weights_in(model: GPT, dtype):
    """While training under autocast to bf16 (or fp16): each frozen matrix product's weight and bias held once in
    that dtype, where autocast would cast all ~100M of them again at every forward pass and keep the copies for
    the backward pass. The same values; the float32 originals come back afterwards (for merging and saving), as
    does a tied head's tie."""
    frozen = [m for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    if dtype == torch.float32 or not frozen:
        yield
        return
    originals = [(m, m.weight, m.bias) for m in frozen]
    for m in frozen:
        m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for m, weight, bias in originals:
            m.weight, m.bias = weight, bias


def training_module(model: GPT, compile: bool, device) -> nn.Module:
    """The module the steps call: the model, under torchrun wrapped in DistributedDataParallel, with --compile
    compiled as one graph of body + head + loss (see `compile_options`)."""
    net = model
    if world()[1] > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net, dynamic=True) if compile else net


def compile_options(compile: bool):
    """While training with --compile: no graph break at the data-dependent selection of the target positions. A
    scoped setting, not a process-wide one."""
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True) if compile else nullcontext()


def optimizer_step(net, opt, scaler, group: list, divisor, device, dtype) -> torch.Tensor:
    """One optimizer step over the micro-batches `group` [(x, y), ...]: the gradient of (summed loss / divisor),
    clipped at norm 1.0 after backward, on unscaled gradients. Under DDP, gradients are averaged once per step
    (divisor = target tokens of all ranks x ranks, since DDP divides by the rank count). Returns the summed loss."""
    total = gradients(net, scaler, group, divisor, device, dtype)
    update(opt, scaler)
    return total


def gradients(net, scaler, group: list, divisor, device, dtype) -> torch.Tensor:
    """A step's forward and backward passes (see optimizer_step): gradients accumulated, nothing trained changed."""
    total = torch.zeros((), device=device)
    for j, (x, y) in enumerate(group):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = j == len(group) - 1 or not hasattr(net, "no_sync")  # DDP: reduce on the last micro-batch only
        with autocast(device, dtype), (nullcontext() if sync else net.no_sync()):
            s = net(x, targets=y)
        scaler.scale(s / divisor).backward()
        total += s.detach()
    return total


def update(opt, scaler) -> None:
    """A step's update (see optimizer_step): clip the unscaled gradients, step, clear them."""
    params = [p for g in opt.param_groups for p in g["params"]]
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def step_divisor(targets: int, device) -> torch.Tensor:
    """What optimizer_step divides the summed loss by: the target tokens of the whole step, all ranks together."""
    n = torch.tensor(targets, device=device)
    if world()[1] > 1:
        dist.all_reduce(n)
    return n / world()[1]


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


def train(model: GPT, train_set, val_set, cfg: Config, lr: float, device, dtype, checkpoint: Path | None = None,
          identity: dict | None = None) -> list[dict]:
    """AdamW on the trainable parameters, warmup + cosine, gradient accumulation with the loss normalized per
    target token, clipping at 1.0, early stopping on validation loss; DistributedDataParallel under torchrun (each
    rank trains on its own shard, rank 0 evaluates). Writes `checkpoint` every --save-every steps, at each epoch end
    and on SIGINT/SIGTERM (then raises Interrupted); with --resume it continues from it, if the checkpoint belongs
    to the same run (`identity`, see run_identity). Leaves the best-validation weights in the model; returns the
    history."""
    rank, n_ranks = world()
    reset_peak_memory(device)  # the history's peak memory is the training's, not the model loading's
    params = trainable_state(model)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = TrainState.load(checkpoint, model, opt, scaler, identity or {}) if cfg.resume else \
        TrainState.start(params, identity or {}, (cfg.seed + rank) % 2**64)  # a 64-bit seed, as --seed is
    batch = cfg.eval_batch_size or cfg.batch_size
    steps_per_epoch, total, warmup = run_length(cfg, len(train_set), n_ranks)
    if cfg.resume:
        print(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch + 1}, batch {state.batch})")
    bar = tqdm(total=total, initial=state.step, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step",
               file=sys.stdout, dynamic_ncols=True, mininterval=1.0, disable=rank != 0)  # the whole run, with its ETA
    model.gradient_checkpointing = cfg.gradient_checkpointing

    def save_now(signum: int) -> None:
        """A signal, and the step still running seconds later (see stop_signals): write the last finished step's
        checkpoint now, from rank 0, and end the process (the other ranks end with it)."""
        if rank != 0:
            return
        try:
            with state.lock:
                state.save(checkpoint, model, opt, scaler, all_ranks=False)
            line, code = Interrupted(signum, state.step, checkpoint, late=True).line(resume_command()), 128 + signum
        except UsageError as e:  # the loss had diverged: no checkpoint of it
            line, code = f"error: {e}", 2
        bar.close()
        print(line, file=sys.stderr, flush=True)
        remove_held_locks()
        os._exit(code)

    with stop_signals(save_now) as received, compile_options(cfg.compile), frozen_weights_in(model, dtype), bar:
        shard, val_set, feature_seconds = training_examples(model, train_set[rank::n_ranks], val_set,
                                                            cfg.cache_features, batch, device, dtype)
        net = training_module(model, cfg.compile, device)
        lengths, logged = [example_len(e) for e in shard], -math.inf
        if cfg.resume and rank > 0:  # the checkpoint holds rank 0's data order; this rank's is replayed from its seed
            state.order = replayed_order((cfg.seed + rank) % 2**64, state.epoch, lengths, cfg.batch_size)
        while not state.done(cfg.epochs, total, cfg.patience):
            bar.set_description(f"epoch {state.epoch + 1}/{cfg.epochs}", refresh=False)
            micro, next_order = state.epoch_batches(lengths, cfg.batch_size)
            t0 = time.perf_counter() - state.sums.seconds
            while state.batch < steps_per_epoch and state.step < total:
                k = state.batch * cfg.grad_accum
                group = [batch_of([shard[i] for i in idx]) for idx in micro[k:k + cfg.grad_accum]]
                targets = sum(int((y != IGNORE).sum()) for _, y, _ in group)  # on the host: no device sync
                for g in opt.param_groups:
                    g["lr"] = lr_at(state.step, lr, warmup, total)
                loss = gradients(net, scaler, [(x, y) for x, y, _ in group], step_divisor(targets, device), device,
                                 dtype)
                with state.lock:  # what a checkpoint holds changes only here (and at the epoch's end)
                    update(opt, scaler)
                    state.count(loss, group, targets, time.perf_counter() - t0)
                bar.update()
                if rank == 0 and time.perf_counter() - logged > 1.0:  # from the first step on, then once a second
                    bar.set_postfix(state.progress(opt))
                    logged = time.perf_counter()
                signum = agreed_signal(received(), device)
                if signum or (cfg.save_every and state.step % cfg.save_every == 0):
                    with state.lock:
                        state.save(checkpoint, model, opt, scaler)
                elif state.step % 10 == 0:
                    state.check_finite(checkpoint)
                if signum:
                    raise Interrupted(signum, state.step, checkpoint)
            val_loss = validation_loss(model, val_set, batch, device, dtype)
            with state.lock:
                bar.write(state.end_epoch(val_loss, params, next_order,
                                          feature_seconds if state.epoch == 0 else 0.0, device))
                state.save(checkpoint, model, opt, scaler)
            if state.bad_epochs >= cfg.patience:
                bar.write(f"early stop: no better validation loss for {cfg.patience} epochs")
            if signum := agreed_signal(received(), device):  # a signal during the validation pass, even the last
                raise Interrupted(signum, state.step, checkpoint)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state.best[n])
    return state.history


SIGNAL_GRACE_S = 10.0  # how long a step may still run after SIGINT/SIGTERM before the step before it is saved


@contextmanager
def stop_signals(save_now=None):
    """While training, SIGINT (Ctrl-C) and SIGTERM (what torchrun and cluster schedulers send, then SIGKILL after
    ~30 s) ask the loop to stop after its current step; yields a function that returns the signal received (0:
    none), and that tells, once it has returned a signal, that the loop took it. A step may take longer than a
    scheduler waits, and the main thread cannot run Python while it is inside one long backward pass: so the
    signal also wakes a thread of its own (through the wakeup pipe Python's C handler writes to), and if the loop
    has not taken the signal SIGNAL_GRACE_S seconds later, that thread calls `save_now(signum)`, which saves the
    last finished step and ends the process. A second Ctrl-C exits at once."""
    received, taken = [], threading.Event()

    def handle(signum, frame):
        if received and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        received.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint (Ctrl-C again to "
              "exit at once)", file=sys.stderr, flush=True)

    def first() -> int:
        if received:
            taken.set()
        return received[0] if received else 0

    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield lambda: 0
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def watch():
        while data := os.read(wake_read, 64):  # b"" once the pipe is closed: training is over
            signum = next((n for n in data if n in (signal.SIGINT, signal.SIGTERM)), 0)
            if signum and save_now and not taken.wait(SIGNAL_GRACE_S):
                save_now(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="stop-signals", daemon=True)
    watcher.start()
    try:
        yield first
    finally:
        taken.set()
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        os.close(wake_write)
        watcher.join()
        os.close(wake_read)


def agreed_signal(received: int, device) -> int:
    """The signal to stop for now: at once in one process; under torchrun all ranks must stop after the same step,
    so they compare what they received after every step (a collective of one number: microseconds beside a step)."""
    if world()[1] == 1:
        return received
    t = torch.tensor(received, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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
