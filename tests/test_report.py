"""report.py turns run records into every figure and the README table, from records shaped like ours."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from conftest import ROOT

from peftsum import results
from peftsum.records import load_runs

METHODS = ("prompt_tuning", "last_layer", "lora")


def record(method, lr=1e-3, epochs=3, seed=0, **hparams):
    rng = random.Random(seed)
    history = [dict(epoch=e, step=10 * e, train_loss=3 - 0.2 * e, val_loss=3.1 - 0.1 * e, seconds=12.0 + e,
                    tokens_per_s=1000.0, padding=0.05, peak_memory_mb=900.0 + e) for e in range(1, epochs + 1)]
    examples = [dict(id=str(i), reference="A man was arrested.", prediction="A man was held.",
                     **{k: rng.uniform(10, 40) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}) for i in range(30)]
    test = {k: sum(e[k] for e in examples) / len(examples) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    return dict(method=method, base_model="gpt2", config=dict(temperature=hparams.pop("temperature", 0.9),
                device="cuda:0"), hparams=dict(lr=lr, **hparams), trainable_parameters=1000 * (1 + len(method)),
                history=history, test=test, test_examples=30), examples


def write(folder, name, rec_examples):
    rec, examples = rec_examples
    (folder / f"{name}.json").write_text(json.dumps(rec))
    (folder / f"{name}.predictions.jsonl").write_text("\n".join(json.dumps(e) for e in examples) + "\n")


def synthetic_runs(runs):
    runs.mkdir()
    for m in METHODS:
        write(runs, m, record(m))
        for lr in (1e-4, 1e-3):
            write(runs, f"lr-{m}-{lr:g}", record(m, lr=lr, seed=int(lr * 1e4)))
        for t in (0.5, 0.9):
            write(runs, f"temperature-{m}-{t}", record(m, temperature=t))
        write(runs, f"greedy-{m}", record(m))
    for n in (1, 8):
        write(runs, f"prompt_tokens-{n}", record("prompt_tuning", prompt_tokens=n))
    for r in (4, 16):
        write(runs, f"lora_rank-{r}", record("lora", lora_rank=r))
    for b in ("hard_prompt-24", "zero_shot", "lead_3", "chat"):
        rec, ex = record(b, epochs=0)
        write(runs, b, (rec | {"history": []}, ex))
    write(runs, "chat-lora", record("lora", seed=5))
    write(runs, "separator-lora", record("lora", seed=6))


def test_report_writes_every_figure_and_the_readme_section_then_removes_stale_figures(tmp_path, capsys):
    import report
    from peftsum import figures
    synthetic_runs(tmp_path / "runs")
    (tmp_path / "runs" / "NOTE").write_text("synthetic\nsynthetic records,\nnot a real model")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:runs:start -->\nold\n<!-- results:runs:end -->\nrest\n")
    report.report(tmp_path / "runs", tmp_path / "plots", readme, "runs", "")
    assert set(figures.FIGURES) <= {f.name for f in (tmp_path / "plots").iterdir()}
    assert "skipped" not in capsys.readouterr().out
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- results:runs:end -->\nrest\n")
    assert "**synthetic records, not a real model**" in text  # the set's NOTE labels it
    assert f"from the run records in `{tmp_path / 'runs'}/`" in text  # the folder it read, not runs/
    for label in ("lead-3", "zero-shot TL;DR", "hard prompt", "chat template", "prompt tuning", "last layer", "LoRA",
                  "LoRA, lr 0.001", "LoRA, greedy"):
        assert f"| {label} |" in text or f"| {label} ★ |" in text
    assert "| repeating summaries |" in text and " | 0 / 30 | " in text
    assert "](plots/loss_curves.png)" in text  # figure links relative to the README
    assert "LoRA − chat template:" in text and "<summary>test article 0</summary>" in text
    assert "- LoRA − LoRA, greedy:" in text and "- LoRA − LoRA, lr 0.001:" in text  # each variant against its run
    assert "| LoRA, trained in the chat format |" in text  # and LoRA trained in the chat format, against the chat
    assert "- LoRA, trained in the chat format − chat template:" in text  # prompt and against LoRA
    assert "- LoRA, trained in the chat format − LoRA:" in text
    assert "| LoRA, a learned separator token |" in text and "- LoRA, a learned separator token − LoRA:" in text
    assert "- LoRA − LoRA, rank 4:" in text and "- prompt tuning − prompt tuning, 1 prompt token:" in text
    assert text.index("| LoRA, rank 4 |") < text.index("| LoRA, rank 16 |")  # numbers sorted as numbers

    for f in (tmp_path / "runs").glob("temperature-*"):  # a later report without those runs
        f.unlink()
    report.report(tmp_path / "runs", tmp_path / "plots", readme, "runs", "")
    out = capsys.readouterr().out
    assert "python3 sweep.py temperature" in out  # says which sweep makes the missing figure
    assert "removed" in out and not (tmp_path / "plots" / "rouge_vs_temperature.png").exists()
    assert (tmp_path / "plots" / "loss_curves.png").exists()


def test_a_repeating_summary_is_one_with_a_run_of_eight_words_twice():
    loop = "the police said the man was arrested on Monday . "
    assert results.repeats(loop * 2) and not results.repeats(loop)
    assert not results.repeats("one two three four five six seven eight one two three four five six seven nine")


def test_nothing_to_report_exits_2(tmp_path):
    (tmp_path / "runs").mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), "--runs", tmp_path / "runs", "--readme",
                        tmp_path / "README.md"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: no run records")


@pytest.mark.parametrize("readme,out,says", [
    ("missing.md", "plots", "no such file"), (".", "plots", "a folder"), ("README.md", "runs/lora.json", "is a file"),
    ("nomarkers.md", "plots", "markers")])
def test_a_readme_or_out_that_cannot_take_the_report_is_one_line_before_any_figure(tmp_path, readme, out, says):
    runs = tmp_path / "runs"
    runs.mkdir()
    write(runs, "lora", record("lora"))
    (tmp_path / "README.md").write_text("<!-- results:runs:start -->\n<!-- results:runs:end -->\n")
    (tmp_path / "nomarkers.md").write_text("# no markers\n")
    p = subprocess.run([sys.executable, str(ROOT / "report.py"), "--runs", runs, "--readme", tmp_path / readme,
                        "--out", tmp_path / out], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and says in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "plots").exists()


def test_a_run_whose_predictions_are_broken_is_skipped_with_a_line(tmp_path, capsys):
    """Cut mid-line (as an edit or a copy cut short leaves it) or a folder: skipped; a blank line is no reason."""
    for name in ("lora", "zero_shot", "last_layer", "lead_3"):
        write(tmp_path, name, record(name))
    preds = tmp_path / "lora.predictions.jsonl"
    preds.write_text(preds.read_text()[:50])
    (tmp_path / "last_layer.predictions.jsonl").unlink()
    (tmp_path / "last_layer.predictions.jsonl").mkdir()
    with open(tmp_path / "lead_3.predictions.jsonl", "a") as f:
        f.write("\n")
    assert sorted(load_runs(tmp_path)) == ["lead_3", "zero_shot"]
    assert capsys.readouterr().out.count("skipped") == 2


def test_the_next_token_tables_stand_side_by_side_and_are_not_taken_for_run_records(tmp_path, capsys):
    """The tables `sweep.py next_tokens` writes (--inspect) become one table of the runs' guesses beside the
    reference's next token, their accuracy over the whole summary and what each predicts past the end token; a
    pipe in a token stays inside its cell."""
    import report
    synthetic_runs(tmp_path / "runs")
    rows = [[" A", " man", " man"], [" man", " |", " was"], [" |", "\n", "\n"]]
    for name, guess in (("zero_shot", " was"), ("lora", " |")):
        table = dict(run=name, article_id="a1", end_token="<|endoftext|>", after_end=[["\n", 0.9], [" The", 0.05]],
                     continuation="\nThe | end", rows=[r[:2] + [guess if i == 1 else r[2]] for i, r in enumerate(rows)])
        (tmp_path / "runs" / f"{name}.next_tokens.json").write_text(json.dumps(table))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:runs:start -->\n<!-- results:runs:end -->\n")
    report.report(tmp_path / "runs", tmp_path / "plots", readme, "runs", "")
    assert "skipped" not in capsys.readouterr().out  # the tables are not run records
    text = readme.read_text()
    assert "| context | reference next | zero-shot TL;DR | LoRA |" in text
    assert "| `' man'` | `' \\|'` | `' was'` | **`' \\|'`** |" in text  # LoRA guessed the pipe: bold, escaped
    assert "zero-shot TL;DR 2/3 (67%), LoRA 3/3 (100%)" in text
    assert ("- LoRA: most likely next `'\\n'` 90.0%, `' The'` 5.0%; greedy decoding goes on with `'\\nThe | end'`"
            in text)


def test_each_method_s_configuration_chosen_on_validation_is_starred_and_a_better_one_than_shipped_is_said(tmp_path):
    """Issue 25, item 9: the star goes to each method's run with the lowest validation loss (never by test ROUGE,
    and never to a run that only decodes the same weights again), and the README says when that is not the
    shipped weights' configuration."""
    import report
    runs = tmp_path / "runs"
    runs.mkdir()
    for name, val, seed in (("lora", 2.0, 1), ("lr-lora-0.003", 1.9, 2), ("greedy-lora", 1.0, 3),
                            ("prompt_tuning", 2.5, 4), ("lr-prompt_tuning-0.003", 2.6, 5)):
        rec, ex = record("lora" if "lora" in name else "prompt_tuning", lr=3e-3 if "lr-" in name else 1e-3, seed=seed)
        rec["history"] = [dict(rec["history"][0], val_loss=val)]
        write(runs, name, (rec, ex))
    readme, shipped = tmp_path / "README.md", tmp_path / "models"
    readme.write_text("<!-- results:runs:start -->\n<!-- results:runs:end -->\n")
    report.report(runs, tmp_path / "plots", readme, "runs", "", shipped)
    text = readme.read_text()
    assert "| LoRA, lr 0.003 ★ |" in text and "| LoRA |" in text and "| LoRA, greedy |" in text
    assert "| prompt tuning ★ |" in text and "| prompt tuning, lr 0.003 |" in text
    assert "The weights in `models/`" not in text  # none of these runs is shipped there

    shipped.mkdir()  # weights files, as trained, whose records are these runs'
    for method, name in (("prompt_tuning", "prompt_tuning"), ("lora", "lora"), ("last_layer", "lr-lora-0.003")):
        rec = json.loads((runs / f"{name}.json").read_text())
        if method == "last_layer":  # another run's record, under this method's name: not shipped from here
            rec["history"][0]["val_loss"] += 1
        save_file({"w": np.zeros(1, np.float32)}, str(shipped / f"{method}.safetensors"),
                  metadata={"record": json.dumps(rec)})
    report.report(runs, tmp_path / "plots", readme, "runs", "", shipped)
    assert "The weights in `models/`, which the scripts read with no flags, are these rows: prompt tuning ★; LoRA " \
           "(not LoRA's ★)." in readme.read_text()


