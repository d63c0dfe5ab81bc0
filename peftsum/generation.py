"""Generation: prefill, decode steps over the KV cache, batched and streamed decoding, speculative decoding with
prompt lookup, and the model's preparation for inference.

How the KV cache is used. `model.setup_cache(B, S)` gives each attention layer keys and values for B rows of S
slots. A slot is a place in the cache; a position is where a token stands in its text (what the position embedding
or RoPE sees). The two can differ, so a forward pass is told, for each token, its position, the slot it writes and
the slots it may attend to (the mask). `valid` (B, S) marks the slots that hold a row's real tokens, and the masks
are made from it. A slot outside `valid` may hold anything (padding, an earlier prompt's tokens, a rejected
proposal): such a stale entry is never attended to, and stays until a new token overwrites it. A pad's query
attends to itself alone, which keeps its softmax finite; its output is never used. A new token enters the cache
as the input of the step that draws the next one (the first is drawn from the prefill's logits).

Two layouts:
  - left padding (`generate_batch`): with T the longest prompt's length, a prompt of n tokens fills slots
    T-n..T-1 at positions 0..n-1, and its i-th new token (from 0) goes to slot T+i at position n+i. Every row
    then writes the same slot at each step: a decode step has fixed shapes, which compile. With prompt lookup
    (`decode_with_lookup`) rows accept different numbers of tokens, so each writes from its own point on, and the
    entries of rejected proposals stay past it, stale.
  - a write pointer per row (`generate_stream`): a row's prompt fills slots 0..n-1 at positions 0..n-1
    (prefilled into that row alone) and each new token goes to slot = position = the row's pointer; a row that
    takes the next prompt starts again at slot 0, over the stale entries of the one before.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from peftsum import sampling
from peftsum.errors import UsageError
from peftsum.config import check_sampling
from peftsum.model import GPT, can_pack, fuse_projections, pack_linears
from peftsum.methods import merge_lora
from peftsum.sampling import accept_greedy, logits_to_probs, sample_logits


PREFILL_CHUNK = 256  # prompt positions per row that a prefill runs through the model at once

OnPrefill = Callable[[int, int], None]  # (prompt tokens prefilled so far, of all), after each chunk


def prefill_hidden(model: GPT, idx, pos, mask, last, on_chunk: Callable[[int], None] | None = None):
    """The final hidden states (B, C) at positions `last` (B,) of prompts idx (B, T) at positions pos (B, T),
    written to cache slots 0..T-1, where `mask` (B or 1, 1, T, T) lets no query attend past its own slot. Runs
    PREFILL_CHUNK positions at a time, each chunk over the slots up to its end: the attention skips the masked
    half of its T x T work, and a chunk's activations stay in the CPU's caches. `on_chunk(end)` is called first
    with 0, then after each chunk with the number of positions done."""
    B, T = idx.shape
    out = None
    if on_chunk is not None:
        on_chunk(0)
    for s in range(0, T, PREFILL_CHUNK):
        e = min(T, s + PREFILL_CHUNK)
        h = model.hidden(idx[:, s:e], pos[:, s:e], mask[:, :, s:e, :e], torch.arange(s, e, device=idx.device))
        here = h[torch.arange(B, device=idx.device), (last - s).clamp(0, e - s - 1)]
        out = here if out is None else torch.where(((last >= s) & (last < e))[:, None], here, out)
        if on_chunk is not None:
            on_chunk(e)
    return out


def count_prefilled(on_prefill: OnPrefill | None, lengths: list[int], pads: list[int],
                    device: torch.device) -> Callable[[int], None] | None:
    """prefill_hidden's `on_chunk` for on_prefill(done, total): the prompt tokens (padding aside) whose positions
    are done, of all, for prompts of `lengths` behind `pads` pad positions each. On CUDA it waits for the chunk
    first: the host runs ahead of the device, and the count is of work done, not queued."""
    if on_prefill is None:
        return None

    def on_chunk(end: int) -> None:
        if end and device.type == "cuda":
            torch.cuda.synchronize(device)
        on_prefill(sum(min(max(end - pad, 0), n) for n, pad in zip(lengths, pads)), sum(lengths))
    return on_chunk


def prefill(model: GPT, idx, pos, valid, on_chunk: Callable[[int], None] | None = None):
    """Run the left-padded prompts idx (B, T) at positions pos (B, T) through the model into cache slots 0..T-1,
    `valid` (B, S) marking their real tokens. Returns the last position's logits (B, V), computing the LM head
    only there. No query attends past slot T - 1, so the attention covers slots 0..T-1 only."""
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = causal & (valid[:, None, :T] | torch.eye(T, dtype=torch.bool, device=idx.device))  # (B, T, T)
    last = torch.full((idx.shape[0],), T - 1, device=idx.device)
    return model.lm_head(prefill_hidden(model, idx, pos, mask[:, None], last, on_chunk))


def prefill_rows(model: GPT, prompts: list[list[int]], rows, valid,
                 on_chunk: Callable[[int], None] | None = None):
    """Prefill `prompts` into rows `rows` (n,) of the KV cache at slots and positions 0..len-1, and set those
    rows of `valid` (B, S) to the prompts' slots. Returns each prompt's last logits (n, V). The prompts run
    right-padded as a batch of their own, with a cache of their own that is then copied into the rows: a prompt
    never sees the pads after it (causal), and they are left as stale entries."""
    device = valid.device
    n, T = len(prompts), max(map(len, prompts))
    idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    shared = [block.attn.cache for block in model.blocks]
    model.setup_cache(n, T)
    try:
        at = torch.arange(T, device=device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        h = prefill_hidden(model, idx, at.expand(n, T), causal, lengths - 1, on_chunk)
        for block, cache in zip(model.blocks, shared):
            cache.k[rows, :, :T], cache.v[rows, :, :T] = block.attn.cache.k, block.attn.cache.v
    finally:
        for block, cache in zip(model.blocks, shared):
            block.attn.cache = cache
    valid[rows] = False
    valid[rows, :T] = at < lengths[:, None]
    return model.lm_head(h)


def decode_step(model: GPT, token, pos, valid, slot):
    """One new token per row, token (B,) at positions pos (B,), written to cache slot `slot`: (1,) for every row,
    or (B, 1) each row its own; the `valid` entries must already be set. Returns logits (B, V)."""
    return model(token[:, None], pos[:, None], valid[:, None, None, :], slot)[:, -1]


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled for fixed shapes; on CUDA also captured as CUDA graphs, so a step is one launch. (On
    the CPU it is no faster than eager: a decode step there is bound by reading weights and cache.)"""
    return torch.compile(decode_step, fullgraph=True, mode="reduce-overhead" if device_type == "cuda" else None)


