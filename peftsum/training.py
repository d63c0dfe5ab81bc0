"""Training: `train` is a short loop over epochs and steps of one `TrainState` (peftsum.checkpoints), stopped by
SIGINT or SIGTERM with a checkpoint wherever the signal lands."""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from peftsum.errors import Interrupted, UsageError
from peftsum.config import Config
from peftsum.runtime import autocast, reset_peak_memory, resume_command, world
from peftsum.model import GPT, IGNORE
from peftsum.methods import trainable_state
from peftsum.files import remove_held_locks
from peftsum.data import collate, collate_features, length_batches
from peftsum.checkpoints import TrainState, replayed_order


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


def training_module(model: GPT, device) -> nn.Module:
    """The module the steps call: the model, under torchrun wrapped in DistributedDataParallel."""
    if world()[1] > 1:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


@contextmanager
def compiled_blocks(model: GPT, compile: bool):
    """While training with --compile: each block compiled on its own ("regional" compilation), forward and
    backward, with dynamic shapes; the embedding, head and loss stay eager. The blocks share one code, so one
    compilation serves them all: it takes seconds where the whole step as one graph took minutes, and the fused
    code keeps fewer intermediates for the backward pass (docs/speed.md). Afterwards the blocks are eager again,
    for merging, saving and generation (which compiles its own decode step)."""
    if not compile:
        yield
        return
    for block in model.blocks:
        block.compile(dynamic=True)
    try:
        yield
    finally:
        for block in model.blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: the block's own eager call again


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

    with stop_signals(save_now) as received, compiled_blocks(model, cfg.compile), frozen_weights_in(model, dtype), bar:
        shard, val_set, feature_seconds = training_examples(model, train_set[rank::n_ranks], val_set,
                                                            cfg.cache_features, batch, device, dtype)
        net = training_module(model, device)
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


def say_in_handler(text: str) -> None:
    """A line to stderr from a signal handler, past Python's buffered stderr: the signal can arrive while the main
    thread is inside a write to it (the progress bar writes there all the time), and a buffered write entered again
    raises RuntimeError instead of stopping with a checkpoint."""
    try:
        os.write(sys.stderr.fileno(), (text + "\n").encode())
    except (AttributeError, OSError, ValueError):  # a stderr with no file descriptor (a test's capture)
        print(text, file=sys.stderr, flush=True)


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
            say_in_handler("\nsecond Ctrl-C: exiting at once, without a checkpoint")
            os._exit(128 + signum)
        received.append(signum)
        say_in_handler(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint (of the step "
                       f"before it if this one is still running in {SIGNAL_GRACE_S:g} s; Ctrl-C again to exit at once)")

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