def test_a_decoding_variant_is_labelled_and_compared_by_the_run_whose_weights_it_decoded(tmp_path):
    """Shipped weights need not be a method's run at its defaults (issue 25: LoRA's ★ has a learned separator
    token, prompt tuning's another rate): a greedy or temperature run names the trained run it decoded (the one
    whose epochs' validation losses its record carries) and is compared with that run, not the default one."""
    import report
    from peftsum.records import label
    runs = tmp_path / "runs"
    runs.mkdir()
    for name, seed in (("lora", 1), ("separator-lora", 2), ("prompt_tuning", 3)):
        rec, ex = record("lora" if "lora" in name else "prompt_tuning", seed=seed)
        rec["history"] = [dict(h, val_loss=h["val_loss"] - seed / 100) for h in rec["history"]]
        write(runs, name, (rec, ex))
    shipped = json.loads((runs / "separator-lora.json").read_text())
    write(runs, "greedy-lora", (shipped, record("lora", seed=4)[1]))
    write(runs, "temperature-lora-0.5", (dict(shipped, config=dict(shipped["config"], temperature=0.5)),
                                         record("lora", seed=5)[1]))
    write(runs, "greedy-prompt_tuning", (json.loads((runs / "prompt_tuning.json").read_text()),
                                         record("prompt_tuning", seed=6)[1]))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:runs:start -->\n<!-- results:runs:end -->\n")
    report.report(runs, tmp_path / "plots", readme, "runs", "", tmp_path / "models")
    text = readme.read_text()
    assert "| LoRA, a learned separator token, greedy |" in text and "| prompt tuning, greedy |" in text
    assert "- LoRA, a learned separator token − LoRA, a learned separator token, greedy:" in text
    assert "- LoRA − LoRA, a learned separator token, greedy" not in text
    assert "- prompt tuning − prompt tuning, greedy:" in text
    loaded = load_runs(runs)
    assert label("temperature-lora-0.5", loaded["temperature-lora-0.5"], loaded) == \
        "LoRA, a learned separator token, temperature 0.5"
    assert label("temperature-lora-0.5", loaded["temperature-lora-0.5"]) == "LoRA, temperature 0.5"  # no runs: method