def verify_step(model: GPT, tokens, pos, valid, slots, T: int):
    """Several tokens per row, tokens (B, W) at positions pos (B, W), written to cache slots `slots` (B, W), each
    row's consecutive from its own write pointer. A token attends to the prompt (`valid`, slots 0..T-1) and to
    the slots from T up to its own. Returns logits (B, W, V)."""
    s = torch.arange(valid.shape[1], device=valid.device)
    mask = valid[:, None, :] | ((s >= T) & (s <= slots[..., None]))  # (B, W, S)
    return model(tokens, pos, mask[:, None], slots)


@dataclass
class DecodeStats:
    """What one decoding call did after its prefill."""
    rows: int  # rows decoded at once
    steps: int  # forward passes after the prefill: decode steps, or with lookup verify steps
    busy: int  # row-steps spent on unfinished rows, of rows * steps
    proposed: int = 0  # lookup: tokens proposed
    accepted: int = 0  # lookup: proposed tokens accepted
    seconds: float = 0.0  # the whole call, prefill included

    @property
    def busy_share(self) -> float | None:
        """The share of row-steps spent on unfinished rows (None without steps)."""
        return self.busy / (self.rows * self.steps) if self.steps else None


def busy_row_steps(rows: list[list[int]], eos_id: int | None) -> int:
    """The row-steps spent on unfinished rows when each step adds one token per row: each row's tokens up to its
    EOS, less the first (drawn after the prefill)."""
    return sum((r.index(eos_id) + 1 if eos_id in r else len(r)) - 1 for r in rows)


