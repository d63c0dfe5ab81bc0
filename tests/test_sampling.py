"""The sampler: temperature → top-k → top-p, against transformers' logits warpers and a worked example; the
partial-selection nucleus against its definition on a full sort; draws against the exact distribution."""
import math

import pytest
import torch

from peftsum.errors import UsageError
from peftsum.sampling import logits_to_probs, nucleus, sample, sample_logits
from peftsum.generation import generate


def test_top_p_worked_example():
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.75 keeps the smallest head whose mass reaches 0.75 (0.5 + 0.3)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.75)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.85)  # 0.8 < 0.85: the third joins
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert logits_to_probs(logits, top_p=0.4).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # the top token always stays


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.9, 0.9, 0), (0.5, 0.7, 0), (1.3, 1.0, 5), (0.9, 0.95, 20)])
def test_probs_match_transformers_warpers(temperature, top_p, top_k):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(logits_to_probs(logits, temperature, top_p, top_k), ref.softmax(-1))


def full_sort_logits_to_probs(logits, temperature=1.0, top_p=1.0, top_k=0):
    """The definition, on a sort of the whole vocabulary: the fewest most likely tokens whose mass reaches top_p,
    and every token as likely as the last of them (a tie at the cut keeps all its tokens): the reference."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        n = (torch.cumsum(sorted_probs, dim=-1) < top_p).sum(-1, keepdim=True)  # the n most likely: < top_p
        cut = sorted_probs.gather(-1, n.clamp(max=probs.shape[-1] - 1))
        probs = probs.masked_fill(probs < cut, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def vocab_logits(kinds: str, V: int = 50257, seed: int = 0):
    """One row of logits per letter: p(eaked, a nucleus of a few tokens), m(edium, ~1000: past the first
    candidates), f(lat: ~28,000 tokens, past all candidates), t(ied: values on a coarse grid, so runs of equal
    probabilities cross the cut), b(f16: the rounding of a bf16 model's logits, ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    scale = {"p": 8.0, "m": 3.0, "f": 1.0, "t": 3.0, "b": 3.0}
    rows = [torch.randn(V, generator=g) * scale[k] for k in kinds]
    rows = [r.round() if k == "t" else r.bfloat16().float() if k == "b" else r for r, k in zip(rows, kinds)]
    return torch.stack(rows)


SETTINGS = [(0.9, 0.9, 0), (0.5, 0.7, 0), (1.3, 0.95, 0), (0.9, 0.9, 40), (0.9, 0.5, 2000), (0.7, 0.999, 0)]


@pytest.mark.parametrize("kinds,settings", [("pfmtpb", s) for s in SETTINGS] +
                         [("ppp", SETTINGS[0]), ("ff", SETTINGS[0]), ("mm", SETTINGS[0])])
def test_top_p_is_bit_identical_to_the_definition(kinds, settings):
    """Exact equality (not closeness) with the full-sort reference: same kept tokens, same values, same
    normalizer, on each path: the first candidates only (ppp), the second (mm), the full sort (ff), all at once."""
    logits = vocab_logits(kinds, seed=len(kinds) + SETTINGS.index(settings))
    assert torch.equal(logits_to_probs(logits, *settings), full_sort_logits_to_probs(logits, *settings))


def test_each_row_takes_the_fewest_candidates_that_decide_it():
    """The width of the result is the largest count of candidates any row needed: a peaked row is decided by the
    first candidates, a medium one by the second, a flat one only by the whole vocabulary."""
    for kinds, width in (("pp", 256), ("pm", 4096), ("pmf", 50257)):
        probs = (vocab_logits(kinds) / 0.9).softmax(-1)
        values, index = nucleus(probs, 0.9)
        assert values.shape == index.shape == (len(kinds), width)
        kept = torch.zeros_like(probs).scatter_add_(-1, index, values)
        assert torch.equal(kept > 0, full_sort_logits_to_probs(probs.log(), 1.0, 0.9) > 0)
    assert (nucleus(probs, 0.9)[0] > 0).sum(-1).tolist()[1] > 256  # the medium row needs the second


def test_a_row_skips_candidates_that_could_not_hold_top_p(monkeypatch):
    """A flat row's 256 candidates hold so little mass that 4,096 tokens as likely as their last would still
    hold less than top_p: it goes from the first candidates to the full sort; a medium row tries the second."""
    counts, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, *a, **kw: counts.append((len(x), k)) or topk(x, k, *a, **kw))
    for kinds, expected in (("pf", [(2, 256), (1, 50257)]), ("pm", [(2, 256), (1, 4096)])):
        counts.clear()
        probs = (vocab_logits(kinds) / 0.9).softmax(-1)
        values, index = nucleus(probs, 0.9)
        assert counts == expected
        kept = torch.zeros_like(probs).scatter_add_(-1, index, values)
        assert torch.equal(kept > 0, full_sort_logits_to_probs(probs.log(), 1.0, 0.9) > 0)


