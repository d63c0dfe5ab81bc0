"""Nothing lost, nothing mixed: a run stopped by Ctrl-C, SIGTERM or SIGKILL resumes to the weights of an
uninterrupted run; a checkpoint continues only its own run; two runs never train into the same weights; two gloo
ranks stay identical. The signals are real: those tests start a real training process."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from peftsum import training
from peftsum.files import weights_lock
from peftsum.training import stop_signals
from conftest import ROOT, cli, train_args


def same_weights(a, b):
    ref, got = load_file(a), load_file(b)
    return ref.keys() == got.keys() and all((ref[k] == got[k]).all() for k in ref)


def history(folder):
    return [h["val_loss"] for h in json.loads((folder / "runs" / "lora.json").read_text())["history"]]


def checkpoint_state(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def start_training(tiny_dir, data_dir, folder):
    """The resume tests' training in a real process, once it has written its first checkpoint (after step 2)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "main2.py"), *map(str, train_args(tiny_dir, data_dir, folder))],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (folder / "w.ckpt.safetensors").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    return p


def test_ctrl_c_checkpoints_says_how_to_resume_and_resumes_exactly(tiny_dir, data_dir, tmp_path, uninterrupted):
    """Issue 12, item 2: Ctrl-C (SIGINT) sent to a training process finishes the step, writes a checkpoint, prints
    one line with the command that continues, and exits with 130; that command ends with the weights of the
    uninterrupted run."""
    p = start_training(tiny_dir, data_dir, tmp_path)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=200)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGINT after step ") and "--resume" in last, err
    state = checkpoint_state(tmp_path / "w.ckpt.safetensors")
    assert f"after step {state['step']}:" in last and state["step"] < 36  # it stopped early, and saved that step
    assert not (tmp_path / "w.safetensors").exists()

    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[1] == str(ROOT / "main2.py") and command[-1] == "--resume"
    resumed = cli("main2.py", *command[2:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {state['step']}" in resumed.stdout
    assert same_weights(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")
    assert history(tmp_path) == history(uninterrupted)


@pytest.mark.parametrize("signum,hook,step", [(signal.SIGTERM, "lr_at", 3), (signal.SIGINT, "validation_loss", 12)],
                         ids=["SIGTERM-during-a-step", "SIGINT-during-validation"])
def test_a_signal_inside_the_process_checkpoints_and_resumes_exactly(signum, hook, step, tiny_dir, data_dir, tmp_path,
                                                                     uninterrupted, monkeypatch):
    """A signal delivered to this process while training runs its third step, or validates its first epoch (the
    handler is the one the test above reaches in a real process): the checkpoint holds that step, the exit code is
    128 + the signal (SIGTERM: what a cluster scheduler sends), and resuming gives the uninterrupted weights."""
    original = getattr(training, hook)

    def signalling(*args):
        if hook == "validation_loss" or args[0] == 2:
            signal.raise_signal(signum)
        return original(*args)
    monkeypatch.setattr(training, hook, signalling)

    def unhandled(signum, frame):  # training's own handler replaces this one; without it, pytest would be killed
        raise AssertionError(f"signal {signum} was not handled by the training loop")
    previous = signal.signal(signum, unhandled)
    try:
        p = cli("main2.py", *train_args(tiny_dir, data_dir, tmp_path))
    finally:
        signal.signal(signum, previous)
    assert p.returncode == 128 + signum, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {signal.Signals(signum).name} after step {step}: wrote the checkpoint")
    assert checkpoint_state(tmp_path / "w.ckpt.safetensors")["step"] == step
    monkeypatch.undo()
    assert cli("main2.py", *train_args(tiny_dir, data_dir, tmp_path), "--resume").returncode == 0
    assert same_weights(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")
    assert history(tmp_path) == history(uninterrupted)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_dir, data_dir, tmp_path, uninterrupted):
    """A kill at any moment (here: right after the first checkpoint) leaves a whole checkpoint to resume from."""
    p = start_training(tiny_dir, data_dir, tmp_path)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL  # killed, not finished
    assert not (tmp_path / "w.safetensors").exists()
    state = checkpoint_state(tmp_path / "w.ckpt.safetensors")
    assert state["epoch"] == 0 and state["batch"] > 0  # mid-epoch

    resumed = cli("main2.py", *train_args(tiny_dir, data_dir, tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'w.ckpt.safetensors'} at step {state['step']}" in resumed.stdout
    assert same_weights(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")
    assert history(tmp_path) == history(uninterrupted)
    assert not (tmp_path / "w.ckpt.safetensors").exists()  # removed once the weights are saved
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.lock"))


def test_second_ctrl_c_exits_at_once(monkeypatch, capsys):
    """The first SIGINT asks the loop to stop after its step; a second one exits at once (os._exit: no cleanup, no
    checkpoint); the handlers are restored after training."""
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_signals() as received:
        assert received() == 0
        signal.raise_signal(signal.SIGINT)
        assert received() == signal.SIGINT and exits == []
        signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert "second Ctrl-C: exiting at once" in capsys.readouterr().err


def resume_copy(interrupted, tmp_path):
    shutil.copy(interrupted / "w.ckpt.safetensors", tmp_path)
    return tmp_path / "w.ckpt.safetensors"


def test_resume_continues_its_own_run_only(tiny_dir, data_dir, tmp_path, interrupted, uninterrupted):
    """Issue 12, item 1: a checkpoint records its resolved settings, base model and data; --resume with other
    settings (lr, train size, LoRA alpha, seed, dtype), another base model of the same shape, or other data is
    refused with the differences named, and the checkpoint is kept; the same settings resume exactly, also with
    other settings of how the run executes (here --eval-batch-size)."""
    from transformers import GPT2LMHeadModel
    ckpt = resume_copy(interrupted, tmp_path)
    args = train_args(tiny_dir, data_dir, tmp_path) + ["--resume"]
    other = tmp_path / "other-gpt2"  # the same shape and tokenizer, other weights
    shutil.copytree(tiny_dir, other)
    hf = GPT2LMHeadModel.from_pretrained(tiny_dir)
    hf.lm_head.weight.data.mul_(1.01)
    hf.save_pretrained(other)
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for split in ("train", "validation", "test"):
        lines = (data_dir / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (fewer / f"{split}.jsonl").write_text("".join(lines[:-1] if split == "validation" else lines))
    for flags, needles in [(["--lr", "0.002"], ["--lr 0.001 there, 0.002 now"]),
                           (["--train-size", "10"], ["--train-size 21000 there, 10 now", "other training"]),
                           (["--lora-alpha", "16", "--seed", "1"], ["--lora-alpha 32.0 there, 16.0 now", "--seed 0"]),
                           (["--dtype", "fp32"], ["--dtype 'auto' there, 'fp32' now"]),
                           (["--model", other], ["base model"]),
                           (["--data", fewer], ["other training or validation examples"])]:
        p = cli("main2.py", *args, *flags)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        line = p.stderr.strip()
        assert "\n" not in line and "belongs to another run" in line, line
        assert all(n in line for n in needles), line
        assert ckpt.is_file() and not (tmp_path / "w.safetensors").exists()
    resumed = cli("main2.py", *args, "--eval-batch-size", 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")


def test_a_second_run_into_the_same_weights_is_refused_and_names_the_holder(tiny_dir, data_dir, tmp_path):
    """Issue 12, item 4: a training holds a lock on its weights path; a second one stops at once and says who
    holds it. Temporary files that killed runs left there are removed."""
    weights = tmp_path / "w.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".w.ckpt.safetensors.{int(dead.stdout)}-0badc0de.tmp"  # a killed run's half-written file
    orphan.write_bytes(b"half")
    with weights_lock(weights):
        p = cli("main2.py", *train_args(tiny_dir, data_dir, tmp_path))
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip()
    assert "\n" not in line and f"{weights} is locked by another run training into it (pid {os.getpid()} on " \
        f"{socket.gethostname()} since " in line, line
    assert orphan.exists()  # nothing was touched while the other run holds the lock
    p = cli("main2.py", *train_args(tiny_dir, data_dir, tmp_path), "--max-steps", 1)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "removed 1 temporary file(s) that a killed run left" in p.stdout and not orphan.exists()


def test_two_gloo_ranks_end_identical_and_rank0_saves(tiny_dir, data_dir, tmp_path):
    weights = tmp_path / "w.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), str(ROOT / "main2.py"),
           *map(str, train_args(tiny_dir, data_dir, tmp_path)), "--max-steps", "4", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("trainable parameters:") == 1  # only rank 0 logs
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    saved = load_file(weights)
    assert r0.keys() == r1.keys() == saved.keys()
    assert all((r0[k] == r1[k]).all() for k in r0), "ranks diverged"
    assert all((r0[k] == saved[k]).all() for k in r0), "the saved file is not rank 0's weights"
    assert any((r0[k] != 0).any() for k in r0 if k.endswith(".B"))  # it trained: B moved from zero
