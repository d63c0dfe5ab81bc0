"""The sampler: temperature → top-k → top-p, against transformers' logits warpers and a worked example; the
partial-selection top-p against the full sort it replaced."""
import math

import pytest
import torch

import common


def test_top_p_worked_example():
    # probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.75 keeps the smallest head whose mass reaches 0.75 (0.5 + 0.3)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = common.logits_to_probs(logits, temperature=1.0, top_p=0.75)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = common.logits_to_probs(logits, temperature=1.0, top_p=0.85)  # 0.8 < 0.85: the third joins
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert common.logits_to_probs(logits, top_p=0.4).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # the top token always stays


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.9, 0.9, 0), (0.5, 0.7, 0), (1.3, 1.0, 5), (0.9, 0.95, 20)])
def test_probs_match_transformers_warpers(temperature, top_p, top_k):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    ref = TopPLogitsWarper(top_p)(None, ref)
    torch.testing.assert_close(common.logits_to_probs(logits, temperature, top_p, top_k), ref.softmax(-1))


def full_sort_logits_to_probs(logits, temperature=1.0, top_p=1.0, top_k=0):
    """logits_to_probs as it was before the partial selection (sorts the whole vocabulary): the reference."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def vocab_logits(kinds: str, V: int = 50257, seed: int = 0):
    """One row of logits per letter: p(eaked, a nucleus of a few tokens), m(edium, ~1000), f(lat: ~28,000 tokens,
    far past the candidates), t(ied: values on a coarse grid, so runs of equal probabilities cross the cut)."""
    g = torch.Generator().manual_seed(seed)
    scale = {"p": 8.0, "m": 3.0, "f": 1.0, "t": 3.0}
    rows = [torch.randn(V, generator=g) * scale[k] for k in kinds]
    rows = [r.round() if k == "t" else r for r, k in zip(rows, kinds)]
    return torch.stack(rows)


SETTINGS = [(0.9, 0.9, 0), (0.5, 0.7, 0), (1.3, 0.95, 0), (0.9, 0.9, 40), (0.9, 0.5, 2000), (0.7, 0.999, 0)]


@pytest.mark.parametrize("kinds,settings", [("pfmtp", s) for s in SETTINGS] + [("ppp", SETTINGS[0]), ("ff", SETTINGS[0])])
def test_top_p_is_bit_identical_to_the_full_sort(kinds, settings):
    """Exact equality (not closeness) with the full-sort reference: same kept tokens, same values, same
    normalizer, on each path: candidates only (ppp), all rows re-sorted (ff), and both in one batch."""
    logits = vocab_logits(kinds, seed=len(kinds) + SETTINGS.index(settings))
    assert torch.equal(common.logits_to_probs(logits, *settings), full_sort_logits_to_probs(logits, *settings))


def resorted(monkeypatch, probs, top_p, n_candidates=common.TOP_P_CANDIDATES):
    """keep_top_p's result, checked against the full sort, and the rows it had to sort in full."""
    calls, real = [], common.keep_top_p_by_sort
    monkeypatch.setattr(common, "keep_top_p_by_sort", lambda p, top_p: calls.append(p) or real(p, top_p))
    kept = common.keep_top_p(probs, top_p, n_candidates)
    assert torch.equal(kept, real(probs, top_p))
    return calls[0] if calls else probs[:0]


def test_top_p_sorts_only_the_flat_rows(monkeypatch):
    """A peaked row is decided by the candidates alone; a flat row, whose nucleus is larger than the candidates,
    is sorted in full."""
    probs = (vocab_logits("pf") / 0.9).softmax(-1)
    assert torch.equal(resorted(monkeypatch, probs, 0.9), probs[1:])
    assert (common.keep_top_p_by_sort(probs, 0.9) > 0).sum(-1)[1] > common.TOP_P_CANDIDATES


@pytest.mark.parametrize("probs,top_p,n_resorted", [
    ([0.4, 0.3, 0.2, 0.1], 0.6, 0),  # the nucleus (0.4, 0.3) closes inside the 3 candidates
    ([0.4, 0.3, 0.1, 0.1, 0.1], 0.75, 1),  # it closes on a 0.1, and two more 0.1s lie outside: which one is kept?
    ([0.5, 0.4, 0.1], 0.9, 1),  # it closes by less than the margin: a later token could round below top_p
    ([0.35, 0.35, 0.2, 0.1], 0.3, 1),  # the cut splits the two 0.35s: which comes first is the sort's choice
])
def test_top_p_sorts_rows_where_candidates_are_not_enough(monkeypatch, probs, top_p, n_resorted):
    probs = torch.tensor([probs])
    assert len(resorted(monkeypatch, probs, top_p, n_candidates=3)) == n_resorted


def test_sampled_distribution_matches_exact():
    """N draws from a 12-token distribution. The expected total-variation distance of an empirical histogram is
    about 0.5 · Σ sqrt(p (1 - p) / N) ≤ 0.5 · sqrt(K / N) = 0.0039 for K = 12 kept tokens, N = 200,000; the bound
    0.015 is ~4× that, and a sampler that ignored temperature or top-p (TV > 0.05 here) would fail it."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0]])
    exact = common.logits_to_probs(logits, temperature=0.9, top_p=0.9)
    assert 0 < (exact > 0).sum() < 12  # top-p really cut something
    N = 200_000
    draws = common.sample(exact.expand(N, -1), torch.Generator().manual_seed(0))
    empirical = torch.bincount(draws, minlength=12).float() / N
    tv = 0.5 * (empirical - exact[0]).abs().sum().item()
    assert tv < 0.015
    assert empirical[exact[0] == 0].sum() == 0  # never a token outside the nucleus
    plain = torch.softmax(logits[0], -1)
    assert 0.5 * (empirical - plain).abs().sum().item() > 0.05  # the test can tell the difference


def test_same_seed_same_output_and_different_seed_differs(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    a = common.generate(model, prompts, 25, seed=3)
    b = common.generate(model, prompts, 25, seed=3)
    c = common.generate(model, prompts, 25, seed=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_rejects_invalid_sampling_settings(tiny, kwargs):
    model, _ = tiny
    with pytest.raises(common.UsageError):
        common.generate(model, [[1, 2]], 4, **kwargs)
