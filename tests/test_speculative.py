"""Speculative decoding with prompt lookup: greedy gives plain greedy's tokens, sampling gives plain sampling's
distribution (checked against the exact one), and the per-row KV cache it needs matches transformers."""
import itertools

import pytest
import torch

from peftsum import sampling
from peftsum.errors import UsageError
from peftsum.model import GPT, GPTConfig, KVCache
from peftsum.methods import apply_prompt_tuning
from peftsum.sampling import leading_true, logits_to_probs, real_columns, sample
from peftsum.generation import add_ngrams, generate, generate_batch, prefill, propose, verify_step


def copying_model(V: int, sharpness: float, perm=None, seed: int = 0, width: int = 32, context: float = 5.0):
    """A random GPT whose next token is mostly perm[current token] (the LM head is the embedding table permuted),
    often changed by the context (attention strengthened, so that a wrong mask shows): its greedy output mostly
    follows chains of perm, so prompts that hold those chains give lookup something to copy. `sharpness` sets
    how peaked the next-token distribution is."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_positions=128, n_layer=2, n_head=2, n_embd=width)).eval()
    perm = torch.randperm(V) if perm is None else torch.as_tensor(perm)
    with torch.no_grad():
        model.wpe.weight.mul_(0.1)
        for block in model.blocks:
            block.attn.c_proj.weight.mul_(context)
            block.mlp.c_proj.weight.mul_(0.3)
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight[torch.argsort(perm)] * sharpness)
    return model.requires_grad_(False), perm.tolist()


def chain(perm, start: int, n: int) -> list[int]:
    out = [start]
    while len(out) < n:
        out.append(perm[out[-1]])
    return out


def lookup(tokens, k):
    index = {}
    add_ngrams(index, tokens, 0)
    return propose(tokens, index, k)


def test_propose_continues_the_latest_match_of_the_longest_suffix():
    assert lookup([1, 2, 3, 4, 5, 9, 3, 6, 2, 3], 2) == [4, 5]  # "2 3" before "3", though "3" also ends at 6
    assert lookup([2, 3, 4, 2, 3, 7, 2, 3], 2) == [7, 2]  # "2 3" ends at 1 and at 4: the latest wins
    assert lookup([2, 3, 4, 2, 3, 7, 2, 3], 9) == [7, 2, 3]  # k tokens at most, fewer where the text ends
    assert lookup([5, 5, 5], 4) == [5]  # "5 5" last ended at 1 (never at 2, the suffix itself)
    assert lookup([1, 2, 3], 2) == []  # nothing occurred before


def test_add_ngrams_from_start_equals_indexing_anew():
    """generate indexes the new tokens of each step only: the index must be the one built from scratch."""
    tokens = [4, 1, 4, 1, 2, 4, 1, 2, 3, 3]
    index = {}
    add_ngrams(index, tokens[:4], 0)
    add_ngrams(index, tokens, 3)  # the old last token (3) had not been indexed yet
    fresh = {}
    add_ngrams(fresh, tokens, 0)
    assert index == fresh


def test_kv_cache_writes_per_row_slots():
    cache = KVCache((2, 3, 6, 4), torch.float32, "cpu")
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    cache.update(torch.tensor([[1, 2], [4, 5]]), k, v)
    torch.testing.assert_close(cache.k[0, :, 1:3], k[0], rtol=0, atol=0)
    torch.testing.assert_close(cache.v[1, :, 4:6], v[1], rtol=0, atol=0)
    assert cache.k[0, :, 3:].abs().sum() == 0 and cache.k[1, :, :4].abs().sum() == 0
    shared = KVCache((2, 3, 6, 4), torch.float32, "cpu")
    shared.update(torch.tensor([1, 2]), k, v)
    per_row = KVCache((2, 3, 6, 4), torch.float32, "cpu")
    per_row.update(torch.tensor([[1, 2], [1, 2]]), k, v)
    assert torch.equal(shared.k, per_row.k) and torch.equal(shared.v, per_row.v)


def test_verify_steps_with_rollbacks_match_transformers(tiny, hf_model):
    """After a 20-token prefill, two rows step through the cache at their own slots, several tokens at a time;
    row 0 first writes junk, then "rejects" it and writes the real tokens over part of it. Every logit equals
    transformers' full forward pass of the sequence that was kept: stale entries are masked, then overwritten."""
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, model.config.vocab_size, (2, 30), generator=g)
    T, S = 20, 32
    valid = (torch.arange(S) < T).expand(2, S)

    def step(tokens, start):  # tokens (2, W) at positions and slots start..start+W-1 of each row
        slots = torch.tensor(start)[:, None] + torch.arange(tokens.shape[1])
        return verify_step(model, tokens, slots, valid, slots, T)

    with torch.no_grad():
        theirs = hf_model(seq).logits
        model.setup_cache(2, S)
        prefill(model, seq[:, :T], torch.arange(T).expand(2, T), valid)
        junk = torch.randint(0, model.config.vocab_size, (4,), generator=g)
        step(torch.stack([junk, seq[1, 20:24]]), [20, 20])  # row 0 writes junk at 20..23
        for a, b in [(20, 24), (23, 27)]:  # row 0 rewrites 20..22 (23 still junk, masked), then 23..25
            logits = step(torch.stack([seq[0, a:a + 3], seq[1, b:b + 3]]), [a, b])
            torch.testing.assert_close(logits[0], theirs[0, a:a + 3], atol=1e-4, rtol=0)
            torch.testing.assert_close(logits[1], theirs[1, b:b + 3], atol=1e-4, rtol=0)
        model.clear_cache()


