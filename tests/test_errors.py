"""Bad input gets one line saying what is wrong and what to do, exit code 2, no traceback, and nothing written.
In-process (conftest.cli): the entry scripts' own code path, without starting Python each time."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftsum import runtime, interop, evaluation
from peftsum.config import parse_args
from peftsum.methods import apply_lora, trainable_state
from peftsum.interop import from_hf
from peftsum.cli import cli_errors
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


def files(root):
    """Every file and folder under root with its size and modification time: what a failed run must not change."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def rows(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def adapter(tmp, config, tensors=None):
    folder = tmp / "adapter"
    write(folder / "adapter_config.json", config)
    if isinstance(tensors, bytes):
        write(folder / "adapter_model.safetensors", tensors)
    else:
        save_file(tensors or {"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    return ["--weights", folder]


def weights_with(tmp, source, tensors=None, metadata=None):
    """A copy of LoRA weights with other tensors or metadata."""
    from safetensors import safe_open
    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
    w = tmp / "w.safetensors"
    save_file(tensors or load_file(source), str(w), metadata=meta if metadata is None else metadata)
    return ["--weights", w]


def nan_weights(tmp, source):
    tensors = load_file(source)
    next(iter(tensors.values()))[0, 0] = float("nan")
    return weights_with(tmp, source, tensors=tensors)


LINE = {"id": "1", "article": "The team won the final match.", "highlights": "The team won."}
CASES = [  # (id, prepare(tmp folder, Context) -> flags, what the error line must say)
    # issue 12, item 6: inputs that ended in tracebacks
    ("checkpoint-empty", lambda t, c: [*c.train, "--resume", *write_ckpt(t, b"")], "not a readable safetensors"),
    ("checkpoint-truncated", lambda t, c: [*c.train, "--resume", *write_ckpt(t, c.checkpoint.read_bytes()[:-100])],
     "not a readable safetensors"),
    ("checkpoint-foreign", lambda t, c: [*c.train, "--resume", *write_ckpt(t, safetensors_bytes({}))],
     "training state in"),
    ("checkpoint-old-format", lambda t, c: [*c.train, "--resume", *write_ckpt(t, safetensors_bytes(
        {"state": json.dumps({"step": 1, "epoch": 0, "k": 1})}))], "not written by this version"),
    ("adapter-bad-json", lambda t, c: adapter(t, "{not json"), "not a readable peft adapter"),
    ("adapter-without-r", lambda t, c: adapter(t, json.dumps({"peft_type": "LORA", "lora_alpha": 8})),
     "not a readable peft adapter (KeyError"),
    ("adapter-config-a-list", lambda t, c: adapter(t, "[1, 2]"), "not a readable peft adapter"),
    ("adapter-corrupt-tensors", lambda t, c: adapter(t, json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}),
                                                     b"\x00" * 64), "not a readable peft adapter"),
    ("csv-not-utf8", lambda t, c: data(t, "test.csv", b"id,article,highlights\n1,caf\xe9 news,x\n"), "not UTF-8"),
    ("jsonl-not-utf8", lambda t, c: data(t, "test.jsonl", b'{"article": "caf\xe9", "highlights": "x"}\n'),
     "not UTF-8"),
    ("jsonl-malformed", lambda t, c: data(t, "test.jsonl", rows(LINE) + '{"article": \n'), "line 2 is not JSON"),
    ("jsonl-not-objects", lambda t, c: data(t, "test.jsonl", "[1, 2]\n"), "line 1 is a JSON list"),
    ("jsonl-empty", lambda t, c: data(t, "test.jsonl", ""), "holds no rows"),
    ("csv-empty", lambda t, c: data(t, "test.csv", ""), "holds no rows"),
    ("csv-header-only", lambda t, c: data(t, "test.csv", "id,article,highlights\n"), "holds no rows"),
    ("json-a-string", lambda t, c: data(t, "test.json", '"news"'), "holds one JSON str"),
    ("column-of-numbers", lambda t, c: data(t, "test.jsonl", rows(LINE | {"article": 5})),
     "has a int in column 'article'"),
    ("column-of-lists", lambda t, c: data(t, "test.jsonl", rows(LINE | {"highlights": ["a", "b"]})),
     "has a list in column 'highlights'"),
    ("all-summaries-empty", lambda t, c: data(t, "test.jsonl", rows(LINE | {"highlights": " "}, LINE | {"id": 2,
                                                                    "highlights": ""})), "no row with both"),
    ("no-test-split", lambda t, c: data(t, "train.jsonl", rows(LINE)), "has no test.csv/.jsonl"),
    ("data-folder-missing", lambda t, c: ["--data", t / "nonexistent"], "the folder does not exist"),
    ("data-is-a-file", lambda t, c: ["--data", write(t / "test.jsonl", rows(LINE))], "not the file"),
    ("lr-nan", lambda t, c: ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("weight-decay-negative", lambda t, c: ["--weight-decay", "-1"], "--weight-decay must be"),
    ("test-size-0", lambda t, c: ["--test-size", "0"], "--test-size must be >= 1"),
    ("data-seed-negative", lambda t, c: ["--data-seed", "-1"], "--data-seed must be >= 0"),
    pytest.param("device-cuda-absent", lambda t, c: ["--device", "cuda"], "finds no CUDA GPU", id="device-cuda-absent",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ("device-unknown", lambda t, c: ["--device", "foo"], "unknown --device 'foo'"),
    ("device-unsupported", lambda t, c: ["--device", "meta"], "unknown --device 'meta'"),
    ("export-onto-existing", lambda t, c: [*c.weights, "--export-peft", (t / "exists").mkdir() or t / "exists"],
     "exists: an export never overwrites"),
    ("model-folder-missing", lambda t, c: ["--model", t / "no-model"], "no model folder at"),
    ("run-name-outside-out", lambda t, c: ["--run-name", "../../x"], "--run-name must be a plain file name"),
    ("article-missing", lambda t, c: ["--article", t / "none.txt"], "cannot read the article"),
    ("article-not-utf8", lambda t, c: ["--article", write(t / "a.txt", b"caf\xe9")], "cannot read the article"),
    # item 5: results that would be garbage but look real
    ("weights-nan", lambda t, c: nan_weights(t, c.lora), "hold NaN or infinite values"),
    ("record-not-an-object", lambda t, c: weights_with(t, c.lora, metadata={"record": "[1, 2]"}),
     "is missing or not a JSON object"),
    ("lr-inf", lambda t, c: [*c.train, "--lr", "inf"], "--lr must be a finite number > 0"),
    ("epochs-0", lambda t, c: [*c.train, "--epochs", "0"], "--epochs must be >= 1 with --train"),
    ("train-size-0", lambda t, c: [*c.train, "--train-size", "0"], "--train-size must be >= 1"),
    # item 7: flags that contradict
    ("baseline-and-train", lambda t, c: ["--baseline", *c.train], "--baseline evaluates the untrained model"),
    ("resume-without-train", lambda t, c: ["--baseline", "--resume"], "--resume continues a training: add --train"),
    ("inspect-and-article", lambda t, c: ["--baseline", "--inspect", "--article", write(t / "a.txt", "News.")],
     "--inspect and --article ask for different runs"),
    ("train-and-export", lambda t, c: [*c.train, "--export-peft", t / "adapter"], "ask for different runs"),
    ("baseline-and-export", lambda t, c: ["--baseline", "--export-merged", t / "m"], "cannot be combined with"),
    # item 1: a checkpoint is never discarded, and --resume never starts from scratch
    ("checkpoint-without-resume", lambda t, c: [*c.train, *write_ckpt(t, c.checkpoint.read_bytes())],
     "holds an unfinished training: continue it with --resume"),
    ("resume-without-checkpoint", lambda t, c: [*c.train, "--resume"], "no checkpoint at"),
]


def data(tmp, name, content):
    write(tmp / "d" / name, content)
    return ["--data", tmp / "d"]


def safetensors_bytes(metadata):
    from safetensors.torch import save
    return save({"x": torch.zeros(2)}, metadata=metadata)


def write_ckpt(tmp, content):
    write(tmp / "w.ckpt.safetensors", content)
    return ["--weights", tmp / "w.safetensors"]


class Context:
    def __init__(self, tmp, lora, checkpoint):
        self.lora, self.checkpoint = lora, checkpoint
        self.weights = ["--weights", lora]
        self.train = ["--train", "--weights", tmp / "w.safetensors"]


@pytest.mark.parametrize("case,prepare,needle", [c if hasattr(c, "values") else pytest.param(*c, id=c[0])
                                                 for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, prepare, needle, base, tmp_path, lora_weights, interrupted):
    """Issue 12, items 1, 5, 6 and 7: each bad input or contradiction ends in one line, exit code 2, and changes no
    file (no weights, checkpoint, record or predictions written; the inputs untouched)."""
    flags = prepare(tmp_path, Context(tmp_path, lora_weights, interrupted / "w.ckpt.safetensors"))
    flags = flags if "--train" in flags or "--weights" in flags else ["--baseline", *flags]
    before = files(tmp_path)
    assert_usage_error(cli("main2.py", *base, *flags), needle)
    assert files(tmp_path) == before


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


def test_weights_of_another_base_model(base, tmp_path):
    """LoRA weights of a wider model (as gpt2-medium's would be for gpt2) are refused with the reason."""
    from transformers import GPT2Config, GPT2LMHeadModel
    wide = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=256, n_layer=2, n_head=2, n_embd=48))
    model = apply_lora(from_hf(wide), 16, 32)
    record = {"method": "lora", "base_model": "wide-gpt2"}
    w = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(w),
              metadata={"record": json.dumps(record)})
    assert_usage_error(cli("main2.py", *base, "--weights", w), "does not fit this model", "wide-gpt2")


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
    ("main2", ["--temperature", "0"], "temperature must be >= 0.001"),
    ("main2", ["--temperature", "-1"], "temperature must be >= 0.001"),
    ("main2", ["--temperature", "nan"], "temperature must be >= 0.001"),
    ("main2", ["--temperature", "inf"], "temperature must be finite"),
    ("main2", ["--run-name", "mine.validation"], "report.py would take its record for one of those"),
    ("main2", ["--train-size", "-5"], "--train-size must be >= 0"),
    ("main2", ["--max-steps", "-1"], "--max-steps must be >= 0"),
    ("main2", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("main", ["--prompt-tokens", "0"], "--prompt-tokens must be > 0"),
    ("main2", ["--lora-rank", "0"], "--lora-rank must be > 0"),
    ("main2", ["--lora-alpha", "inf"], "--lora-alpha must be a finite number > 0"),
    ("main2", ["--dtype", "fp8"], "--dtype must be one of"),
])
def test_flags_out_of_range(capsys, script, flags, needle):
    """Parsing alone (the entry scripts parse with the same function inside the same cli_errors)."""
    import importlib
    hparams = {"main": "PromptTuning", "main2": "LoRA"}[script]
    cls = getattr(importlib.import_module(script), hparams)
    with pytest.raises(SystemExit) as exit:
        with cli_errors():
            parse_args(cls, "", flags)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def record_with(source, tmp, **config):
    """A copy of LoRA weights whose record's config has these values (None: the key removed, as in a record
    written before the setting existed)."""
    from safetensors import safe_open
    with safe_open(str(source), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
    record["config"] = {k: v for k, v in (record["config"] | config).items() if v is not None}
    return weights_with(tmp, source, metadata={"record": json.dumps(record)})


EARLY = [  # (id, script, prepare(tmp folder, LoRA weights, interrupted folder) -> flags, what the line must say)
    ("another-method", "main.py", lambda t, w, i: ["--weights", w], "holds weights of method 'lora', not "
     "'prompt_tuning': evaluate them with python3 main2.py"),
    ("another-method-with-a-shape-flag", "main.py", lambda t, w, i: ["--weights", w, "--prompt-tokens", "8"],
     "holds weights of method 'lora', not 'prompt_tuning'"),
    ("article-empty", "main2.py", lambda t, w, i: ["--baseline", "--article", write(t / "a.txt", " \n")], "is empty"),
    ("article-a-folder", "main2.py", lambda t, w, i: ["--baseline", "--article", t], "Is a directory"),
    ("shape-flag-missing-from-record", "main2.py",
     lambda t, w, i: [*record_with(w, t, learned_separator=None), "--learned-separator"],
     "--learned-separator True, but w.safetensors was trained with False"),
    ("learned-separator-from-nothing", "main2.py",
     lambda t, w, i: [*record_with(w, t, learned_separator=True), "--separator", ""], "--separator is empty"),
    ("chat-against-a-learned-separator", "main2.py", lambda t, w, i: [*record_with(w, t, learned_separator=True),
     "--chat"], "--learned-separator (given, or recorded in --weights) is a trained token"),
    ("chat-baseline-with-hard-prompt", "main2.py",
     lambda t, w, i: ["--baseline", "--chat", "--baseline-prompt-tokens", "3"], "the chat baseline has neither"),
    ("weights-unfinished", "main2.py", lambda t, w, i: ["--weights", i / "w.safetensors"],
     "their training is unfinished (its checkpoint is w.ckpt.safetensors); continue it with --train --resume"),
]


@pytest.mark.parametrize("case,script,prepare,needle", [pytest.param(*c, id=c[0]) for c in EARLY])
def test_mistakes_are_said_before_the_model_loads(case, script, prepare, needle, base, tmp_path, lora_weights,
                                                  interrupted, monkeypatch):
    """What the flags, the weights' record and the files say is checked before the base model loads (seconds,
    where loading SmolLM2 takes ~35 s): here loading fails the test."""
    monkeypatch.setattr(interop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the error"))
    assert_usage_error(cli(script, *base, *prepare(tmp_path, lora_weights, interrupted)), needle)


def test_a_folder_that_is_no_adapter_is_said_before_the_data_and_model_are_looked_for(tmp_path):
    """Without --model and --data (the recorded ones are looked for, else gpt2 and the hub's CNN/DM): the line
    names the folder, not an offline dataset or model."""
    (tmp_path / "folder").mkdir()
    assert_usage_error(cli("main2.py", "--weights", tmp_path / "folder"), "not a peft adapter")


def test_nan_loss_stops_and_names_the_step(base, tmp_path):
    p = cli("main2.py", *base, "--train", "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "6", "--weights",
            tmp_path / "w.safetensors")
    assert_usage_error(p, "NaN or infinite at step", "--lr")
    assert not (tmp_path / "w.safetensors").exists()


def test_unknown_model_while_offline(base, monkeypatch):
    monkeypatch.setattr(runtime, "hub_reachable", lambda: False)
    args = [a if a != base[1] else "no-such-user/no-such-gpt2" for a in base]
    assert_usage_error(cli("main2.py", *args, "--baseline"), "cannot download 'no-such-user/no-such-gpt2'",
                       "not reachable", "--model")


def test_an_offline_hub_dataset_fails_before_the_model_loads(base, monkeypatch):
    """The check costs a TCP connection, not the model's load (20 s for a GGUF) and then a minute of retries."""
    monkeypatch.setattr(runtime, "hub_reachable", lambda: False)
    monkeypatch.setattr(interop, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = [a if a != base[3] else "no-such-user/no-such-data" for a in base]
    assert_usage_error(cli("main2.py", *args, "--baseline"), "cannot download the dataset 'no-such-user/no-such-data'",
                       "--data")


def test_a_full_disk_under_out_fails_before_the_evaluation(base, monkeypatch, tmp_path):
    import shutil
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    monkeypatch.setattr(evaluation, "summarize", lambda *a, **k: pytest.fail("summarized onto a full disk"))
    assert_usage_error(cli("main2.py", *base, "--baseline"), "MiB free", "the run record and predictions", "--out")
    assert not list((tmp_path / "runs").glob("*.json"))


def test_sigterm_outside_training_stops_in_one_line(base, monkeypatch):
    """What a scheduler sends during an evaluation: one line and 143, not a silent death (issue 12, item 2)."""
    import os
    import signal

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the program")
    monkeypatch.setattr(evaluation, "summarize", killed)
    p = cli("main2.py", *base, "--baseline")
    assert p.returncode == 143 and p.stderr.strip().splitlines()[-1] == "interrupted by SIGTERM", p.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler ends with the program


def test_out_of_memory_suggests_smaller_batches(capsys):
    with pytest.raises(SystemExit) as exit:
        with cli_errors():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and "--grad-accum" in err


def test_article_from_stdin(base):
    long = "The police said a man was arrested. " * 400
    p = cli("main2.py", *base, "--baseline", "--article", "-", stdin=long)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "summary:" in p.stdout and "1 of 1 articles cut to fit" in p.stdout


def test_weights_folder_that_is_not_an_adapter(base, tmp_path):
    (tmp_path / "folder").mkdir()
    assert_usage_error(cli("main2.py", *base, "--weights", tmp_path / "folder"), "not a peft adapter")


def test_safetensors_without_our_record(base, tmp_path):
    w = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(w))
    assert_usage_error(cli("main2.py", *base, "--weights", w), "not written by these scripts")


def test_export_needs_no_dataset(base, tmp_path, lora_weights):
    """Issue 12, item 7: an export reads the weights and the base model only: no dataset (online, --export-peft
    would have downloaded CNN/DM), so a --data that does not even exist is fine."""
    args = [a if a != base[3] else "no-such-user/no-such-dataset" for a in base]
    p = cli("main2.py", *args, "--weights", lora_weights, "--export-peft", tmp_path / "adapter")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # and no temporary folder is left


def test_a_test_split_alone_is_enough_to_evaluate(base, tmp_path, data_dir, lora_weights):
    """Each mode reads only the splits it needs: evaluating, inspecting or a baseline need test.jsonl only."""
    shutil.copy(data_dir / "test.jsonl", tmp_path / "test.jsonl")
    args = [a if a != base[3] else tmp_path for a in base]
    for flags in (["--weights", lora_weights], ["--baseline"], ["--baseline", "--inspect"]):
        p = cli("main2.py", *args, *flags)
        assert p.returncode == 0, p.stderr[-2000:]
    assert_usage_error(cli("main2.py", *args, "--train", "--weights", tmp_path / "w.safetensors"),
                       "has no train.csv")
