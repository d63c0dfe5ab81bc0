"""Continuous batching (generate_stream): each row decodes as it would alone while rows end at different steps and
take the next prompt; the articles-per-second report and the evaluation batch size."""
import pytest
import torch

from peftsum import generation
from peftsum.errors import UsageError
from peftsum.config import Config, check_config
from peftsum.generation import generate, generate_stream, prefill
from peftsum.interop import load_model
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
    stats = {}
    out = generate_stream(model, prompts, 20, batch_size, greedy=True, eos_id=eos, stats=stats)
    assert out == alone(model, prompts, 20, eos_id=eos)
    assert len({len(o) for o in out}) >= 4  # summaries of several lengths: rows were refilled mid-stream
    busy_rows = sum(min(len(o) + 1, 20) for o in out) - len(out)  # tokens after the first, one per busy row-step
    assert stats["busy"] == busy_rows and stats["steps"] * min(batch_size, len(prompts)) >= busy_rows
    assert stats["articles_per_second"] > 0


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
    assert generate_stream(model, prompts, 12, 2, greedy=True) == tokens


def test_stream_with_a_llama_and_a_first_token_that_ends_the_summary(llama_dir):
    model, _ = load_model(str(llama_dir))
    prompts = prompts_of(model, (9, 40, 4, 25, 12), seed=1)
    free = alone(model, prompts, 12)
    eos = free[2][0]  # the third prompt's summary ends at once: its row takes the next prompt before any step
    out = generate_stream(model, prompts, 12, 2, greedy=True, eos_id=eos)
    assert out == alone(model, prompts, 12, eos_id=eos) and out[2] == []


def test_stream_exact_lengths_and_compiled_step(tiny):
    model, _ = tiny
    prompts = prompts_of(model, (7, 30, 2, 18))
    eager = generate_stream(model, prompts, 9, 3, greedy=True)
    assert eager == alone(model, prompts, 9)
    assert generate_stream(model, prompts, 9, 3, greedy=True, compile=True) == eager
    sampled = generate_stream(model, prompts, 9, 3, seed=1)
    assert [len(o) for o in sampled] == [9] * 4 and sampled == generate_stream(model, prompts, 9, 3, seed=1)


def test_summary_batch_size(tiny):
    model, _ = tiny
    assert summary_batch_size(model, Config(eval_batch_size=5), 100) == 5
    assert summary_batch_size(model, Config(eval_batch_size=0), 100) == 16  # on a CPU
    check_config(Config(eval_batch_size=0), type("hp", (), {})())
    with pytest.raises(UsageError):
        check_config(Config(eval_batch_size=-1), type("hp", (), {})())