def copying_prompts(perm):
    """Left-padded rows of different lengths: a chain to copy (it comes again after the prompt's last token), the
    same with two tokens changed (proposals that fail there), and short prompts with nothing to copy at first."""
    c = chain(perm, 5, 80)
    noisy = c[10:40]
    noisy[5], noisy[17] = perm[noisy[5]], perm[noisy[17]]
    return [c[10:40] + c[:10], noisy + c[:10], [c[50]], c[60:63]]


def test_greedy_lookup_gives_the_tokens_of_plain_greedy():
    model, perm = copying_model(400, sharpness=1.0)
    prompts = copying_prompts(perm)
    plain = generate(model, prompts, 40, greedy=True)
    out, stats = generate_batch(model, prompts, 40, greedy=True, lookup=4)
    assert out == plain
    assert 0 < stats.accepted < stats.proposed  # proposals were accepted, and some rejected
    # each busy row-step gains its accepted proposals and one token more; the first token came with the prefill
    assert sum(len(o) - 1 for o in out) == stats.accepted + stats.busy and stats.rows == 4
    assert stats.busy < 4 * stats.steps  # rows with nothing to copy end later, and the others were not counted
    out, alone = generate_batch(model, prompts[:1], 40, greedy=True, lookup=4)
    assert out == plain[:1]
    assert alone.steps == alone.busy < 30  # 39 without lookup: it copies its chain, then has no match


def test_greedy_lookup_stops_each_row_at_eos():
    model, perm = copying_model(400, sharpness=1.0)
    prompts = copying_prompts(perm)
    free = generate(model, prompts, 30, greedy=True)
    eos = free[0][6]  # call the 7th token of row 0 the "EOS": lookup had proposed it, row 0 must stop before it
    stopped = generate(model, prompts, 30, greedy=True, eos_id=eos, lookup=4)
    assert stopped == [f[:f.index(eos)] if eos in f else f for f in free]
    assert len(stopped[0]) == 6


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_lookup_generates_exactly_max_new_tokens(max_new_tokens):
    """Proposals are cut so that a row never passes max_new_tokens, the cache never overflows, and greedy still
    agrees at every length."""
    model, perm = copying_model(400, sharpness=1.0)
    prompts = copying_prompts(perm)
    plain = generate(model, prompts, max_new_tokens, greedy=True)
    assert generate(model, prompts, max_new_tokens, greedy=True, lookup=4) == plain
    sampled = generate(model, prompts, max_new_tokens, lookup=4)
    assert [len(r) for r in sampled] == [max_new_tokens] * len(prompts)


def test_greedy_lookup_with_a_soft_prompt(tiny):
    """Soft-prompt ids (>= vocab_size) lead each prompt; lookup must never propose one."""
    model, tok = tiny
    apply_prompt_tuning(model, [1, 2, 3, 4])
    words = tok.encode(" the police said a man was arrested on monday after the fire in the city center .")
    prompts = [model.prompt_ids + words * 2, model.prompt_ids + words[:5]]
    out, stats = generate_batch(model, prompts, 20, greedy=True, lookup=3)
    assert out == generate(model, prompts, 20, greedy=True)
    assert stats.proposed > 0