def test_the_temperature_is_chosen_on_validation_records_and_compared_on_test_at_each_choice(tmp_path, capsys):
    """Records scored on the validation articles (<run>.validation.json, --eval-split validation) are never read as
    test results; they choose each method's and the chat template's temperature (highest validation ROUGE-Lsum),
    and the test set then compares each method with the chat template at the temperatures chosen."""
    import report
    runs = tmp_path / "runs"
    synthetic_runs(runs)
    for name, t, val in (("lora", 0.5, 30.0), ("lora", 0.9, 25.0), ("chat", 0.5, 20.0), ("chat", 0.9, 22.0)):
        rec, ex = record(name if name == "lora" else "baseline", temperature=t, seed=int(val))
        rec["validation"], rec["test"] = {"rougeLsum": val}, None
        (runs / f"temperature-{name}-{t}.validation.json").write_text(json.dumps(rec))
        (runs / f"temperature-{name}-{t}.validation.predictions.jsonl").write_text(
            "\n".join(json.dumps(e) for e in ex) + "\n")
    write(runs, "temperature-chat-0.9", record("baseline", temperature=0.9, seed=9))  # the chat template's on test
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:runs:start -->\n<!-- results:runs:end -->\n")
    report.report(runs, tmp_path / "plots", readme, "runs", "")
    assert "skipped" not in capsys.readouterr().out
    assert set(load_runs(runs, "validation")) == {f"temperature-{n}" for n in
                                                          ("lora-0.5", "lora-0.9", "chat-0.5", "chat-0.9")}
    assert not any(n.endswith(".validation") for n in load_runs(runs))
    text = readme.read_text()
    assert "temperature --eval-split validation`): LoRA 0.5 (30.00), chat template 0.9 (22.00)." in text
    assert "- LoRA, temperature 0.5 − chat template, temperature 0.9: " in text  # each at its chosen temperature
    assert "- LoRA, temperature 0.5 − chat template: " in text  # and against the chat template at the default
    assert (tmp_path / "plots" / "rouge_vs_temperature.png").exists()


def test_records_that_name_their_machine_are_said_under_the_note():
    """--dtype auto is bf16 autocast on a CPU with bf16 units and fp32 elsewhere: a row made on other hardware than
    the note names says where it ran, from its record (records made before they kept it say nothing)."""
    runs = {"lora": record("lora")[0], "prompt_tuning": record("prompt_tuning", seed=1)[0],
            "greedy-lora": record("lora", seed=2)[0]}
    assert results.Results(runs, "note").machines_line() == ""
    runs["prompt_tuning"]["machine"] = {"hardware": "AMD EPYC, 2 threads, native bf16: no", "precision": "fp32"}
    assert results.Results(runs, "a note").machines_line() == (
        'Records that name their machine: the rows "prompt tuning" ran in fp32 on AMD EPYC, 2 threads, native bf16: no; '
        "the other 2, as the note above says.")
