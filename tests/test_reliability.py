"""Nothing lost, nothing silent (issue 22): inputs that used to cost an epoch, an evaluation or a traceback end in one
line and exit code 2 before the slow work, writing nothing; a killed write's leftovers are cleaned by a later run
when they are its own, never when a live process still writes them; articles keep one id each, so paired statistics
cover every one. In-process (conftest.cli), with the tiny checkpoint and data."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from peftsum import cli as cli_module, evaluation, files, interop, training
from peftsum.config import parse_args
from peftsum.data import draw_rows
from peftsum.errors import UsageError
from peftsum.generation import generate
from conftest import cli, train_args
from test_errors import assert_usage_error, files as listing

import main2

SLOW_WORK = {"load_splits": (cli_module, "load_splits"), "train": (training, "train"),
             "summarize": (evaluation, "summarize"), "training_examples": (training, "training_examples")}


@pytest.fixture
def base(tiny_dir, data_dir, tmp_path):
    return ["--model", tiny_dir, "--data", data_dir, "--out", tmp_path / "runs", "--max-new-tokens", 4,
            "--test-size", 2, "--eval-batch-size", 2, "--batch-size", 4, "--max-steps", 2]


def no_slow_work(monkeypatch, *names):
    """Make each slow step fail the test if it is reached: the refusal must come before it."""
    for name in names:
        module, attr = SLOW_WORK[name]
        monkeypatch.setattr(module, attr, lambda *a, _n=name, **k: pytest.fail(f"reached {_n} before refusing"))


def refused(p, tmp_path, before, *needles):
    assert_usage_error(p, *needles)
    assert listing(tmp_path) == before  # nothing written, nothing removed


# items 4, 5, 8 and 11: what a run writes, what a killed write leaves, and what --weights is

def test_a_weights_name_too_long_for_its_temporary_file_is_refused_before_training(base, tmp_path, monkeypatch):
    """A 240-character name fits, but the checkpoint's temporary name (~27 more) does not: it trained a whole epoch
    and died at the first checkpoint."""
    no_slow_work(monkeypatch, "load_splits", "train")
    before = listing(tmp_path)
    weights = tmp_path / ("w" * 228 + ".safetensors")
    refused(cli("main2.py", *base, "--train", "--weights", weights), tmp_path, before,
            "--weights makes a name too long", "at most 255", "pass a shorter --weights")


def test_a_run_name_too_long_for_its_predictions_is_refused_before_the_evaluation(base, tmp_path, monkeypatch):
    """The record's predictions file and its temporary name are ~40 characters longer than --run-name."""
    no_slow_work(monkeypatch, "load_splits", "summarize")
    before = listing(tmp_path)
    refused(cli("main2.py", *base, "--baseline", "--run-name", "r" * 220), tmp_path, before,
            "--run-name makes a name too long", "pass a shorter --run-name")


def test_a_name_that_fits_still_runs(base, tmp_path):
    """The limit is the file system's, not a guess: the longest name whose temporary name fits trains and saves."""
    weights = tmp_path / ("w" * (255 - len(files.temporary_name("x.ckpt.safetensors")) + 1) + ".safetensors")
    p = cli("main2.py", *base, "--train", "--weights", weights)
    assert p.returncode == 0, p.stderr[-2000:]
    assert weights.is_file()


def test_a_failed_write_of_a_long_name_is_its_own_error_not_the_cleanups(tmp_path):
    """The cleanup after a failed write must not raise (is_dir() on a name too long did), hiding the real error."""
    files.remove_path(tmp_path / ("x" * 300))  # no OSError
    with pytest.raises(UsageError, match="cannot write .*: File name too long"):
        files.write_text(tmp_path / ("x" * 250), "text")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("resume", [False, True])