@dataclass
class Decoding:
    """What every decoding call decides first: the decode step (compiled or eager), the KV cache's length, and how
    the next token is picked (argmax, or drawn after temperature, top-k and top-p with a seeded generator)."""
    step: Callable
    slots: int
    compile: bool
    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator

    def next_token(self, logits):
        """(B, V) logits → (B,) token ids."""
        if self.greedy:
            return logits.argmax(-1)
        return sample_logits(logits, self.generator, self.temperature, self.top_p, self.top_k)

    def next_probs(self, logits):
        """(N, V) logits → (N, V) the probabilities the sampler draws from."""
        return logits_to_probs(logits, self.temperature, self.top_p, self.top_k)

    @contextmanager
    def cache(self, model: GPT, batch: int) -> Iterator[None]:
        """The model's KV cache of `batch` rows for the call. The compiled step keeps its cache afterwards, so
        that a CUDA graph replays on the same buffers."""
        model.setup_cache(batch, self.slots)
        try:
            yield
        finally:
            if not self.compile:
                model.clear_cache()


def start_decoding(model: GPT, longest_prompt: int, max_new_tokens: int, *, temperature: float, top_p: float,
                   top_k: int, greedy: bool, seed: int, compile: bool) -> Decoding:
    """The Decoding for prompts of up to longest_prompt tokens, after checking the sampling settings."""
    check_sampling(temperature, top_p, top_k)
    device = model.lm_head.weight.device
    return Decoding(step=compiled_decode_step(device.type) if compile else decode_step,
                    slots=cache_length(model, longest_prompt, max_new_tokens, compile), compile=compile,
                    greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                    generator=torch.Generator(device).manual_seed(seed))


