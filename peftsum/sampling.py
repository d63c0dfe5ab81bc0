"""Sampling as pure functions with an explicit generator: temperature -> top-k -> top-p, as Hugging Face orders its
warpers, and the acceptance rules of speculative decoding."""
from __future__ import annotations

import math

import torch


def scaled_probs(logits, temperature: float, top_k: int):
    """(B, V) logits → (B, V) float32 probabilities after temperature and top-k."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.softmax(logits, dim=-1)


def logits_to_probs(logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """(B, V) logits → (B, V) probabilities after temperature, top-k and top-p (`nucleus`)."""
    probs = scaled_probs(logits, temperature, top_k)
    if top_p < 1:
        values, index = nucleus(probs, top_p)
        probs = torch.zeros_like(probs).scatter_add_(-1, index, values)  # (scatter_add: the padding adds zeros)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


TOP_P_CANDIDATES = (256, 4096)  # tried in turn, then the whole vocabulary (sorted)


def nucleus(probs, top_p: float, candidates: tuple[int, ...] = TOP_P_CANDIDATES):
    """The top-p nucleus of each row of probs (B, V): in order of probability, the fewest tokens whose mass
    reaches top_p, and every token as likely as the last of them. (So a tie at the cut keeps all its tokens,
    where a sort would keep those it happens to put first: with a bf16 model's logits such ties are common.)
    Returns (values, index) (B, n): the tokens' probabilities, not renormalized, and ids, most likely first,
    values 0 past a row's nucleus. Found among the n most likely tokens, from a partial selection (about 20x
    cheaper than sorting SmolLM2's 49,152 tokens); a row that its candidates cannot decide tries the next count
    of candidates that could (their mass, if each token added were as likely as their last, reaches top_p), and at
    last the whole vocabulary. The candidates decide a row when their mass reaches top_p and the last token
    needed is more likely than the last candidate: then no token outside is as likely. Their prefix sums are the
    full sort's (torch.cumsum on the CPU adds one value after the other; CUDA's parallel scan may round
    differently), so the result is the same, bit for bit, whatever the candidates."""
    B, V = probs.shape
    widths = [k for k in candidates if k < V] + [V]
    pending = {k: [torch.arange(0, device=probs.device)] for k in widths}  # the rows each count is to decide
    pending[widths[0]].append(torch.arange(B, device=probs.device))
    parts = []  # (rows, values, index) decided by each count of candidates
    for i, k in enumerate(widths):
        rows = torch.cat(pending[k])
        if not len(rows):
            continue
        top, index = torch.topk(probs if i == 0 else probs[rows], k)  # descending
        mass = torch.cumsum(top, dim=-1)
        n = (mass < top_p).sum(-1, keepdim=True)  # the n most likely have less than top_p
        cut = top.gather(-1, n.clamp(max=k - 1))  # the last token needed
        decided = ((n < k) & (cut > top[:, -1:]))[:, 0] if k < V else torch.ones_like(rows, dtype=torch.bool)
        kept = top.masked_fill(top < cut, 0.0)
        if i == 0 and decided.all():  # the common case, at one host sync per call
            return kept, index
        parts.append((rows[decided], kept[decided], index[decided]))
        rest, total, least = rows[~decided], mass[~decided, -1], top[~decided, -1]
        for wider in widths[i + 1:]:  # the fewest candidates that could hold top_p: wider - k more tokens, at
            could = (total + (wider - k) * least >= top_p) | (wider == V)  # most as likely as the last
            pending[wider].append(rest[could])
            rest, total, least = rest[~could], total[~could], least[~could]
    width = max(v.shape[1] for _, v, _ in parts if len(v))
    values = probs.new_zeros(B, width)
    index = torch.zeros(B, width, dtype=torch.long, device=probs.device)
    for r, v, ix in parts:
        values[r, :v.shape[1]], index[r, :ix.shape[1]] = v, ix
    return values, index


def sample(probs, generator: torch.Generator):
    """One index per row drawn from `probs` (B, V), which need not sum to 1: argmax of p / E with E ~ Exp(1), an
    exact draw that needs no host sync (the exponential-race form of the Gumbel-max trick). E = -log U with
    U ~ Uniform[0, 1): on the CPU 5x faster than exponential_(); U = 0 gives E = inf, so that token cannot win,
    never a division by zero."""
    e = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    return torch.argmax(probs / e, dim=-1)


def sample_logits(logits, generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0):
    """One token per row drawn from logits_to_probs(logits, temperature, top_p, top_k), the draw among the
    nucleus only (a few hundred tokens, not the whole vocabulary)."""
    probs = scaled_probs(logits, temperature, top_k)
    if top_p == 1:
        return sample(probs, generator)
    values, index = nucleus(probs, top_p)
    return index.gather(-1, sample(values, generator)[:, None])[:, 0]


def accept_greedy(logits, proposals, n_proposed):
    """logits (B, W, V) after the last token and after each of the W - 1 proposals (B, W - 1), of which the first
    n_proposed (B,) are real. A proposal is accepted while it is the argmax. Returns (n_accepted (B,), the next
    token (B,)): the argmax after the last accepted one, so that a step always gains a token."""
    best = logits.argmax(-1)  # (B, W)
    n = leading_true((best[:, :-1] == proposals) & real_columns(proposals, n_proposed))
    return n, best.gather(1, n[:, None])[:, 0]


def accept_sampled(probs, proposals, n_proposed, generator: torch.Generator):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a deterministic proposal: accept
    proposal x with probability p(x); at the first rejection draw from p without x, renormalized (the residual
    max(p - q, 0) for q = the point mass on x); after all are accepted, draw the next token from p. Then every
    token is distributed exactly as in plain sampling. probs (B, W, V) as `logits` in accept_greedy."""
    B, W, _ = probs.shape
    p_proposed = probs[:, :-1].gather(-1, proposals[..., None])[..., 0]  # (B, W - 1)
    u = torch.rand(p_proposed.shape, generator=generator, device=probs.device)
    n = leading_true((u < p_proposed) & real_columns(proposals, n_proposed))
    p = probs[torch.arange(B, device=probs.device), n]  # (B, V): where the first unaccepted token is drawn
    if W > 1:
        rejected = (n < n_proposed)[:, None]
        x = proposals.gather(1, n.clamp(max=W - 2)[:, None])
        p = p.scatter(-1, x, p.gather(-1, x).masked_fill(rejected, 0.0))  # sample() needs no renormalizing
    return n, sample(p, generator)


def real_columns(proposals, n_proposed):
    return torch.arange(proposals.shape[1], device=proposals.device) < n_proposed[:, None]


def leading_true(ok):
    """(B, K) bool → (B,) the number of leading True values of each row."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)
