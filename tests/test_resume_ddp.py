"""A run killed with SIGKILL resumes to the weights of an uninterrupted run; two gloo ranks stay identical."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def args(tiny_dir, data_dir, tmp_path, name):
    return [sys.executable, str(ROOT / "main2.py"), "--model", str(tiny_dir), "--data", str(data_dir), "--train",
            "--epochs", "3", "--patience", "3", "--batch-size", "2", "--save-every", "2", "--warmup-steps", "2",
            "--test-size", "2", "--max-new-tokens", "4", "--eval-batch-size", "2",
            "--weights", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name)]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_dir, data_dir, tmp_path):
    subprocess.run(args(tiny_dir, data_dir, tmp_path, "ref"), check=True, capture_output=True, timeout=300)
    ckpt = tmp_path / "w.ckpt.safetensors"
    p = subprocess.Popen(args(tiny_dir, data_dir, tmp_path, "w"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL  # killed, not finished
    assert not (tmp_path / "w.safetensors").exists()
    with safe_open(str(ckpt), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["epoch"] == 0 and state["k"] > 0  # mid-epoch

    resumed = subprocess.run(args(tiny_dir, data_dir, tmp_path, "w") + ["--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpt} at step {state['step']}" in resumed.stdout
    ref, got = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "w.safetensors")
    assert ref.keys() == got.keys()
    assert all((ref[k] == got[k]).all() for k in ref), "resumed weights differ from the uninterrupted run's"
    history = lambda name: [h["val_loss"] for h in json.loads((tmp_path / name / "lora.json").read_text())["history"]]
    assert history("w") == history("ref")
    assert not ckpt.exists()  # removed once the weights are saved


def test_two_gloo_ranks_end_identical_and_rank0_saves(tiny_dir, data_dir, tmp_path):
    weights = tmp_path / "w.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), str(ROOT / "main2.py"),
           *args(tiny_dir, data_dir, tmp_path, "w")[2:], "--max-steps", "4", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout.count("trainable parameters:") == 1  # only rank 0 logs
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    saved = load_file(weights)
    assert r0.keys() == r1.keys() == saved.keys()
    assert all((r0[k] == r1[k]).all() for k in r0), "ranks diverged"
    assert all((r0[k] == saved[k]).all() for k in r0), "the saved file is not rank 0's weights"
    assert any((r0[k] != 0).any() for k in r0 if k.endswith(".B"))  # it trained: B moved from zero