def cache_length(model: GPT, longest_prompt: int, max_new_tokens: int, compile: bool) -> int:
    """KV cache slots for prompts of up to longest_prompt tokens and their new tokens; compiled, rounded up to a
    multiple of 64, so that few shapes ever occur."""
    S = longest_prompt + max_new_tokens
    if S > model.config.n_positions:
        raise UsageError(f"{longest_prompt} prompt + {max_new_tokens} new tokens exceed the "
                         f"{model.config.n_positions}-token context")
    return min(-(-S // 64) * 64, model.config.n_positions) if compile else S


def cut_at_eos(rows: list[list[int]], eos_id: int | None) -> list[list[int]]:
    """Each row up to its first eos_id (not included)."""
    return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]


def finish_timing(device: torch.device, start: float) -> float:
    """Seconds since `start`, once the device has done its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


LOOKUP_NGRAM = 3  # prompt lookup matches the last 3 tokens, else the last 2, else the last one


def add_ngrams(index: dict, tokens: list[int], start: int) -> None:
    """Record in `index` where each n-gram (n <= LOOKUP_NGRAM) ending at tokens[start:-1] ends; a later occurrence
    replaces an earlier one. The last token is left out, so that a suffix never finds itself."""
    for end in range(max(start, 0), len(tokens) - 1):
        for n in range(1, min(LOOKUP_NGRAM, end + 1) + 1):
            index[tuple(tokens[end - n + 1:end + 1])] = end


def propose(tokens: list[int], index: dict, k: int) -> list[int]:
    """Prompt lookup (Saxena 2023): up to k tokens that followed the latest earlier occurrence of the longest
    suffix of `tokens` found in `index` (see add_ngrams). A summary copies phrases from its article."""
    for n in range(min(LOOKUP_NGRAM, len(tokens)), 0, -1):
        end = index.get(tuple(tokens[-n:]))
        if end is not None:
            return tokens[end + 1:end + 1 + k]
    return []


def decode_with_lookup(model: GPT, prompts: list[list[int]], first, valid, max_new_tokens: int, lookup: int,
                       decoding: Decoding, eos_id: int | None) -> tuple[list[list[int]], DecodeStats]:
    """Continue each left-padded row from `first` (B,), the token drawn after the prefill, by speculative decoding
    with prompt lookup: each step proposes up to `lookup` tokens per row (`propose`) and verifies them all in one
    forward pass of 1 + lookup tokens, which reads the weights and the cache once, as one token does. Rows accept
    different numbers of tokens, so each writes at its own pointer. Returns up to max_new_tokens tokens per row
    (a row stops after its EOS; the caller cuts there) and the verify steps, proposed and accepted tokens."""
    device, (B, S), T = first.device, valid.shape, max(map(len, prompts))
    lengths = valid.sum(-1)  # (B,) real prompt tokens
    out = [[t] for t in first.tolist()]
    history = [list(p) + o for p, o in zip(prompts, out)]  # what lookup searches: the prompt and the new tokens
    index = [{} for _ in range(B)]
    for ix, h in zip(index, history):
        add_ngrams(ix, h, 0)
    width = torch.arange(lookup + 1, device=device)
    live = [len(o) < max_new_tokens and o[-1] != eos_id for o in out]
    stats = DecodeStats(rows=B, steps=0, busy=0)
    while any(live):
        guesses = [propose(h, ix, min(lookup, max_new_tokens - len(o) - 1)) if a else []  # room for 1 more
                   for h, ix, o, a in zip(history, index, out, live)]
        W = 1 + max(map(len, guesses))
        n_proposed = torch.tensor([len(g) for g in guesses], device=device)
        idx = torch.tensor([[o[-1]] + g + [0] * (W - 1 - len(g)) for o, g in zip(out, guesses)], device=device)
        n_out = torch.tensor([len(o) for o in out], device=device)
        nth = (n_out - 1)[:, None] + width[:W]  # (B, W): which new token each column is, 0-based
        # Filler columns (rows with fewer proposals) may run past the cache: they write to its last slot, which
        # never holds a token that a real column attends to, and their outputs are unused.
        slots = (T + nth).clamp(max=S - 1)
        pos = (lengths[:, None] + nth).clamp(max=model.config.n_positions - 1)
        logits = verify_step(model, idx, pos, valid, slots, T)  # (B, W, V)
        if decoding.greedy:
            n, token = accept_greedy(logits, idx[:, 1:], n_proposed)
        else:
            probs = decoding.next_probs(logits.flatten(0, 1)).view(B, W, -1)
            n, token = sampling.accept_sampled(probs, idx[:, 1:], n_proposed, decoding.generator)
        stats.steps += 1
        for b, (k, t) in enumerate(zip(n.tolist(), token.tolist())):
            if live[b]:
                new = guesses[b][:k] + [t]
                out[b] += new
                history[b] += new
                add_ngrams(index[b], history[b], len(history[b]) - len(new) - 1)
                live[b] = len(out[b]) < max_new_tokens and eos_id not in new
                stats.busy += 1
                stats.proposed += len(guesses[b])
                stats.accepted += k
    return out, stats


def left_padded(prompts: list[list[int]], slots: int, device: torch.device):
    """The prompts as one left-padded batch: token ids idx (B, T), positions pos (B, T) with each prompt's
    tokens at 0..len-1, and `valid` (B, slots) marking their slots."""
    B, T = len(prompts), max(map(len, prompts))
    idx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, slots, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p)
        valid[i, T - len(p):T] = True
    idx, valid = idx.to(device), valid.to(device)
    return idx, (valid[:, :T].cumsum(-1) - 1).clamp(min=0), valid


def decode_left_padded(model: GPT, first, valid, T: int, max_new_tokens: int, decoding: Decoding,
                       eos_id: int | None) -> list[list[int]]:
    """Continue each left-padded row from `first` (B,), the token drawn after the prefill, one token per row and
    step, every row writing slot T + t - 1 at step t. Returns each row's tokens, its EOS and what follows included
    (the caller cuts). No host sync inside but for the EOS check every 8 steps (and top-p's check for rows to
    sort in full)."""
    lengths = valid[:, :T].sum(-1)
    slots = torch.arange(valid.shape[1], device=valid.device)
    token, out = first, [first]
    done = torch.zeros_like(first, dtype=torch.bool)
    for t in range(1, max_new_tokens):
        if eos_id is not None:
            done |= token == eos_id
            if t % 8 == 0 and done.all():
                break
        valid[:, T + t - 1] = True
        token = decoding.next_token(decoding.step(model, token, lengths + t - 1, valid, slots[T + t - 1:T + t]))
        out.append(token)
    return torch.stack(out, dim=1).tolist()


@torch.no_grad()
def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.9,
                   top_p: float = 0.9, top_k: int = 0, greedy: bool = False, seed: int = 0,
                   eos_id: int | None = None, compile: bool = False, lookup: int = 0,
                   on_prefill: OnPrefill | None = None) -> tuple[list[list[int]], DecodeStats]:
    """New tokens for each prompt (token-id lists of any lengths), each row stopping at `eos_id` (not included;
    None: exactly max_new_tokens), and what the decoding did. The prompts are left-padded (see the module
    docstring), and every row decodes as it would alone. `compile` runs the compiled decode step (over a cache
    of a multiple of 64 slots, so that few shapes occur). `lookup` > 0 decodes speculatively instead, proposing
    up to that many tokens per step by prompt lookup (`decode_with_lookup`; always eager): greedy, the same
    tokens; sampled, the same distribution (not the same draws for a seed). `on_prefill(done, total)` hears the
    prefill's progress in prompt tokens, after each chunk."""
    if lookup < 0:
        raise UsageError(f"lookup must be >= 0, got {lookup}")
    T, lengths = max(map(len, prompts)), [len(p) for p in prompts]
    decoding = start_decoding(model, T, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              greedy=greedy, seed=seed, compile=compile)
    device, start = model.lm_head.weight.device, time.perf_counter()
    idx, pos, valid = left_padded(prompts, decoding.slots, device)
    with decoding.cache(model, len(prompts)):
        logits = prefill(model, idx, pos, valid, count_prefilled(on_prefill, lengths, [T - n for n in lengths],
                                                                 device))
        first = decoding.next_token(logits)
        if lookup:
            rows, stats = decode_with_lookup(model, prompts, first, valid, max_new_tokens, lookup, decoding, eos_id)
        else:
            rows = decode_left_padded(model, first, valid, T, max_new_tokens, decoding, eos_id)
            stats = DecodeStats(rows=len(rows), steps=len(rows[0]) - 1, busy=busy_row_steps(rows, eos_id))
    stats.seconds = finish_timing(device, start)
    return cut_at_eos(rows, eos_id), stats


def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.9,
             top_p: float = 0.9, top_k: int = 0, greedy: bool = False, seed: int = 0, eos_id: int | None = None,
             compile: bool = False, lookup: int = 0) -> list[list[int]]:
    """The new tokens of `generate_batch`, without its statistics: for each prompt a list of token ids."""
    rows, _ = generate_batch(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             greedy=greedy, seed=seed, eos_id=eos_id, compile=compile, lookup=lookup)
    return rows


