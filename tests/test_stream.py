"""Continuous batching (generate_stream): each row decodes as it would alone while rows end at different steps and
take the next prompt; the decoding statistics, the prefill's progress and the evaluation batch size."""
import inspect
import json
import re

import pytest
import torch

from peftsum import generation
from peftsum.errors import UsageError
from peftsum.config import Config, check_config
from peftsum.generation import DecodeStats, generate, generate_batch, generate_stream, prefill
from peftsum.interop import load_model
from peftsum import evaluation
from peftsum.evaluation import summary_batch_size
from test_speculative import copying_model


def prompts_of(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompts, n, eos_id=None):
    return [generate(model, [p], n, greedy=True, eos_id=eos_id)[0] for p in prompts]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_stream_gives_each_prompt_the_tokens_it_gets_alone(batch_size):
    """Rows end at different steps (the token that ends most summaries at distinct lengths plays EOS), take the
    next prompt, and every summary equals greedy decoding of its prompt alone, in the order of the prompts."""
    model, _ = copying_model(400, sharpness=1.0)  # its greedy tokens wander (chains of a permutation), not loop
    prompts = prompts_of(model, (3, 60, 17, 100, 5, 33, 2))
    free = alone(model, prompts, 20)
    eos = max({t for o in free for t in o}, key=lambda t: len({o.index(t) if t in o else 20 for o in free}))
    ended = []
    out, stats = generate_stream(model, prompts, 20, batch_size, greedy=True, eos_id=eos, on_finished=ended.append)
    assert out == alone(model, prompts, 20, eos_id=eos)
    assert len({len(o) for o in out}) >= 4  # summaries of several lengths: rows were refilled mid-stream
    busy_rows = sum(min(len(o) + 1, 20) for o in out) - len(out)  # tokens after the first, one per busy row-step
    assert stats.busy == busy_rows and stats.rows == min(batch_size, len(prompts))
    if batch_size == 1:
        assert stats.steps == busy_rows  # one row: every step is busy
    elif batch_size >= len(prompts):
        assert stats.steps == max(min(len(o) + 1, 20) for o in out) - 1  # no refill: until the longest ends
    else:
        assert batch_size * stats.steps > busy_rows > stats.steps
    assert stats.busy_share == busy_rows / (stats.rows * stats.steps) and stats.seconds > 0
    assert sum(ended) == len(prompts)