def exact_joint(model, prompt, n, **sampling):
    """The exact probability of each sequence of the first n new tokens, (V,) * n, by enumerating every prefix."""
    V = model.config.vocab_size
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=n - 1)))  # (V^(n-1), n-1)
    x = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = model(x)[:, len(prompt) - 1:]  # (M, n, V): the distribution of new token i given the prefix
    probs = logits_to_probs(logits.flatten(0, 1), **sampling).view(len(prefixes), n, V)
    joint = probs[:, -1]  # (M, V)
    for i in range(n - 1):
        joint = joint * probs[:, i].gather(1, prefixes[:, i:i + 1])
    return joint.reshape((V,) * n)


def always_accept(probs, proposals, n_proposed, generator):
    return n_proposed, sample(probs[torch.arange(len(probs)), n_proposed], generator)


def resample_with_the_rejected(probs, proposals, n_proposed, generator):
    """The classic slip: accept with p(x), but on rejection draw from p itself, x included."""
    p_proposed = probs[:, :-1].gather(-1, proposals[..., None])[..., 0]
    u = torch.rand(p_proposed.shape, generator=generator)
    n = leading_true((u < p_proposed) & real_columns(proposals, n_proposed))
    return n, sample(probs[torch.arange(len(probs)), n], generator)


SAMPLING = dict(temperature=0.9, top_p=0.7)


def sampled_tv(monkeypatch, accept=None):
    """Total-variation distance between the exact joint distribution of the first 4 new tokens and their
    histogram over N rows of one speculative generate call (each row draws independently), and its bound. The
    first verify step proposes tokens 2 and 3 (the cycle 0 1 2 3 of the prompt), and adds token 4 or redraws."""
    if accept is not None:
        monkeypatch.setattr(sampling, "accept_sampled", accept)
    V, n = 4, 4
    model, perm = copying_model(V, sharpness=0.07, perm=[1, 2, 3, 0], width=16, context=1.0)
    prompt = chain(perm, 0, 8)
    exact = exact_joint(model, prompt, n, **SAMPLING).flatten()
    N = 20_000
    out, stats = generate_batch(model, [prompt] * N, n, lookup=2, seed=0, **SAMPLING)
    out = torch.tensor(out)
    empirical = torch.bincount(out @ V ** torch.arange(n - 1, -1, -1), minlength=V ** n).float() / N
    # E|empirical - p| <= sqrt(p (1 - p) / N) for each sequence, so E[TV] <= 0.5 · Σ sqrt(p (1 - p) / N); 4x that.
    bound = 4 * 0.5 * (exact * (1 - exact) / N).sqrt().sum().item()
    return 0.5 * (empirical - exact).abs().sum().item(), bound, stats


def test_sampled_lookup_matches_the_exact_distribution(monkeypatch):
    """p(proposal) is about 0.5 here, so acceptance and the residual draw both matter; top-p cuts the rest."""
    tv, bound, stats = sampled_tv(monkeypatch)
    assert bound < 0.08
    assert tv < bound
    assert 0.3 < stats.accepted / stats.proposed < 0.7  # both branches ran, often


@pytest.mark.parametrize("wrong", [always_accept, resample_with_the_rejected])
def test_sampled_distribution_test_catches_wrong_acceptance_rules(monkeypatch, wrong):
    tv, bound, _ = sampled_tv(monkeypatch, wrong)
    assert tv > 2 * bound  # TV 0.6 and 0.3: far outside


def test_sampled_lookup_same_seed_same_output():
    model, perm = copying_model(400, sharpness=0.2)
    prompts = copying_prompts(perm)
    a = generate(model, prompts, 25, seed=3, lookup=4)
    assert a == generate(model, prompts, 25, seed=3, lookup=4)
    assert a != generate(model, prompts, 25, seed=4, lookup=4)


def test_rejects_negative_lookup(tiny):
    with pytest.raises(UsageError):
        generate(tiny[0], [[1, 2]], 4, lookup=-1)
