"""Generation: prefill, decode steps over the KV cache, batched and streamed decoding, speculative decoding with
prompt lookup, and the model's preparation for inference."""
from __future__ import annotations

import functools
import time

import torch

from peftsum import sampling
from peftsum.errors import UsageError
from peftsum.config import check_sampling
from peftsum.model import GPT, can_pack, fuse_projections, pack_linears
from peftsum.methods import merge_lora
from peftsum.sampling import accept_greedy, logits_to_probs, sample_logits


PREFILL_CHUNK = 256  # prompt positions per row that a prefill runs through the model at once


def prefill_hidden(model: GPT, idx, pos, mask, last):
    """The final hidden states (B, C) at positions `last` (B,) of prompts idx (B, T) at positions pos (B, T),
    written to cache slots 0..T-1, where `mask` (B or 1, 1, T, T) lets no query attend past its own slot. Runs
    PREFILL_CHUNK positions at a time, each chunk over the slots up to its end: the attention skips the masked
    half of its T x T work, and a chunk's activations stay in the CPU's caches (SmolLM2, 8 prompts of 516 tokens,
    bf16, 2 cores: 4.5 s at once, 3.6 s in chunks of 256)."""
    B, T = idx.shape
    out = None
    for s in range(0, T, PREFILL_CHUNK):
        e = min(T, s + PREFILL_CHUNK)
        h = model.hidden(idx[:, s:e], pos[:, s:e], mask[:, :, s:e, :e], torch.arange(s, e, device=idx.device))
        here = h[torch.arange(B, device=idx.device), (last - s).clamp(0, e - s - 1)]
        out = here if out is None else torch.where(((last >= s) & (last < e))[:, None], here, out)
    return out


def prefill(model: GPT, idx, pos, valid):
    """Run the left-padded prompts idx (B, T) at positions pos (B, T) through the model, filling cache slots
    0..T-1; `valid` (B, S) marks the cache slots that hold real tokens. Returns the last position's logits (B, V),
    computing the LM head only there. A pad query attends to itself only, which keeps its softmax finite; no
    query attends past slot T - 1, so attention covers slots 0..T-1 only."""
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = causal & (valid[:, None, :T] | torch.eye(T, dtype=torch.bool, device=idx.device))  # (B, T, T)
    last = torch.full((idx.shape[0],), T - 1, device=idx.device)
    return model.lm_head(prefill_hidden(model, idx, pos, mask[:, None], last))