@pytest.mark.parametrize("chunk", [7, 16])
def test_prefill_in_chunks_decodes_as_the_prefill_at_once(monkeypatch, llama_dir, chunk):
    """Prompts longer than PREFILL_CHUNK run through the model a chunk at a time (with 16, each chunk takes the
    few-queries attention): the same last logits within float32 rounding, and the same greedy tokens, left-padded
    (`generate`) and right-padded into rows (`generate_stream`)."""
    model, _ = load_model(str(llama_dir))
    prompts = prompts_of(model, (60, 3, 41, 17))
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    valid = torch.zeros(4, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        valid[i, T - len(p):] = True
    pos = (valid.cumsum(-1) - 1).clamp(min=0)

    def prefill_at_once():
        model.setup_cache(4, T)
        with torch.no_grad():
            return prefill(model, idx, pos, valid)

    whole, tokens = prefill_at_once(), alone(model, prompts, 12)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", chunk)
    torch.testing.assert_close(prefill_at_once(), whole, atol=1e-5, rtol=1e-5)
    assert generate(model, prompts, 12, greedy=True) == tokens
    assert generate_stream(model, prompts, 12, 2, greedy=True)[0] == tokens


def test_stream_with_a_llama_and_a_first_token_that_ends_the_summary(llama_dir):
    model, _ = load_model(str(llama_dir))
    prompts = prompts_of(model, (9, 40, 4, 25, 12), seed=1)
    free = alone(model, prompts, 12)
    eos = free[2][0]  # the third prompt's summary ends at once: its row takes the next prompt before any step
    out, _ = generate_stream(model, prompts, 12, 2, greedy=True, eos_id=eos)
    assert out == alone(model, prompts, 12, eos_id=eos) and out[2] == []


def test_stream_exact_lengths_and_compiled_step(tiny):
    model, _ = tiny
    prompts = prompts_of(model, (7, 30, 2, 18))
    eager, _ = generate_stream(model, prompts, 9, 3, greedy=True)
    assert eager == alone(model, prompts, 9)
    assert generate_stream(model, prompts, 9, 3, greedy=True, compile=True)[0] == eager
    sampled, _ = generate_stream(model, prompts, 9, 3, seed=1)
    assert [len(o) for o in sampled] == [9] * 4 and sampled == generate_stream(model, prompts, 9, 3, seed=1)[0]


def test_generate_batch_counts_steps_and_busy_rows(tiny):
    """Without EOS every row is busy at every step; with one, a row is busy until the step that draws its EOS."""
    model, _ = tiny
    prompts = prompts_of(model, (7, 30, 2, 18))
    out, stats = generate_batch(model, prompts, 9, seed=1)
    assert out == generate(model, prompts, 9, seed=1)
    assert (stats.rows, stats.steps, stats.busy, stats.proposed, stats.accepted) == (4, 8, 32, 0, 0)
    free = alone(model, prompts, 9)
    eos = free[1][3]  # row 1 draws it 4th: 3 busy steps; rows without it, 8
    out, stats = generate_batch(model, prompts, 9, greedy=True, eos_id=eos)
    assert out == alone(model, prompts, 9, eos_id=eos) and len(out[1]) <= 3
    assert stats.busy == sum(len(o) + 1 if eos in f else len(o) for o, f in zip(out, free)) - 4
    assert stats.busy == sum(min(len(o) + 1, 9) - 1 for o in out) and stats.steps == 8


def test_generate_takes_the_arguments_of_generate_batch():
    """generate is generate_batch without its statistics and the prefill's progress: the same defaults."""
    batch = dict(inspect.signature(generate_batch).parameters)
    del batch["on_prefill"]
    assert dict(inspect.signature(generate).parameters) == batch


def test_stream_without_decode_steps():
    """One new token each: every summary ends with its prefill, no decode step runs, and no busy share exists."""
    model, _ = copying_model(50, sharpness=1.0)
    out, stats = generate_stream(model, prompts_of(model, (3, 9, 4)), 1, 2, greedy=True)
    assert [len(o) for o in out] == [1, 1, 1]
    assert stats == DecodeStats(rows=2, steps=0, busy=0, seconds=stats.seconds) and stats.busy_share is None


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_reports_its_progress_in_prompt_tokens(monkeypatch, stream):
    """Each prefill reports 0, then after each chunk the prompt tokens done (padding aside), up to all of its
    prompts' tokens; together the prefills cover every prompt once. The tokens are those of the call without it."""
    model, _ = copying_model(400, sharpness=1.0)
    lengths = (3, 60, 17, 100, 5, 33, 2)
    prompts = prompts_of(model, lengths)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 16)
    calls = []
    if stream:
        out, _ = generate_stream(model, prompts, 8, 3, seed=2, on_prefill=lambda *a: calls.append(a))
        assert out == generate_stream(model, prompts, 8, 3, seed=2)[0]
    else:
        out, _ = generate_batch(model, prompts, 8, seed=2, on_prefill=lambda *a: calls.append(a))
        assert out == generate(model, prompts, 8, seed=2)
    prefills = []
    for done, total in calls:
        if done == 0:
            prefills.append([])
        prefills[-1].append((done, total))
    for counts in prefills:
        done = [d for d, _ in counts]
        assert len({t for _, t in counts}) == 1 and done[-1] == counts[0][1]
        assert all(a < b for a, b in zip(done, done[1:]))  # the longest prompt has tokens in every chunk
    assert sum(counts[0][1] for counts in prefills) == sum(lengths)
    if not stream:  # one left-padded prefill of 100 positions: 7 chunks, then the shortest rows' tokens come last
        assert len(prefills) == 1 and len(calls) == 1 + 7
        assert calls[1] == (sum(max(0, 16 - (100 - n)) for n in lengths), sum(lengths)) == (16, sum(lengths))
    else:  # the first three prompts together, 60 positions in 4 chunks; then the next as rows end
        assert prefills[0] == [(0, 80), (3 + 16 + 16, 80), (3 + 32 + 17, 80), (3 + 48 + 17, 80), (80, 80)]
        assert len(prefills) > 2


@pytest.mark.parametrize("lookup", [0, 2])
def test_summarize_shows_the_prefill_on_its_progress_bar(monkeypatch, capsys, tiny, data_dir, lookup):
    """While a prefill runs, the bar's postfix counts its prompt tokens (from 0, up to below the total: at the total
    the postfix goes); the summaries are those of a run without the bar. One new token each: no decode step, and
    the report says nothing of busy row-steps."""
    model, tok = tiny
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 8)
    cfg = Config(max_new_tokens=6, eval_batch_size=4, seed=1, lookup=lookup)
    summaries = evaluation.summarize(model, tok, rows, cfg)
    printed = capsys.readouterr().out
    shown = [(int(d.replace(",", "")), int(t.replace(",", "")))
             for d, t in re.findall(r"prefilling ([\d,]+)/([\d,]+) tokens", printed)]
    assert shown[0][0] == 0 and len({t for _, t in shown}) >= 2  # the first prefill, then another
    assert all(d < t for d, t in shown) and any(0 < d for d, _ in shown)
    assert "summarized 6 articles" in printed
    monkeypatch.setattr(evaluation, "show_prefill", lambda bar: None)
    assert evaluation.summarize(model, tok, rows, cfg) == summaries
    evaluation.summarize(model, tok, rows, Config(max_new_tokens=1, eval_batch_size=4))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("summarized 6 articles") and "busy" not in last


def test_summary_batch_size(tiny):
    model, _ = tiny
    assert summary_batch_size(model, Config(eval_batch_size=5), 100) == 5
    assert summary_batch_size(model, Config(eval_batch_size=0), 100) == 16  # on a CPU
    check_config(Config(eval_batch_size=0), type("hp", (), {})())
    with pytest.raises(UsageError):
        check_config(Config(eval_batch_size=-1), type("hp", (), {})())
