"""The benchmarks still run, as a user starts them (`python3 bench/X.py`), on a tiny checkpoint: `bench/generate.py`
end to end, to its last line's ratio, one row of `bench/train.py` (the part that calls the training code) and its
`--profile`. Their timings are not checked (benchmarks are not timed tests). A benchmark that breaks when the code
under it changes is caught here, not on a lent GPU."""
import json
import subprocess
import sys

from conftest import ROOT


def bench(script: str, *args) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_generate_benchmark_runs(gpt2_1024_dir):
    out = bench("generate.py", "--model", gpt2_1024_dir, "--dtypes", "fp32", "--batches", 2, "--articles", 3,
                "--prompt-len", 16, "--new-tokens", 3, "--runs", 1, "--engines", "ours", "transformers")
    assert "| 2 | transformers fp32 |" in out and "| 2 | ours fp32, continuous |" in out
    assert out.strip().splitlines()[-1].startswith("speedup: ")


def test_train_benchmark_row_runs(gpt2_1024_dir):
    """One row of ours as `bench/train.py` starts each in a process of its own (the whole table: 3 processes, 16 s
    here; the row is the part that calls into the training code)."""
    out = bench("train.py", "--row", "--side", "ours", "--method", "lora", "--dtype", "fp32", "--checkpointing",
                "--model", gpt2_1024_dir, "--device", "cpu", "--runs", 1)
    row = json.loads(out.strip().splitlines()[-1])
    assert row["seconds"] > 0 and row["setup_seconds"] > 0 and row["peak_mb"] > 0


def test_train_benchmark_profile_runs(gpt2_1024_dir):
    """`--profile`: where a step goes, its FLOP floor and what it keeps for the backward pass (docs/speed.md)."""
    out = bench("train.py", "--profile", "--methods", "lora", "--dtypes", "bf16", "--model", gpt2_1024_dir,
                "--runs", 1)
    assert "lora: step " in out and "floor (all FLOPs at the peak)" in out
    assert float(out.split("kept for the backward pass: ")[1].split()[0]) > 0
