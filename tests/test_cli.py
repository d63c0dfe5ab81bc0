"""Each entry script end to end, as a user runs it: train a few steps → weights saved → rerun loads them and
prints ROUGE; what a person sees while it runs. In-process (conftest.cli), the tiny checkpoint and tiny data;
nothing is written inside the repository."""
import json

import pytest
import torch

from peftsum import runtime
from peftsum.evaluation import ROUGE_KEYS
from conftest import cli

SCRIPTS = {"main.py": "prompt_tuning", "main1.py": "last_layer", "main2.py": "lora"}


def run(script, *args, check=True, stdin=""):
    p = cli(script, *args, stdin=stdin)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def common_args(tiny_dir, data_dir, tmp_path):
    return ["--model", tiny_dir, "--data", data_dir, "--out", tmp_path / "runs", "--max-new-tokens", 12,
            "--max-summary-tokens", 32, "--batch-size", 4, "--eval-batch-size", 4, "--warmup-steps", 2]


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_save_reload_evaluate(script, common_args, tmp_path):
    method = SCRIPTS[script]
    weights = tmp_path / "w.safetensors"
    trained = run(script, *common_args, "--weights", weights, "--train", "--max-steps", 3)
    assert "trainable parameters: " in trained.stdout
    assert weights.is_file()
    record = json.loads((tmp_path / "runs" / f"{method}.json").read_text())
    assert record["method"] == method and record["history"][0]["step"] == 3
    assert set(record["test"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    preds = [json.loads(line) for line in open(tmp_path / "runs" / f"{method}.predictions.jsonl")]
    assert len(preds) == 6 and set(preds[0]) == {"id", "reference", "prediction", *ROUGE_KEYS}

    loaded = run(script, *common_args, "--weights", weights)
    assert f"loaded {weights}" in loaded.stdout
    assert "rougeLsum" in loaded.stdout
    # same weights, same seed: the same summaries as right after training, in a record beside the first (kept)
    assert f"{method}.json exists: --overwrite replaces it" in loaded.stdout
    assert json.loads((tmp_path / "runs" / f"{method}-2.json").read_text())["test"] == record["test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "w.safetensors"]  # no checkpoint, lock or temp left


def test_baseline_runs_without_weights(common_args, tmp_path):
    p = run("main2.py", *common_args, "--baseline")
    assert "rougeLsum" in p.stdout
    record = json.loads((tmp_path / "runs" / "hard_prompt-24.json").read_text())  # named by its prompt
    # --dtype auto: bf16 autocast on a CPU with bf16 units, fp32 elsewhere; the record says which this run was
    assert record["machine"]["precision"] in ("fp32", "bf16 autocast") and record["config"]["dtype"] == "auto"
    assert "native bf16:" in record["machine"]["hardware"]
    fixed = run("main2.py", *common_args, "--baseline", "--dtype", "fp32", "--run-name", "fp32")
    assert json.loads((tmp_path / "runs" / "fp32.json").read_text())["machine"]["precision"] == "fp32", fixed.stdout


def test_weights_scored_in_other_arithmetic_say_so(common_args, tmp_path):
    """Sampling turns the last bits of a logit into other words: weights whose record was made in fp32, scored in
    bf16 autocast (or the reverse, --dtype auto on another CPU), print other ROUGE, and the run says why."""
    weights = tmp_path / "w.safetensors"
    run("main2.py", *common_args, "--weights", weights, "--train", "--max-steps", 1, "--dtype", "fp32")
    same = run("main2.py", *common_args, "--weights", weights, "--dtype", "fp32", "--run-name", "same")
    assert "note:" not in same.stderr
    other = run("main2.py", *common_args, "--weights", weights, "--dtype", "bf16", "--run-name", "other")
    assert ("note: w.safetensors was trained and scored in fp32, this run is bf16 autocast (--dtype bf16): its "
            "summaries and ROUGE will differ a little from its record's\n") in other.stderr, other.stderr
    if runtime.cpu_has_native_bf16():  # --dtype auto is bf16 here: the way back to the record's numbers is said
        auto = run("main2.py", *common_args, "--weights", weights, "--run-name", "auto")
        assert "ROUGE will differ a little from its record's; --dtype fp32 computes as it did" in auto.stderr


def test_missing_weights_exit_2_with_one_line(common_args, tmp_path):
    p = run("main.py", *common_args, "--weights", tmp_path / "nope.safetensors", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "no weights at" in p.stderr and "--train" in p.stderr and "--baseline" in p.stderr


def test_weights_of_another_method_are_refused(common_args, lora_weights):
    p = run("main.py", *common_args, "--weights", lora_weights, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'lora', not 'prompt_tuning'" in p.stderr


def test_inspect_prints_and_writes_the_next_token_table_and_what_follows_the_end(common_args, tmp_path):
    """The assignment's next-word table (context, reference next, argmax) and what the model predicts past the
    summary's end token, printed and kept beside the run records; a second table gets its own file."""
    p = run("main2.py", *common_args, "--baseline", "--inspect", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "reference next" in p.stdout and "model argmax" in p.stdout
    assert "top-1 next-token accuracy on this summary:" in p.stdout
    assert "after the summary's end token" in p.stdout and "greedy decoding past the end token: " in p.stdout
    assert "rougeLsum" not in p.stdout  # inspects, then exits
    table = json.loads((tmp_path / "hard_prompt-24.next_tokens.json").read_text())
    assert table["run"] == "hard_prompt-24" and table["method"] == "baseline" and table["weights"] is None
    assert table["rows"] and all(len(r) == 3 for r in table["rows"]) and len(table["after_end"]) == 5
    assert f"{sum(a == r for _, r, a in table['rows'])}/{len(table['rows'])}" in p.stdout
    again = run("main2.py", *common_args, "--baseline", "--inspect", "--out", tmp_path)
    assert again.returncode == 0 and json.loads((tmp_path / "hard_prompt-24-2.next_tokens.json").read_text()) == table


def test_a_short_run_shows_loss_lr_and_speed_from_its_first_step(common_args, tmp_path):
    """Issue 13: the bar shows loss, learning rate and tokens/s from the first step, its total is the whole run
    (--max-steps here), summarization counts articles, and the run starts with a short summary, not a JSON line."""
    p = run("main2.py", *common_args, "--weights", tmp_path / "w.safetensors", "--train", "--max-steps", 3,
            "--warmup-steps", 100)
    bar = [line for line in p.stdout.replace("\r", "\n").splitlines() if line.startswith("epoch 1/10")]
    assert any("/3 [" in line and "loss=" in line and "lr=" in line and "tok_s=" in line for line in bar), bar
    assert any("6/6" in line and "article" in line for line in p.stdout.replace("\r", "\n").splitlines())
    summary = p.stdout.split("\n", 5)[:5]
    assert summary[0].startswith("training lora on ") and "trainable parameters: " in summary[0]
    assert summary[1].startswith("data: ") and "24 train, 6 validation, 6 test" in summary[1]
    assert summary[2].startswith("device: cpu")
    assert "up to 3 steps" in summary[3] and "warmup 0 steps (shortened from 100" in summary[3]
    assert "config:" not in p.stdout and '{"model"' not in p.stdout  # the full config is in the record only
    assert json.loads((tmp_path / "runs" / "lora.json").read_text())["config"]["warmup_steps"] == 100


def test_the_bar_covers_every_epoch(common_args, tmp_path):
    p = run("main2.py", *common_args, "--weights", tmp_path / "w.safetensors", "--train", "--epochs", 2,
            "--patience", 2, "--max-new-tokens", 2)
    lines = p.stdout.replace("\r", "\n").splitlines()
    assert any(line.startswith("epoch 2/2") and "12/12 [" in line for line in lines)  # 2 epochs x 6 steps
    assert sum(line.startswith("epoch ") and "train loss" in line for line in lines) == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_learned_separator_trains_with_each_method_and_evaluation_follows_it(script, common_args, tmp_path):
    """Issue 25, item 4: --learned-separator puts one new token between article and summary, its embedding
    trained with the method, saved with the weights and used again by an evaluation given no flag; the text
    separator's tokens are gone from the examples."""
    from peftsum.data import encode_examples
    from safetensors.torch import load_file
    weights = tmp_path / "w.safetensors"
    trained = run(script, *common_args, "--weights", weights, "--train", "--max-steps", 3, "--learned-separator")
    assert "a learned separator token (from ' TL;DR:')" in trained.stdout
    tensors = load_file(weights)
    (name, row), = [(k, v) for k, v in tensors.items() if k.startswith("wte.")]
    assert name == "wte.prompt" and row.shape[0] == (25 if script == "main.py" else 1)  # after a soft prompt's 24
    record = json.loads((tmp_path / "runs" / f"{SCRIPTS[script]}.json").read_text())
    assert record["config"]["learned_separator"] is True

    loaded = run(script, *common_args, "--weights", weights, "--run-name", "again", "--inspect")
    assert "a learned separator token" in loaded.stdout and "'<learned separator>'" in loaded.stdout
    if script == "main2.py":  # a baseline beside such weights (the shipped LoRA) trains no token: the text it began as
        baseline = run(script, *common_args, "--weights", weights, "--baseline", "--max-new-tokens", 2)
        assert "separator ' TL;DR:'" in baseline.stdout, baseline.stdout
    import common
    model, tok = common.load_model(str(common_args[1]))
    {"main.py": lambda: common.apply_prompt_tuning(model, common.hard_prompt_ids(tok, 24)),
     "main1.py": lambda: common.apply_last_layer(model),
     "main2.py": lambda: common.apply_lora(model, 16, 32.0)}[script]()
    common.apply_learned_separator(model, tok, " TL;DR:")
    sep = tok.encode(" TL;DR:", add_special_tokens=False)
    assert torch.equal(model.wte.prompt[-1], model.wte.wte.weight[sep].mean(0))  # where it starts
    assert not torch.equal(row[-1], model.wte.prompt[-1].detach())  # and it trained
    cfg = common.Config(max_summary_tokens=32)
    (ids, n_context), = encode_examples([{"article": "A b c.", "highlights": "D e."}], tok, model.prompt_ids, cfg,
                                        256, model.separator_ids)
    assert ids[n_context - 1] == model.separator_ids[0] >= model.config.vocab_size


@pytest.mark.parametrize("flags,says", [(["--chat"], "not with --chat"), (["--baseline"], "not with --baseline"),
                                        (["--export-gguf", "x.gguf"], "GGUF files have no place for")])
def test_a_learned_separator_is_refused_where_it_has_no_place(common_args, flags, says):
    p = run("main2.py", *common_args, "--learned-separator", *flags, check=False)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_full_fine_tuning_trains_every_parameter_and_its_weights_are_evaluated_as_full(common_args, tmp_path):
    """Issue 25, item 7: main1.py --full trains every parameter (method 'full', its own record name); an evaluation
    of those weights without the flag follows their record; head-only weights with --full are refused."""
    from safetensors.torch import load_file
    weights = tmp_path / "full.safetensors"
    trained = run("main1.py", *common_args, "--weights", weights, "--train", "--max-steps", 2, "--full")
    assert "training full on " in trained.stdout
    import common
    model, _ = common.load_model(str(common_args[1]))
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable parameters: {total:,} of {total:,}" in trained.stdout
    tensors = load_file(weights)
    assert sum(t.numel() for t in tensors.values()) == total and "wte.weight" in tensors  # the tie kept: one matrix
    assert json.loads((tmp_path / "runs" / "full.json").read_text())["method"] == "full"
    loaded = run("main1.py", *common_args, "--weights", weights, "--run-name", "again")
    assert "evaluating full on " in loaded.stdout and "rougeLsum" in loaded.stdout
    head = tmp_path / "head.safetensors"
    run("main1.py", *common_args, "--weights", head, "--train", "--max-steps", 1)
    p = run("main1.py", *common_args, "--weights", head, "--full", check=False)
    assert p.returncode == 2 and "--full True, but head.safetensors was trained with False" in p.stderr, p.stderr


def test_a_sweep_skips_what_is_done_unless_told_to_run_it_again(data_dir, tmp_path):
    """sweep.py runs a run whose record is missing, skips it once its record is there, and runs it again with
    --overwrite (lead-3: no model, so the run is quick)."""
    args = ["methods", "--only", "lead_3", "--data", data_dir, "--out", tmp_path]
    first = run("sweep.py", *args)
    assert "=== lead_3\n" in first.stdout and (tmp_path / "lead_3.json").is_file()
    record = (tmp_path / "lead_3.json").read_text()
    again = run("sweep.py", *args)
    assert "=== lead_3: skipped" in again.stdout and (tmp_path / "lead_3.json").read_text() == record
    assert not (tmp_path / "lead_3-2.json").exists()
    forced = run("sweep.py", *args, "--overwrite")
    assert "=== lead_3\n" in forced.stdout and not (tmp_path / "lead_3-2.json").exists()


def test_eval_split_validation_scores_the_validation_articles_in_a_record_of_its_own(common_args, tmp_path):
    """--eval-split validation: a decoding setting is chosen on the validation articles, never the test set's. The
    record is <run>.validation.json (a test record of the same name stays untouched), its predictions are the
    validation articles', and evaluating weights takes the validation articles their training used."""
    weights, runs = tmp_path / "w.safetensors", tmp_path / "runs"
    trained = run("main2.py", *common_args, "--weights", weights, "--train", "--max-steps", 1, "--val-size", 4,
                  "--eval-split", "validation")
    assert "ROUGE on the validation set, not the test set:" in trained.stdout
    assert "record: " in trained.stdout and "lora.validation.json" in trained.stdout
    assert sorted(p.name for p in runs.iterdir()) == ["lora.validation.json", "lora.validation.predictions.jsonl"]
    record = json.loads((runs / "lora.validation.json").read_text())
    assert record["test"] is None and set(record["validation"]) == set(ROUGE_KEYS)
    assert record["n_examples"] == {"train": 24, "validation": 4}
    ids = [json.loads(line)["id"] for line in open(runs / "lora.validation.predictions.jsonl")]
    assert ids and all(i.startswith("validation-") for i in ids) and len(ids) == 4

    run("main2.py", *common_args, "--weights", weights, "--run-name", "t")  # the test set: its own record
    again = run("main2.py", *common_args, "--weights", weights, "--run-name", "t", "--eval-split", "validation",
                "--temperature", "0.5")
    assert (runs / "t.json").is_file() and (runs / "t.validation.json").is_file()
    scored = json.loads((runs / "t.validation.json").read_text())
    assert scored["n_examples"]["validation"] == 4, again.stdout  # the 4 its training validated on
    assert scored["config"]["temperature"] == 0.5 and scored["config"]["eval_split"] == "validation"
    assert json.loads((runs / "t.json").read_text())["test"] is not None

    base = run("main2.py", *common_args, "--baseline", "--eval-split", "validation")
    assert (runs / "hard_prompt-24.validation.json").is_file() and not (runs / "hard_prompt-24.json").exists()
    assert "hard_prompt-24.validation.json" in base.stdout


@pytest.mark.parametrize("flags,says", [
    (["--eval-split", "train"], "--eval-split must be test or validation, got 'train'"),
    (["--eval-split", "validation", "--inspect"], "--inspect reads the test set's first article"),
    (["--eval-split", "validation", "--article", "-"], "--article summarizes one text"),
    (["--eval-split", "validation", "--val-size", "0", "--baseline"], "--val-size must be >= 1"),
])
def test_eval_split_is_refused_where_it_means_nothing(common_args, flags, says):
    p = run("main2.py", *common_args, "--baseline", *flags, check=False, stdin="An article.")
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("args,flag,sets", [
    (["temperature", "--temperature", "1.5"], "--temperature", "--temperature"),
    (["lr", "--only", "lr-lora-*", "--lr=1e-3"], "--lr", "--lr"),
    (["lora_rank", "--lora-a", "8"], "--lora-a", "--lora-alpha"),  # argparse's abbreviation of --lora-alpha
    (["methods", "--weights", "w.safetensors"], "--weights", "--weights"),  # not the sweep's --weights-dir
    (["decoding", "--run-name", "mine"], "--run-name", "--run-name"),
    (["temperature", "--only", "temperature-chat-*", "--weights", "w"], "--weights", "--weights")])  # not only --only's
def test_a_sweep_refuses_a_flag_it_sets_for_its_runs(tmp_path, args, flag, sets):
    """The user's flags reach each run after the sweep's own, so the run would take theirs: every record of a
    temperature sweep at --temperature 1.5 would be named after another temperature. Refused before any run."""
    p = run("sweep.py", *args, "--out", tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.startswith(f"error: {flag}: `sweep.py {args[0]}` sets {sets} itself"), \
        p.stderr
    assert "===" not in p.stdout and not any(tmp_path.iterdir())


def test_a_sweep_on_the_validation_split_skips_by_its_own_records(data_dir, tmp_path):
    """A sweep with --eval-split validation runs what has no validation record, whatever test records exist."""
    (tmp_path / "lead_3.json").write_text("{}")  # a test-set record of the same run
    args = ["methods", "--only", "lead_3", "--data", data_dir, "--out", tmp_path, "--eval-split", "validation"]
    first = run("sweep.py", *args)
    assert "=== lead_3\n" in first.stdout
    record = json.loads((tmp_path / "lead_3.validation.json").read_text())
    assert record["n_examples"] == {"validation": 6} and record["validation"]["rougeLsum"] > 0
    assert "=== lead_3: skipped" in run("sweep.py", *args).stdout
    assert (tmp_path / "lead_3.json").read_text() == "{}"


def test_ship_copies_each_methods_run_with_the_lowest_validation_loss(common_args, tmp_path):
    """Issue 25, item 9: `sweep.py ship` makes each method's configuration chosen on validation (lowest validation
    loss among its trained runs in --out) the weights its script reads; the weights it replaces are kept, nothing
    is copied twice, and a chosen run whose weights are not where they should be is refused in one line."""
    from peftsum.records import best_val, load_runs, shipped_runs
    assert shipped_runs({}, tmp_path) == {}  # nothing shipped there
    sweeps, shipped = tmp_path / "sweeps", tmp_path / "models"
    shipped.mkdir()
    run("main2.py", *common_args[:4], "--out", tmp_path / "elsewhere", *common_args[6:], "--train", "--max-steps", 1,
        "--weights", shipped / "lora.safetensors", "--run-name", "before")  # shipped weights from another study
    before = (shipped / "lora.safetensors").read_bytes()
    run("sweep.py", "decoding", "--only", "greedy-lora", *common_args, "--weights-dir", shipped)  # decodes them
    for name, lr in (("lora", "1e-3"), ("lr-lora-3e-2", "3e-2")):
        run("main2.py", *common_args, "--train", "--max-steps", 2, "--lr", lr, "--weights",
            sweeps / f"{name}.safetensors", "--run-name", name)
    records = {n: json.loads((tmp_path / "runs" / f"{n}.json").read_text()) for n in ("lora", "lr-lora-3e-2")}
    chosen = min(records, key=lambda n: best_val(records[n]))
    args = ["ship", "--out", tmp_path / "runs", "--weights-dir", sweeps, "--to", shipped]

    p = run("sweep.py", *args)
    assert f"LoRA: shipped {chosen} (lowest validation loss) as {shipped / 'lora.safetensors'}" in p.stdout, p.stdout
    assert (shipped / "lora.safetensors").read_bytes() == (sweeps / f"{chosen}.safetensors").read_bytes()
    assert (sweeps / "before.safetensors").read_bytes() == before  # what it replaced, kept
    assert f"python3 sweep.py decoding --overwrite --only greedy-lora --out {tmp_path / 'runs'} --weights-dir" \
        in p.stdout and "sweep.py temperature" not in p.stdout  # what decoded the replaced weights; no more
    assert not (shipped / "prompt_tuning.safetensors").exists()  # no run of it: nothing shipped
    assert shipped_runs(load_runs(tmp_path / "runs"), shipped) == {"lora": chosen}  # what report.py says is shipped
    assert "is shipped already" in run("sweep.py", *args).stdout

    (shipped / "lora.safetensors").unlink()
    (sweeps / f"{chosen}.safetensors").unlink()
    gone = run("sweep.py", *args, check=False)
    assert gone.returncode == 2 and f"is not the weights of {chosen}" in gone.stderr, gone.stderr
    assert "Traceback" not in gone.stderr and not (shipped / "lora.safetensors").exists()
    elsewhere = run("sweep.py", "lr", "--to", shipped, "--out", tmp_path / "runs", check=False)
    assert elsewhere.returncode == 2 and "only with ship" in elsewhere.stderr