def test_train_into_a_folder_is_refused_before_training(base, tmp_path, monkeypatch, resume):
    """A peft adapter folder is a valid --weights to evaluate, never one to train into: it trained to the end and
    failed "Is a directory"."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    no_slow_work(monkeypatch, "load_splits", "train")
    before = listing(tmp_path)
    refused(cli("main2.py", *base, "--train", "--weights", folder, *["--resume"] * resume), tmp_path, before,
            "is a folder", "--train writes one weights file")


def test_safetensors_writes_its_own_temporary_file_inside_ours(tmp_path, monkeypatch):
    """safetensors' save_file writes `.tmpXXXXXX` beside the file it is given and renames it: given a file inside
    our temporary folder, a write killed at any moment leaves nothing beside the weights but that folder."""
    import peftsum.weights
    seen = []
    real = peftsum.weights.save_file

    def watched(tensors, filename, metadata=None):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(tensors, filename, metadata=metadata)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
    monkeypatch.setattr(peftsum.weights, "save_file", watched)
    peftsum.weights.write_safetensors(tmp_path / "w.safetensors", {"x": torch.zeros(4)}, {"state": "{}"})
    assert all(len(names) == 1 and names[0].startswith(f".w.safetensors.{os.getpid()}-") for names in seen), seen
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def partial_checkpoint(path, metadata=None):
    """What a write killed mid-way leaves: a safetensors header (ours: a training state), data cut short."""
    data = save({"x": torch.zeros(1000)}, metadata=metadata or {"state": "{}"})
    path.write_bytes(data[:len(data) // 2])
    return path


def test_a_later_run_removes_its_own_leftovers_and_no_live_writers_file(tmp_path):
    weights = tmp_path / "w.safetensors"
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(killed.stdout)  # a process that has ended
    ours_dead = tmp_path / f".w.ckpt.safetensors.{dead_pid}-0123abcd.tmp"  # this version's: a folder
    ours_dead.mkdir()
    partial_checkpoint(ours_dead / ".tmpAb12Cd")
    partial_checkpoint(tmp_path / ".tmpQw34Er")  # an earlier version's, left by safetensors itself
    foreign = tmp_path / ".tmpZx56Cv"  # someone else's temporary file: not a header of ours
    foreign.write_bytes(os.urandom(64))
    live = partial_checkpoint(tmp_path / ".tmpLv78Ik")  # ours, but a live process still writes it
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(live)!r}, 'ab'); import time; time.sleep(60)"])
    try:
        deadline = time.time() + 30
        while (live.stat().st_dev, live.stat().st_ino) not in files.open_files() and time.time() < deadline:
            time.sleep(0.05)
        for p in (weights, weights.with_name("w.ckpt.safetensors")):
            files.remove_orphans(p)
        left = sorted(p.name for p in tmp_path.iterdir())
    finally:
        holder.kill()
        holder.wait()
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc: safetensors' leftovers are only reported here")
    assert left == sorted([foreign.name, live.name])


def test_a_training_cleans_its_folder_before_it_starts(base, tmp_path):
    legacy = partial_checkpoint(tmp_path / ".tmpQw34Er")
    p = cli("main2.py", *base, "--train", "--weights", tmp_path / "w.safetensors")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "removed 1 temporary file(s) that a killed run left beside" in p.stdout
    assert not legacy.exists()


def test_broken_weights_without_model_say_the_weights_are_unreadable(base, tmp_path, monkeypatch):
    """The base model fell back to gpt2 and the message was "cannot download 'gpt2'"."""
    monkeypatch.setattr(interop, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert_usage_error(cli("main2.py", *base[2:], "--weights", bad), "is not a readable safetensors file")


@pytest.mark.parametrize("with_model", [False, True])
def test_a_checkpoint_as_weights_says_it_is_a_checkpoint(base, interrupted, monkeypatch, with_model):
    checkpoint = interrupted / "w.ckpt.safetensors"
    p = cli("main2.py", *(base if with_model else base[2:]), "--weights", checkpoint)
    assert_usage_error(p, "is a training checkpoint, not finished weights", "--train --resume --weights",
                       str(interrupted / "w.safetensors"))


def test_a_record_whose_base_model_is_not_a_string_is_one_line(base, tmp_path, lora_weights, monkeypatch):
    with safe_open(str(lora_weights), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
    save_file(load_file(lora_weights), str(tmp_path / "w.safetensors"),
              metadata={"record": json.dumps(record | {"base_model": ["gpt2"]})})
    monkeypatch.setattr(interop, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    args = base[2:]  # no --model: the record must say which
    before = listing(tmp_path)
    refused(cli("main2.py", *args, "--weights", tmp_path / "w.safetensors"), tmp_path, before,
            "names no base model", "--model")


# items 1 and 7: a model folder without tokenizer files, a truncated GGUF file

def test_a_model_folder_without_tokenizer_files_is_one_line_before_training(tiny_dir, base, tmp_path, monkeypatch):
    """model.save_pretrained alone: transformers gives an empty tokenizer, which trained on zero tokens, saved,
    then died in a traceback."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, bare / name)
    no_slow_work(monkeypatch, "load_splits", "train")
    before = listing(tmp_path)
    args = [a if a != tiny_dir else bare for a in base]
    refused(cli("main2.py", *args, "--train", "--weights", tmp_path / "w.safetensors"), tmp_path, before,
            "tokenizer of", "no tokenizer files")


