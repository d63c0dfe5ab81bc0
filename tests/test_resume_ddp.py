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


def torchrun(out, *args, log_dir=None) -> list[str]:
    """torchrun with 2 gloo ranks running main2.py through tests/ddp_worker.py (which also writes each rank's
    weights and pid to `out`); with `log_dir`, each rank's stdout and stderr go to files of their own there."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *logs,
            str(ROOT / "tests" / "ddp_worker.py"), str(out), str(ROOT / "main2.py"), *map(str, args), "--device", "cpu"]


def rank_stderr(log_dir, rank: int) -> str:
    (path,) = log_dir.glob(f"**/attempt_0/{rank}/stderr.log")
    return path.read_text()


@pytest.fixture(scope="module")
def uninterrupted_ddp(tiny_dir, data_dir, tmp_path_factory):
    """The resume tests' training run by two gloo ranks, uninterrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted-ddp")
    p = subprocess.run(torchrun(folder, *train_args(tiny_dir, data_dir, folder)), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return folder


def test_two_gloo_ranks_end_identical_and_rank0_saves(uninterrupted_ddp):
    r0, r1 = (load_file(uninterrupted_ddp / f"rank{r}.safetensors") for r in (0, 1))
    saved = load_file(uninterrupted_ddp / "w.safetensors")
    assert r0.keys() == r1.keys() == saved.keys()
    assert all((r0[k] == r1[k]).all() for k in r0), "ranks diverged"
    assert all((r0[k] == saved[k]).all() for k in r0), "the saved file is not rank 0's weights"
    assert any((r0[k] != 0).any() for k in r0 if k.endswith(".B"))  # it trained: B moved from zero
    assert len(history(uninterrupted_ddp)) == 3


def test_torchrun_sigterm_checkpoints_and_its_command_resumes_the_same_run(tiny_dir, data_dir, tmp_path,
                                                                           uninterrupted_ddp):
    """Issue 22, item 2: SIGTERM to torchrun (which passes it to every rank and kills them 30 s later): the ranks
    stop after the same step, rank 0 writes the checkpoint, the lock file goes, each rank ends in one line, and
    the command in that line, torchrun with the same number of processes, ends with the uninterrupted run's
    weights and history. One process may not continue it: the number of processes is part of the run."""
    args = train_args(tiny_dir, data_dir, tmp_path)
    p = subprocess.Popen(torchrun(tmp_path, *args, log_dir=tmp_path / "logs"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (tmp_path / "w.ckpt.safetensors").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=200)
    lines = []
    for rank in (0, 1):
        err = rank_stderr(tmp_path / "logs", rank)
        assert "Traceback" not in err, err[-3000:]
        lines.append(err.strip().splitlines()[-1])
    state = checkpoint_state(tmp_path / "w.ckpt.safetensors")
    assert all(line.startswith(f"interrupted by SIGTERM after step {state['step']}: wrote the checkpoint")
               for line in lines), lines
    assert state["run"]["ranks"] == 2 and state["step"] < 18
    assert not (tmp_path / "w.safetensors.lock").exists() and not (tmp_path / "w.safetensors").exists()

    alone = cli("main2.py", *args, "--device", "cpu", "--resume")
    assert alone.returncode == 2 and "Traceback" not in alone.stderr, alone.stderr[-2000:]
    assert "2 training processes (torchrun --nproc-per-node=2) there, 1 now" in alone.stderr
    assert (tmp_path / "w.ckpt.safetensors").is_file()

    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[:3] == ["torchrun", "--standalone", "--nproc-per-node=2"] and command[-1] == "--resume"
    assert command[3] == str(ROOT / "main2.py")
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command[1:]], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(uninterrupted_ddp / "w.safetensors", tmp_path / "w.safetensors")
    assert history(tmp_path) == history(uninterrupted_ddp)


LONG_STEP = """
import runpy, sys, time
sys.path.insert(0, {root!r})
from peftsum import training
training.SIGNAL_GRACE_S = 1.0
gradients, steps = training.gradients, []
def slow(*args, **kwargs):
    steps.append(1)
    if len(steps) == 3:  # the third step takes ten minutes
        print("step 3 running", file=sys.stderr, flush=True)
        time.sleep(600)
    return gradients(*args, **kwargs)
training.gradients = slow
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_step_that_outlasts_the_signal_saves_the_step_before_it(tiny_dir, data_dir, tmp_path, uninterrupted):
    """Issue 22, item 2: a step still running SIGNAL_GRACE_S after SIGTERM (a scheduler kills seconds later;
    here the grace is 1 s and the step ten minutes): the last finished step is saved at once, one line says so,
    the lock file goes, exit code 143, and --resume ends with the uninterrupted run's weights."""
    args = train_args(tiny_dir, data_dir, tmp_path)
    driver = LONG_STEP.format(root=str(ROOT), script=str(ROOT / "main2.py"))
    p = subprocess.Popen([sys.executable, "-c", driver, *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    seen = []
    while "step 3 running" not in (line := p.stderr.readline()) and line:
        seen.append(line)
    assert line, "".join(seen)[-3000:]
    t = time.time()
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143 and time.time() - t < 30, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM during step 3, which was still running seconds later: saved step "
                           "2 instead; wrote the checkpoint"), last
    assert checkpoint_state(tmp_path / "w.ckpt.safetensors")["step"] == 2
    assert not (tmp_path / "w.safetensors.lock").exists()
    resumed = cli("main2.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(uninterrupted / "w.safetensors", tmp_path / "w.safetensors")
    assert history(tmp_path) == history(uninterrupted)


def test_a_killed_rank_ends_the_other_in_one_line(tiny_dir, data_dir, tmp_path):
    """Issue 22, item 2: SIGKILL to rank 1 mid-training (the OOM killer, a crash): rank 0 ends in one line, no
    traceback (a failed collective, or the SIGTERM torchrun then sends), and its lock file goes."""
    p = subprocess.Popen(torchrun(tmp_path, *train_args(tiny_dir, data_dir, tmp_path), log_dir=tmp_path / "logs"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    while not (tmp_path / "w.ckpt.safetensors").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
    p.communicate(timeout=200)
    assert p.returncode != 0
    err = rank_stderr(tmp_path / "logs", 0)
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(("error: rank 0 of 2: another process of this torchrun job ended",
                            "interrupted by SIGTERM")), last
    assert not (tmp_path / "w.safetensors.lock").exists()


def test_a_stopped_sweep_keeps_the_work_of_its_run_and_the_same_command_continues_it(tiny_dir, data_dir, tmp_path):
    """A SIGTERM sent to sweep.py alone (as a scheduler sends it) reaches the run under way, which writes its
    checkpoint (before, the sweep's own exit killed it 0.25 s later, with its step's work and its lock file); the
    sweep prints the command that continues; that command resumes the run from its checkpoint (--overwrite too: it
    replaces the earlier record, not the unfinished training), and once the run's record is there, skips it."""
    flags = [str(a) for a in train_args(tiny_dir, data_dir, tmp_path)]
    flags = [a for i, a in enumerate(flags) if a != "--train" and "--weights" not in flags[max(i - 1, 0):i + 1]]
    command = [str(ROOT / "sweep.py"), "lora_rank", "--only", "lora_rank-4", "--weights-dir", str(tmp_path), *flags]
    (tmp_path / "runs").mkdir()  # a record of an earlier run, which --overwrite replaces
    (tmp_path / "runs" / "lora_rank-4.json").write_text("{}")
    p = subprocess.Popen([sys.executable, *command, "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    checkpoint = tmp_path / "lora_rank-4.ckpt.safetensors"
    deadline = time.time() + 200
    while not checkpoint.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=200)
    assert p.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert "interrupted by SIGTERM after step" in err  # the run's own line: it finished its step and saved it
    last = err.strip().splitlines()[-1]
    assert last.startswith("the sweep stopped in lora_rank-4; continue it with: python3 "), err
    assert checkpoint.exists() and not (tmp_path / "lora_rank-4.safetensors").exists()
    assert not list(tmp_path.glob("*.lock"))

    again = shlex.split(last.split("continue it with: ", 1)[1])
    # with --overwrite, the same command would run again what had finished: it names the runs left instead
    assert again[again.index("--only") + 1] == "lora_rank-4" and "--overwrite" in again, again
    resumed = subprocess.run([sys.executable, *again[1:]], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "--resume (from its checkpoint)" in resumed.stdout and "resumed from" in resumed.stdout
    assert len(json.loads((tmp_path / "runs" / "lora_rank-4.json").read_text())["history"]) == 3
    assert not checkpoint.exists()

    skipped = cli("sweep.py", *command[1:])
    assert skipped.returncode == 0 and "lora_rank-4: skipped" in skipped.stdout, skipped.stderr