class RowState:
    """The rows of a stream (`generate_stream`): which prompt each row is decoding, the new tokens of every
    prompt, and each row's place in the KV cache: its write pointer (also its next position) and `valid` slots."""

    def __init__(self, prompts: list[list[int]], batch: int, slots: int, max_new_tokens: int,
                 eos_id: int | None, device: torch.device):
        self.prompts, self.max_new_tokens, self.eos_id = prompts, max_new_tokens, eos_id
        self.out: list[list[int]] = [[] for _ in prompts]  # each prompt's new tokens, its EOS included
        self.queue = list(range(len(prompts)))[::-1]  # the prompts not begun; pop() takes the first one first
        self.owner = [-1] * batch  # the prompt each row is decoding (-1: none left)
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)  # owner >= 0, on the device
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.pointer = torch.zeros(batch, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # each row's latest token
        self.every_row = torch.arange(batch, device=device)

    def decoding(self) -> bool:
        """Whether any row still has a summary to finish."""
        return any(o >= 0 for o in self.owner)

    def finished(self, row: int) -> bool:
        o = self.out[self.owner[row]]
        return len(o) == self.max_new_tokens or o[-1] == self.eos_id

    def assign(self, rows: list[int]) -> list[int]:
        """Give each of `rows` the next prompt, and return those that got one. The rest go idle: no prompt is
        left, so each attends to its slot 0 alone until the others end."""
        taken, idle = rows[:len(self.queue)], rows[len(self.queue):]
        for r in idle:
            self.owner[r] = -1
            self.valid[r], self.valid[r, 0], self.pointer[r], self.active[r] = False, True, 0, False
        for r in taken:
            self.owner[r] = self.queue.pop()
        return taken

    def begin(self, rows: list[int], index, first) -> list[int]:
        """Start `rows` (`index` on the device), their prompts prefilled, from their first tokens `first` (n,).
        Returns the rows whose summary that first token ends."""
        self.active[index] = True
        self.pointer[index], self.token[index] = self.valid[index].sum(-1), first
        for r, t in zip(rows, first.tolist()):
            self.out[self.owner[r]].append(t)
        return [r for r in rows if self.finished(r)]

    def mark_next_slots(self) -> None:
        """Each row's pointer slot becomes valid: the step about to run writes the row's latest token there."""
        self.valid[self.every_row, self.pointer] = True

    def append(self, token) -> list[int]:
        """Add a step's tokens (B,) to the rows' summaries and advance the busy rows' pointers (an idle row's
        stays at slot 0). Returns the rows whose summary ended. A host sync per step, to refill rows at once."""
        self.token = token
        self.pointer = torch.where(self.active, self.pointer + 1, 0)
        finished = []
        for r, t in enumerate(token.tolist()):
            if self.owner[r] >= 0:
                self.out[self.owner[r]].append(t)
                if self.finished(r):
                    finished.append(r)
        return finished


def refill(model: GPT, state: RowState, rows: list[int], decoding: Decoding,
           on_finished: Callable[[int], None] | None, on_prefill: OnPrefill | None) -> None:
    """Give each of `rows` the next prompt, prefilled into those rows together, and draw its first token; again
    for the rows whose summary that first token ends."""
    device = state.valid.device
    while rows:
        rows = state.assign(rows)
        if not rows:
            return
        prompts = [state.prompts[state.owner[r]] for r in rows]
        index = torch.tensor(rows, device=device)
        lengths = [len(p) for p in prompts]
        on_chunk = count_prefilled(on_prefill, lengths, [0] * len(prompts), device)
        first = decoding.next_token(prefill_rows(model, prompts, index, state.valid, on_chunk))
        rows = state.begin(rows, index, first)
        if on_finished is not None:
            on_finished(len(rows))


@torch.no_grad()
def generate_stream(model: GPT, prompts: list[list[int]], max_new_tokens: int, batch_size: int, *,
                    temperature: float = 0.9, top_p: float = 0.9, top_k: int = 0, greedy: bool = False,
                    seed: int = 0, eos_id: int | None = None, compile: bool = False,
                    on_finished: Callable[[int], None] | None = None,
                    on_prefill: OnPrefill | None = None) -> tuple[list[list[int]], DecodeStats]:
    """New tokens for each of many prompts, as `generate_batch` gives them, and what the decoding did. batch_size
    rows decode at a time, and a row whose summary ends (EOS or max_new_tokens) takes the next prompt at once
    (continuous batching): no step is spent on a finished row while prompts remain, where a whole batch decodes
    until its longest summary ends. Each row decodes as it would alone, at its own write pointer (see the module
    docstring). `on_finished(n)` hears, after each step and each refill, of n more summaries ended;
    `on_prefill(done, total)`, each prefill's progress in prompt tokens, after each chunk."""
    decoding = start_decoding(model, max(map(len, prompts)), max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, greedy=greedy, seed=seed, compile=compile)
    device, B = model.lm_head.weight.device, min(batch_size, len(prompts))
    state = RowState(prompts, B, decoding.slots, max_new_tokens, eos_id, device)
    steps, start = 0, time.perf_counter()
    with decoding.cache(model, B):
        refill(model, state, list(range(B)), decoding, on_finished, on_prefill)
        while state.decoding():
            state.mark_next_slots()
            logits = decoding.step(model, state.token, state.pointer, state.valid, state.pointer[:, None])
            finished = state.append(decoding.next_token(logits))
            steps += 1
            if on_finished is not None:
                on_finished(len(finished))
            refill(model, state, finished, decoding, on_finished, on_prefill)
    stats = DecodeStats(rows=B, steps=steps, busy=busy_row_steps(state.out, eos_id),
                        seconds=finish_timing(device, start))
    return cut_at_eos(state.out, eos_id), stats


def prepare_inference(model: GPT, dtype: torch.dtype, compile: bool = False) -> None:
    """Merge LoRA (zero inference overhead), eval mode, weights in the run's precision (bf16 or fp16 weights halve
    the bytes every decode step reads) and fused projections (`fuse_projections`); in bf16 on the CPU, packed for
    oneDNN (`PackedLinear`), unless the decode step is to be compiled: inductor cannot lower a packed weight that
    it has not packed itself. The model is then for inference only: its fused and packed layers have no names in
    a checkpoint, so save, export or adapt it before, never after."""
    merge_lora(model)
    fuse_projections(model.eval().to(dtype))
    if can_pack(model) and not compile:
        pack_linears(model)