@pytest.mark.parametrize("keep", [10, 2000, 0.5, -10])
def test_a_truncated_gguf_is_one_line(llama_dirs, base, tmp_path, keep):
    pytest.importorskip("gguf", reason="gguf is a dependency: pip install -r requirements.txt")
    from peftsum.gguf_export import export_gguf
    model, tok = interop.load_model(str(llama_dirs["gqa-tied"]))
    export_gguf(model, tok, tmp_path / "full.gguf", "f32")
    data = (tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    before = listing(tmp_path)
    args = [a if a != base[1] else cut for a in base]
    refused(cli("main2.py", *args, "--baseline"), tmp_path, before, "is not a complete GGUF file", "download it again")


# items 6 and 10: peft adapters with ranks or options ours cannot load

@pytest.mark.parametrize("config,needle", [
    ({"r": 0, "lora_alpha": 8}, "gives rank 0 and alpha 8"),
    ({"r": 16, "lora_alpha": 32, "rank_pattern": {"c_attn": -1}}, "gives rank -1 and alpha 32 for transformer.h.0"),
    ({"r": 16, "lora_alpha": 32, "rank_pattern": {"c_attn": 10**9}}, "gives rank 1000000000 and alpha 32 for"),
    ({"r": 16, "lora_alpha": 32, "alpha_pattern": {"(": 2}}, "not a readable peft adapter (error"),
    ({"r": 16, "lora_alpha": 32, "use_dora": True}, "with use_dora, which our LoRA does not compute"),
])
def test_an_adapter_with_absurd_ranks_or_options_is_one_line(base, tmp_path, config, needle):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"} | config))
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    before = listing(tmp_path)
    refused(cli("main2.py", *base, "--weights", folder), tmp_path, before, needle)


# item 10: hand-edited checkpoints

def write_checkpoint(source, target, state=None, tensors=None):
    with safe_open(str(source), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    save_file(tensors or load_file(source), str(target), metadata={"state": json.dumps(state(meta) if state else meta)})


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


def wrong_moment(tensors):
    key = next(k for k in tensors if k.endswith(".exp_avg"))
    return tensors | {key: torch.zeros(3)}


@pytest.mark.parametrize("edit,needle", [
    (dict(state=lambda m: without(m, "step")), "'step' is null, not a count"),
    (dict(state=lambda m: m | {"step": "5"}), "'step' is \"5\", not a count"),
    (dict(state=lambda m: m | {"history": [{"epoch": 1}]}), "'history' is not a list of epochs"),
    (dict(state=lambda m: m | {"sums": {"loss": 1}}), "'sums' is not the epoch's running sums"),
    (dict(state=lambda m: m | {"run": [1]}), "'run' is [1], not an object"),
    (dict(tensors=lambda t: wrong_moment(t)), "optimizer moments of"),
    (dict(tensors=lambda t: without(t, "order")), "'order' is not a generator state"),
])
def test_a_hand_edited_checkpoint_is_one_line_before_training(tiny_dir, data_dir, tmp_path, interrupted, monkeypatch,
                                                              edit, needle):
    source = interrupted / "w.ckpt.safetensors"
    tensors = edit["tensors"](load_file(source)) if "tensors" in edit else None
    write_checkpoint(source, tmp_path / "w.ckpt.safetensors", edit.get("state"), tensors)
    no_slow_work(monkeypatch, "training_examples")
    before = listing(tmp_path)
    refused(cli("main2.py", *train_args(tiny_dir, data_dir, tmp_path), "--resume"), tmp_path, before,
            "is damaged or was edited", needle, "remove it to train from the start")


# items 10 and 11: absurd sizes, a temperature too small to compute, --patience 0

@pytest.mark.parametrize("script,flags,needle", [
    ("main2.py", ["--lora-rank", 1000], "--lora-rank 1000 is above the rank of c_attn's weight (32)"),
    ("main.py", ["--prompt-tokens", 10**9], "--prompt-tokens 1000000000 does not fit in the model's context of 256"),
    ("main2.py", ["--max-new-tokens", 10**9], "--max-new-tokens 1000000000 does not fit"),
    ("main2.py", ["--lookup", 10**9], "--lookup 1000000000 does not fit"),
    ("main2.py", ["--seed", 2**64], "--seed must be <= 18446744073709551615"),
])
def test_absurd_sizes_are_refused_before_any_allocation_or_data(base, tmp_path, monkeypatch, script, flags, needle):
    no_slow_work(monkeypatch, "load_splits", "train")
    before = listing(tmp_path)
    refused(cli(script, *base, "--train", "--weights", tmp_path / "w.safetensors", *flags), tmp_path, before, needle)


def test_the_largest_seed_trains(base, tmp_path):
    p = cli("main2.py", *base, "--train", "--weights", tmp_path / "w.safetensors", "--seed", 2**64 - 1, "--lookup", 2,
            "--eval-batch-size", 1)  # two batches: seeds seed and seed + 1, which wraps
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_temperature_too_small_to_compute_is_refused_and_documented(capsys, tiny):
    with pytest.raises(SystemExit) as exit:
        with cli_module.cli_errors():
            parse_args(main2.LoRA, "", ["--temperature", "1e-38"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: temperature must be >= 0.001, got 1e-38") and "--greedy" in err
    with pytest.raises(UsageError, match="temperature must be >= 0.001"):
        generate(tiny[0], [[1, 2]], 4, temperature=1e-38)
    with pytest.raises(SystemExit):
        parse_args(main2.LoRA, "", ["--help"])
    assert "at least 0.001" in " ".join(capsys.readouterr().out.split())


def test_patience_zero_says_what_patience_counts(capsys):
    with pytest.raises(SystemExit):
        with cli_module.cli_errors():
            parse_args(main2.LoRA, "", ["--patience", "0"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --patience must be >= 1, got 0: it is how many epochs without a better "
                          "validation loss stop the training") and "--epochs" in err and "\n" not in err


# item 9: one id per article, and paired statistics over every article

def test_repeated_and_missing_ids_are_numbered_apart(capsys):
    table = [{"id": i, "article": "a", "highlights": "b"} for i in (None, "x", "x", "", "7", "x")]
    rows = draw_rows(table, 6, 0, "test")
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == 6
    assert sorted(i for i in ids if i.startswith("x")) == ["x", "x#2", "x#3"]
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "2 rows whose id repeats" in line and "2 without an id" in line
    again = draw_rows(table, 6, 0, "test")
    assert [r["id"] for r in again] == ids  # the same ids in every run


def test_tables_without_ids_keep_their_place_as_id_silently(capsys):
    rows = draw_rows([{"article": "a", "highlights": "b"}] * 3, 3, 0, "test")
    assert [r["id"] for r in rows] == ["0", "1", "2"] and capsys.readouterr().out == ""


def test_paired_statistics_cover_every_article_even_with_repeated_ids(tmp_path):
    """Four articles, differences 5, -5, 15, 5: the ids (null, null, "a", "a") collapsed them to one article, and
    the report said +5.00 (+5.00 to +5.00), significant."""
    from peftsum.results import Results, paired_difference
    examples = lambda scores: [{"id": i, "reference": "r", "prediction": "p", "rougeLsum": s}
                               for i, s in zip((None, None, "a", "a"), scores)]
    runs = {"lora": {"method": "lora", "examples": examples([25, 15, 35, 25])},
            "zero_shot": {"method": "baseline", "examples": examples([20, 20, 20, 20])}}
    line = Results(runs).difference("lora", "zero_shot")
    mean, lo, hi = paired_difference([5, -5, 15, 5], [0, 0, 0, 0])
    assert line == f"- LoRA − zero-shot TL;DR: +5.00 ({lo:+.2f} to {hi:+.2f}), not significant"
    assert lo < 0 < hi
