"""The sampler: temperature → top-k → top-p, against transformers' logits warpers and a worked example."""
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