def prefill_rows(model: GPT, prompts: list[list[int]], rows, valid):
    """Prefill `prompts` into rows `rows` (n,) of the KV cache, each prompt at slots 0..len-1 and its tokens at
    positions 0..len-1, and mark those slots in `valid` (B, S) (the rest of each row: not valid). Returns each
    prompt's last logits (n, V). The prompts run right-padded as a batch of their own, with a cache of their own
    that is then copied into the rows: a pad after a prompt is never seen by it (causal), and its stale slots are
    masked until the row's new tokens overwrite them."""
    device = valid.device
    n, T = len(prompts), max(map(len, prompts))
    idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    shared = [block.attn.cache for block in model.blocks]
    model.setup_cache(n, T)
    try:
        at = torch.arange(T, device=device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
        h = prefill_hidden(model, idx, at.expand(n, T), causal, lengths - 1)
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
    the CPU it measured no faster than eager: a decode step there is bound by reading weights and cache.)"""
    return torch.compile(decode_step, fullgraph=True, mode="reduce-overhead" if device_type == "cuda" else None)


def verify_step(model: GPT, tokens, pos, valid, slots, T: int):
    """Several tokens per row, tokens (B, W) at positions pos (B, W), written to cache slots `slots` (B, W), each
    row's consecutive from its own write pointer. A token attends to the prompt (`valid` (B, S), slots 0..T-1)
    and to the slots from T up to its own: beyond lie stale entries of rejected tokens, masked out until
    overwritten. Returns logits (B, W, V)."""
    s = torch.arange(valid.shape[1], device=valid.device)
    mask = valid[:, None, :] | ((s >= T) & (s <= slots[..., None]))  # (B, W, S)
    return model(tokens, pos, mask[:, None], slots)


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
                       next_probs, generator: torch.Generator | None, eos_id: int | None, stats: dict) -> list[list[int]]:
    """Continue each row from `first` (B,), the token drawn after the prefill, by speculative decoding with
    prompt lookup: each step proposes up to `lookup` tokens per row (`propose`) and verifies them all in one
    forward pass of 1 + lookup tokens, which reads the weights and the cache once, as one token does.
    `next_probs` maps logits to the sampler's probabilities, or is None for greedy decoding. Rows accept
    different numbers of tokens, so each has its own position and cache write pointer; the entries of rejected
    tokens stay in the cache, masked out, until the row's next step overwrites them. `valid` (B, S) marks the
    prompts' cache slots, 0..T-1 left-padded. Returns up to max_new_tokens tokens per row; a row stops after
    its EOS (generate cuts there). Counts verify steps, proposed and accepted tokens into `stats`."""
    device, (B, S), T = first.device, valid.shape, max(map(len, prompts))
    lengths = valid.sum(-1)  # (B,) real prompt tokens
    out = [[t] for t in first.tolist()]
    history = [list(p) + o for p, o in zip(prompts, out)]  # what lookup searches: the prompt and the new tokens
    index = [{} for _ in range(B)]
    for ix, h in zip(index, history):
        add_ngrams(ix, h, 0)
    width = torch.arange(lookup + 1, device=device)
    live = [len(o) < max_new_tokens and o[-1] != eos_id for o in out]
    for key in ("steps", "row_steps", "proposed", "accepted"):
        stats.setdefault(key, 0)
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
        if next_probs is None:
            n, token = accept_greedy(logits, idx[:, 1:], n_proposed)
        else:
            probs = next_probs(logits.flatten(0, 1)).view(B, W, -1)
            n, token = sampling.accept_sampled(probs, idx[:, 1:], n_proposed, generator)
        stats["steps"] += 1
        for b, (k, t) in enumerate(zip(n.tolist(), token.tolist())):
            if live[b]:
                new = guesses[b][:k] + [t]
                out[b] += new
                history[b] += new
                add_ngrams(index[b], history[b], len(history[b]) - len(new) - 1)
                live[b] = len(out[b]) < max_new_tokens and eos_id not in new
                stats["row_steps"] += 1
                stats["proposed"] += len(guesses[b])
                stats["accepted"] += k
    return out


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.9,
             top_p: float = 0.9, top_k: int = 0, greedy: bool = False, seed: int = 0,
             eos_id: int | None = None, compile: bool = False, lookup: int = 0,
             stats: dict | None = None) -> list[list[int]]:
    """New tokens for each prompt (token-id lists of any lengths), each row stopping at `eos_id` (not included;
    None: exactly max_new_tokens). Rows are left-padded; per-row positions and an attention mask make every row
    decode as it would alone. `compile` runs the compiled decode step over a cache whose length is rounded up to a
    multiple of 64, so that few shapes ever occur. `lookup` > 0 decodes speculatively instead, proposing up to
    that many tokens per step by prompt lookup (see decode_with_lookup; always eager): greedy, the same tokens;
    sampled, the same distribution (not the same draws for a seed). `stats`, if given, receives the number of
    decoding steps after the prefill, and with lookup the proposed and accepted tokens."""
    check_sampling(temperature, top_p, top_k)
    if lookup < 0:
        raise UsageError(f"lookup must be >= 0, got {lookup}")
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    S = cache_length(model, T, max_new_tokens, compile)
    step = compiled_decode_step(device.type) if compile else decode_step
    idx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)  # which cache slots hold real tokens
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p)
        valid[i, T - len(p):T] = True
    idx, valid = idx.to(device), valid.to(device)
    pos = (valid[:, :T].cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1
    lengths = valid[:, :T].sum(-1)
    slots = torch.arange(S, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    stats = {} if stats is None else stats

    def next_probs(logits):
        return logits_to_probs(logits, temperature, top_p, top_k)

    def next_token(logits):
        return logits.argmax(-1) if greedy else sample_logits(logits, gen, temperature, top_p, top_k)

    model.setup_cache(B, S)
    try:
        token = next_token(prefill(model, idx, pos, valid))
        if lookup:
            rows = decode_with_lookup(model, prompts, token, valid, max_new_tokens, lookup,
                                      None if greedy else next_probs, gen, eos_id, stats)
        else:
            out = [token]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            for t in range(1, max_new_tokens):  # no host sync inside, but for the EOS check every 8 steps and
                if eos_id is not None:          # top-p's check for rows to sort in full
                    done |= token == eos_id
                    if t % 8 == 0 and done.all():
                        break
                valid[:, T + t - 1] = True
                token = next_token(step(model, token, lengths + t - 1, valid, slots[T + t - 1:T + t]))
                out.append(token)
            rows = torch.stack(out, dim=1).tolist()
            stats["steps"] = len(out) - 1
    finally:
        if not compile:  # the compiled step keeps its cache, so a CUDA graph replays on the same buffers
            model.clear_cache()
    return cut_at_eos(rows, eos_id)


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


@torch.no_grad()
def generate_stream(model: GPT, prompts: list[list[int]], max_new_tokens: int, batch_size: int, *,
                    temperature: float = 0.9, top_p: float = 0.9, top_k: int = 0, greedy: bool = False,
                    seed: int = 0, eos_id: int | None = None, compile: bool = False,
                    stats: dict | None = None, progress=None) -> list[list[int]]:
    """New tokens for each of many prompts, as `generate` gives them, decoded batch_size rows at a time, where a row
    whose summary ends (EOS or max_new_tokens) takes the next prompt at once (continuous batching): no step is
    spent on a finished row while prompts remain. With whole batches, each batch decodes until its longest summary
    ends: a third of the row-steps of SmolLM2's LoRA summaries in batches of 8 went to finished rows. Each row
    decodes as it would alone: its prompt at cache slots 0..len-1 (`prefill_rows`), then its new tokens, each
    row at its own position and slot. `stats`, if given, receives the decoding steps, the row-steps spent on
    unfinished rows ("busy") and the articles per second; `progress` (a tqdm bar), one update per summary."""
    check_sampling(temperature, top_p, top_k)
    device = model.lm_head.weight.device
    B = min(batch_size, len(prompts))
    S = cache_length(model, max(map(len, prompts)), max_new_tokens, compile)
    step = compiled_decode_step(device.type) if compile else decode_step
    gen = torch.Generator(device).manual_seed(seed)

    def next_token(logits):
        return logits.argmax(-1) if greedy else sample_logits(logits, gen, temperature, top_p, top_k)

    out: list[list[int]] = [[] for _ in prompts]
    queue = list(range(len(prompts)))[::-1]  # pop() takes the first prompt first
    owner = [-1] * B  # the prompt each row is summarizing (-1: none left)
    active = torch.zeros(B, dtype=torch.bool, device=device)  # owner >= 0, on the device
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    pointer = torch.zeros(B, dtype=torch.long, device=device)  # each row's next slot, and its next position
    every_row = torch.arange(B, device=device)
    token = torch.zeros(B, dtype=torch.long, device=device)
    stats = {} if stats is None else stats
    stats.update(steps=0, busy=0)
    start = time.perf_counter()

    def done(r: int) -> bool:
        o = out[owner[r]]
        return len(o) == max_new_tokens or o[-1] == eos_id

    def refill(rows: list[int]) -> None:
        """Give each of `rows` the next prompt, again and again while a first token ends its summary at once."""
        while rows:
            rows, idle = rows[:len(queue)], rows[len(queue):]
            for r in idle:  # no prompt left: the row attends to its slot 0 alone until the others end
                owner[r] = -1
                valid[r], valid[r, 0], pointer[r], active[r] = False, True, 0, False
            if not rows:
                return
            for r in rows:
                owner[r] = queue.pop()
            index = torch.tensor(rows, device=device)
            active[index] = True
            first = next_token(prefill_rows(model, [prompts[owner[r]] for r in rows], index, valid))
            pointer[index], token[index] = valid[index].sum(-1), first
            for r, t in zip(rows, first.tolist()):
                out[owner[r]].append(t)
            rows = [r for r in rows if done(r)]
            if progress is not None:
                progress.update(len(rows))

    model.setup_cache(B, S)
    try:
        refill(list(range(B)))
        while any(o >= 0 for o in owner):
            valid[every_row, pointer] = True
            token = next_token(step(model, token, pointer, valid, pointer[:, None]))
            pointer = torch.where(active, pointer + 1, 0)
            stats["steps"] += 1
            finished = []
            for r, t in enumerate(token.tolist()):  # a host sync per step, to refill rows at once
                if owner[r] >= 0:
                    out[owner[r]].append(t)
                    stats["busy"] += 1
                    if done(r):
                        finished.append(r)
            if progress is not None:
                progress.update(len(finished))
            refill(finished)
    finally:
        if not compile:  # the compiled step keeps its cache, so a CUDA graph replays on the same buffers
            model.clear_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats["articles_per_second"] = len(prompts) / (time.perf_counter() - start)
    return cut_at_eos(out, eos_id)


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
