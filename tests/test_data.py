"""The data layout: prompt + article + separator + summary + EOS, loss on summary + EOS only."""
import pytest

from peftsum import runtime
from peftsum.errors import UsageError
from peftsum.config import Config
from peftsum.model import IGNORE
from peftsum.data import collate, encode_examples, encode_prompts, load_splits


def make_cfg(**kw):
    return Config(**kw)


def test_loss_mask_covers_summary_and_eos_only(tiny):
    model, tok = tiny
    cfg = make_cfg()
    rows = [{"id": "a", "article": "The police said a man was arrested.", "highlights": "A man was arrested."}]
    prompt = [7, 7, 7]
    (ids, n_context), = encode_examples(rows, tok, prompt, cfg, 256)
    sep = tok.encode(cfg.separator)
    summary = tok.encode(" A man was arrested.")
    assert ids[:3] == prompt
    assert ids[n_context - len(sep):n_context] == sep
    assert ids[n_context:] == summary + [tok.eos_token_id]  # the real EOS is a target
    x, y = collate([(ids, n_context), (ids[:n_context] + ids[n_context:n_context + 2], n_context)], pad_id=0)
    assert x.shape == y.shape == (2, len(ids) - 1)  # padded to the longest row only
    assert x[0].tolist() == ids[:-1]
    targets = y[0][y[0] != IGNORE].tolist()
    assert targets == summary + [tok.eos_token_id]
    first = (y[0] != IGNORE).nonzero()[0].item()
    assert x[0, first] == sep[-1]  # the separator's last token predicts the summary's first
    assert (y[1] != IGNORE).sum() == 2  # the short row's padding carries no loss
    assert (y[:, :n_context - 1] == IGNORE).all()  # prompt, article and separator carry no loss


def test_long_article_is_truncated_and_separator_and_summary_survive(tiny):
    model, tok = tiny
    cfg = make_cfg(max_summary_tokens=40)
    article = " ".join(["the police said a man was arrested"] * 400)
    assert len(tok.encode(article)) > 2000
    rows = [{"id": "a", "article": article, "highlights": "A man was arrested on monday."}]
    (ids, n_context), = encode_examples(rows, tok, [9] * 4, cfg, 256)
    sep = tok.encode(cfg.separator)
    assert len(ids) == 256  # filled to the context, not beyond
    assert ids[n_context - len(sep):n_context] == sep
    assert ids[n_context:] == tok.encode(" A man was arrested on monday.") + [tok.eos_token_id]
    assert ids[4:n_context - len(sep)] == tok.encode(article)[:n_context - len(sep) - 4]  # the article's head


def test_summary_capped_at_max_summary_tokens(tiny):
    _, tok = tiny
    rows = [{"id": "a", "article": "a b c", "highlights": " ".join(["the team won the final match"] * 30)}]
    (ids, n_context), = encode_examples(rows, tok, [], make_cfg(max_summary_tokens=10), 256)
    assert len(ids) - n_context == 11  # 10 summary tokens + EOS


def test_generation_prompt_leaves_room_for_new_tokens(tiny):
    _, tok = tiny
    article = " ".join(["the police said a man was arrested"] * 400)
    rows = [{"id": "a", "article": article, "highlights": "x"}, {"id": "b", "article": "Short.", "highlights": "y"}]
    prompts, n_cut = encode_prompts(rows, tok, [], make_cfg(max_new_tokens=56), 256)
    assert len(prompts[0]) == 200 and n_cut == 1
    assert prompts[1] == tok.encode("Short.") + tok.encode(" TL;DR:")


def test_load_splits_reads_a_local_folder_with_seeded_subsets(data_dir):
    cfg = make_cfg(data=str(data_dir), train_size=10, val_size=3, test_size=100)
    a, b = load_splits(cfg), load_splits(cfg)
    assert [len(a[s]) for s in ("train", "validation", "test")] == [10, 3, 6]
    assert a == b  # the same subsets for every method and run
    other = load_splits(make_cfg(data=str(data_dir), train_size=10, data_seed=1))
    assert [r["id"] for r in other["train"]] != [r["id"] for r in a["train"]]
    assert set(a["train"][0]) == {"id", "article", "highlights"}


def test_load_splits_reads_csv(tmp_path):
    import csv
    for split in ("train", "validation", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "article", "highlights"])
            w.writerow([f"{split}-1", "An article, with a comma.", "A summary.\nTwo lines."])
    splits = load_splits(make_cfg(data=str(tmp_path)))
    assert splits["test"] == [{"id": "test-1", "article": "An article, with a comma.",
                               "highlights": "A summary.\nTwo lines."}]


def write_table(folder, split, rows, suffix):
    """rows as a .jsonl, .json, .csv or .parquet file."""
    import csv
    import json
    path = folder / f"{split}.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow
        import pyarrow.parquet
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_local_files_give_the_rows_datasets_would(tmp_path, suffix):
    """Local files are read without `datasets` (so a bad file is one clear error), yet each seeded subset holds the
    rows that `datasets.load_dataset` + shuffle(seed) + select drew before: runs stay comparable with older ones."""
    import datasets
    rows = [{"id": f"r{i}", "article": f"Article {i}, with a comma.\nAnd a second line.", "highlights": f"Summary {i}."}
            for i in range(40)]
    for split in ("train", "validation", "test"):
        write_table(tmp_path, split, rows, suffix)
    cfg = make_cfg(data=str(tmp_path), train_size=7, val_size=40, test_size=100, data_seed=3)
    ours = load_splits(cfg)
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[suffix]
    for split, n in (("train", 7), ("validation", 40), ("test", 100)):
        theirs = datasets.load_dataset(builder, data_files=str(tmp_path / f"{split}.{suffix}"), split="train",
                                       cache_dir=str(tmp_path / "cache"))
        expected = theirs.shuffle(seed=3).select(range(min(n, len(theirs))))
        assert ours[split] == [{k: r[k] for k in ("id", "article", "highlights")} for r in expected]


def test_each_mode_reads_only_its_splits(tmp_path):
    write_table(tmp_path, "test", [{"article": "An article.", "highlights": "A summary."}], "jsonl")
    assert load_splits(make_cfg(data=str(tmp_path)), ("test",)) == {
        "test": [{"id": "0", "article": "An article.", "highlights": "A summary."}]}
    with pytest.raises(UsageError, match="has no train.csv"):
        load_splits(make_cfg(data=str(tmp_path)))


def test_an_unreachable_hub_dataset_fails_in_seconds(monkeypatch):
    """Offline, a hub dataset name ends in one line at once, instead of a minute of retries (issue 13, item 2)."""
    import time
    monkeypatch.setattr(runtime, "hub_reachable", lambda: False)
    t = time.perf_counter()
    with pytest.raises(UsageError, match="cannot download the dataset 'no-such-user/no-such-data': the "
                                                "Hugging Face hub is not reachable.*pass --data with a local folder"):
        load_splits(make_cfg(data="no-such-user/no-such-data"), ("test",))
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("name,needle", [("/nonexistent/cnn_dm", "no data folder at /nonexistent/cnn_dm: the folder "
                                                                  "does not exist"),
                                         ("./cnn_dm", "the folder does not exist")])
def test_a_data_path_that_does_not_exist_says_so(name, needle):
    with pytest.raises(UsageError, match=needle):
        load_splits(make_cfg(data=name))