@pytest.mark.parametrize("probs,top_p,kept,width", [
    ([0.4, 0.3, 0.2, 0.1], 0.6, [0.4, 0.3, 0.0], 3),  # the nucleus (0.4, 0.3) closes inside the 3 candidates
    ([0.4, 0.3, 0.1, 0.1, 0.1], 0.75, [0.4, 0.3, 0.1, 0.1, 0.1], 5),  # it closes on a 0.1, like the last
    # candidate: more 0.1s may lie outside (here two), so the row is sorted in full; all three are kept
    ([0.35, 0.35, 0.2, 0.1], 0.3, [0.35, 0.35, 0.0], 3),  # the first 0.35 reaches top_p; its twin stays too
    ([0.25, 0.25, 0.25, 0.25], 0.9, [0.25] * 4, 4),  # the candidates never reach top_p
])
def test_rows_the_candidates_cannot_decide(probs, top_p, kept, width):
    values, index = nucleus(torch.tensor([probs]), top_p, candidates=(3,))
    assert values.shape[1] == width
    assert values[0].tolist() == pytest.approx(kept + [0.0] * (width - len(kept)))


@pytest.mark.parametrize("draw", ["sample", "sample_logits"])
def test_sampled_distribution_matches_exact(draw):
    """N draws from a 12-token distribution: from its probabilities (`sample`, as prompt lookup draws) and from
    the logits, among the nucleus alone (`sample_logits`, as decoding draws). The expected total-variation
    distance of an empirical histogram is about 0.5 · Σ sqrt(p (1 - p) / N) ≤ 0.5 · sqrt(K / N) = 0.0039 for
    K = 12 kept tokens, N = 200,000; the bound 0.015 is ~4× that, and a sampler that ignored temperature or
    top-p (TV > 0.05 here) would fail it."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0]])
    exact = logits_to_probs(logits, temperature=0.9, top_p=0.9)
    assert 0 < (exact > 0).sum() < 12  # top-p really cut something
    N, g = 200_000, torch.Generator().manual_seed(0)
    draws = sample(exact.expand(N, -1), g) if draw == "sample" else \
        sample_logits(logits.expand(N, -1), g, temperature=0.9, top_p=0.9)
    empirical = torch.bincount(draws, minlength=12).float() / N
    tv = 0.5 * (empirical - exact[0]).abs().sum().item()
    assert tv < 0.015
    assert empirical[exact[0] == 0].sum() == 0  # never a token outside the nucleus
    plain = torch.softmax(logits[0], -1)
    assert 0.5 * (empirical - plain).abs().sum().item() > 0.05  # the test can tell the difference


def test_same_seed_same_output_and_different_seed_differs(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    a = generate(model, prompts, 25, seed=3)
    b = generate(model, prompts, 25, seed=3)
    c = generate(model, prompts, 25, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_rejects_invalid_sampling_settings(tiny, kwargs):
    model, _ = tiny
    with pytest.raises(UsageError):
        generate(model, [[1, 2]], 4, **kwargs)
