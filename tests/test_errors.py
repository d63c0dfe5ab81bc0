"""Bad input gets one line saying what is wrong and what to do, exit code 2, no traceback.
In-process (conftest.cli): the entry scripts' own code path, without starting Python each time."""
import json

import pytest
import torch

import common
from conftest import cli


def assert_usage_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    assert "Traceback" not in p.stderr
    line = p.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    for needle in needles:
        assert needle in line, line


@pytest.fixture
def base(tiny_dir, data_dir, tmp_path):
    return ["--model", tiny_dir, "--data", data_dir, "--out", tmp_path / "runs", "--max-new-tokens", 4,
            "--test-size", 2, "--eval-batch-size", 2, "--batch-size", 4]


@pytest.mark.parametrize("content,needle", [(b"", "not a readable safetensors"), (b"\x00" * 5, "not a readable"),
                                            (b"not safetensors at all" * 10, "not a readable safetensors")])
def test_broken_weights_files(base, tmp_path, content, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    assert_usage_error(cli("main2.py", *base, "--weights", bad), needle, "--train")


def test_truncated_weights_file(base, tmp_path, lora_weights):
    w = tmp_path / "w.safetensors"
    w.write_bytes(lora_weights.read_bytes()[:-100])
    assert_usage_error(cli("main2.py", *base, "--weights", w), "not a readable safetensors")


def test_weights_of_another_base_model(base, tmp_path, tiny_dir):
    """LoRA weights of a wider model (as gpt2-medium's would be for gpt2) are refused with the reason."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from safetensors.torch import save_file
    wide = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=256, n_layer=2, n_head=2, n_embd=48))
    model = common.apply_lora(common.from_hf(wide), 16, 32)
    record = {"method": "lora", "base_model": "wide-gpt2"}
    w = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in common.trainable_state(model).items()}, str(w),
              metadata={"record": json.dumps(record)})
    assert_usage_error(cli("main2.py", *base, "--weights", w), "does not fit this model", "wide-gpt2")


def test_data_folder_without_splits(base, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a if a != base[3] else tmp_path / "empty" for a in base]
    assert_usage_error(cli("main2.py", *args, "--baseline"), "no train.csv", "validation", "'article'")


def test_data_without_columns(base, tmp_path):
    folder = tmp_path / "cols"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": "a", "summary": "b"}) + "\n")
    args = [a if a != base[3] else folder for a in base]
    assert_usage_error(cli("main2.py", *args, "--baseline"), "no column article, highlights")


def test_empty_rows_are_skipped_and_counted_and_unicode_is_fine(base, tmp_path):
    folder = tmp_path / "rows"
    folder.mkdir()
    rows = [{"id": "1", "article": "Ünïcødé — 北京 🚀 news. The team won.", "highlights": "Der Bär läuft. 東京."},
            {"id": "2", "article": "   ", "highlights": "x"}, {"id": "3", "article": "y", "highlights": ""}]
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    args = [a if a != base[3] else folder for a in base]
    p = cli("main2.py", *args, "--baseline", "--test-size", 10)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped 2 test rows with an empty article or summary" in p.stdout


@pytest.mark.parametrize("script,flags,needle", [
    ("main2", ["--top-p", "0"], "top_p must be in (0, 1]"),
    ("main2", ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("main2", ["--temperature", "0"], "temperature must be > 0"),
    ("main2", ["--temperature", "-1"], "temperature must be > 0"),
    ("main2", ["--train-size", "-5"], "--train-size must be >= 0"),
    ("main2", ["--max-steps", "-1"], "--max-steps must be >= 0"),
    ("main2", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("main", ["--prompt-tokens", "0"], "--prompt-tokens must be > 0"),
    ("main2", ["--lora-rank", "0"], "--lora-rank must be > 0"),
    ("main2", ["--dtype", "fp8"], "--dtype must be one of"),
])
def test_flags_out_of_range(capsys, script, flags, needle):
    """In-process (the entry scripts parse with the same function inside the same cli_errors)."""
    import importlib
    hparams = {"main": "PromptTuning", "main2": "LoRA"}[script]
    cls = getattr(importlib.import_module(script), hparams)
    with pytest.raises(SystemExit) as exit:
        with common.cli_errors():
            common.parse_args(cls, "", flags)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_nan_loss_stops_and_names_the_step(base, tmp_path):
    p = cli("main2.py", *base, "--train", "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "6", "--weights",
            tmp_path / "w.safetensors")
    assert_usage_error(p, "NaN or infinite at step", "--lr")
    assert not (tmp_path / "w.safetensors").exists()


def test_unknown_model_while_offline(base, monkeypatch):
    monkeypatch.setattr(common, "hub_reachable", lambda: False)
    args = [a if a != base[1] else "no-such-user/no-such-gpt2" for a in base]
    p = cli("main2.py", *args, "--baseline")
    assert_usage_error(p, "cannot download 'no-such-user/no-such-gpt2'", "not reachable", "--model")


def test_out_of_memory_suggests_smaller_batches(capsys):
    with pytest.raises(SystemExit) as exit:
        with common.cli_errors():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and "--grad-accum" in err


def test_article_from_stdin_and_missing_file(base, tmp_path):
    long = "The police said a man was arrested. " * 400
    p = cli("main2.py", *base, "--baseline", "--article", "-", stdin=long)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "summary:" in p.stdout and "1 of 1 articles truncated" in p.stdout
    assert_usage_error(cli("main2.py", *base, "--baseline", "--article", tmp_path / "none.txt"), "cannot read")


def test_weights_folder_that_is_not_an_adapter(base, tmp_path):
    (tmp_path / "folder").mkdir()
    assert_usage_error(cli("main2.py", *base, "--weights", tmp_path / "folder"), "not a peft adapter")


def test_safetensors_without_our_record(base, tmp_path):
    from safetensors.torch import save_file
    w = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(w))
    assert_usage_error(cli("main2.py", *base, "--weights", w), "not written by these scripts")
