"""Generation speed: our KV-cached sampler, without and with prompt-lookup speculative decoding, vs Hugging Face
`generate` (and, at batch 1, its own prompt lookup, `prompt_lookup_num_tokens`), on the same weights and prompts.

Default: random GPT-2-small-shaped weights and random prompts (nothing to download). Speed without lookup does
not depend on the values, but lookup's does: random prompts never match, so it shows only the cost of lookup.
To see its gains, give prompts that a summary copies from and a model that copies: --prompts repeat (a random
32-token phrase repeated; with random weights only greedy decoding, which tends to loop, copies anything) or
--prompts FILE.jsonl (CNN/DM articles, tokenized with the model's tokenizer) with --model (a checkpoint folder
or hub name). Both sides sample with temperature 0.9 and top-p 0.9 (top-k off), or decode greedily (--greedy),
and generate exactly --new-tokens tokens per row from prompts of --prompt-len tokens. Runs alternate after a
warm-up; the median of --runs is reported, and for lookup the accepted tokens per row and verify step.

  python3 bench/generate.py                      # CPU, batch 8 and 1, fp32
  python3 bench/generate.py --model DIR --prompts ../shared/data/cnn_dm_real/test.jsonl --batches 1 8
  python3 bench/generate.py --device cuda --batches 8 64 --dtype bf16 --compile

The last line is `speedup: X.XX`: HF time / ours (lookup off) at the first batch size, medians.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def load(args):
    """(ours, hf, tokenizer or None) on the same weights."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.model:
        ours, tokenizer = common.load_model(args.model)
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        hf, tokenizer = GPT2LMHeadModel(GPT2Config()), None
        ours = common.from_hf(hf)
    return ours.eval(), hf.eval(), tokenizer


def make_prompts(args, batch: int, vocab_size: int, tokenizer) -> list[list[int]]:
    """`batch` prompts of exactly --prompt-len tokens."""
    g = torch.Generator().manual_seed(batch)
    if args.prompts == "random":
        return torch.randint(0, vocab_size, (batch, args.prompt_len), generator=g).tolist()
    if args.prompts == "repeat":
        phrases = torch.randint(0, vocab_size, (batch, 32), generator=g)
        return phrases.repeat(1, -(-args.prompt_len // 32))[:, :args.prompt_len].tolist()
    if tokenizer is None:
        sys.exit("--prompts FILE needs --model (for its tokenizer)")
    sep = tokenizer.encode(" TL;DR:")
    articles = (tokenizer.encode(json.loads(line)["article"]) for line in open(args.prompts))
    ids = [a[:args.prompt_len - len(sep)] + sep for a in articles if len(a) >= args.prompt_len - len(sep)][:batch]
    if len(ids) < batch:
        sys.exit(f"{args.prompts}: fewer than {batch} articles of at least {args.prompt_len} tokens")
    return ids


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="compile our decode step (the lookup path runs eagerly)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lookup", type=int, default=4, help="proposed tokens per verify step, ours and HF's")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--model", default="", help="checkpoint folder or hub name (default: random GPT-2 small)")
    p.add_argument("--prompts", default="random", help="random | repeat | a .jsonl file of articles")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ours, hf, tokenizer = load(args)
    ours, hf = ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)
    sampling = dict(greedy=True) if args.greedy else dict(temperature=0.9, top_p=0.9)
    hf_sampling = dict(do_sample=False) if args.greedy else dict(do_sample=True, temperature=0.9, top_p=0.9)

    def run_ours(prompts, lookup=0, stats=None):
        return common.generate(ours, prompts, args.new_tokens, top_k=0, seed=0, compile=args.compile, lookup=lookup,
                               stats=stats, **sampling)

    def run_hf(ids, lookup=0):
        extra = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), top_k=0, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, pad_token_id=hf.config.eos_token_id, **hf_sampling,
                               **extra)

    rows = []
    for batch in args.batches:
        prompts = make_prompts(args, batch, ours.config.vocab_size, tokenizer)
        ids = torch.tensor(prompts, device=device)
        runs = {"HF": lambda: run_hf(ids), "ours": lambda: run_ours(prompts),
                f"ours, lookup {args.lookup}": lambda: run_ours(prompts, args.lookup)}
        if batch == 1:  # transformers' prompt lookup takes one row at a time
            runs[f"HF, lookup {args.lookup}"] = lambda: run_hf(ids, args.lookup)
        stats = {}
        assert all(len(r) == args.new_tokens for r in run_ours(prompts))  # warm-up (and compile)
        assert all(len(r) == args.new_tokens for r in run_ours(prompts, args.lookup, stats))
        assert run_hf(ids).shape[1] == args.prompt_len + args.new_tokens
        times = {name: [] for name in runs}
        for _ in range(args.runs):
            for name, fn in runs.items():
                times[name].append(timed(fn, device))
        accepted = stats["accepted"] / stats["row_steps"]
        rows.append((batch, {name: statistics.median(t) for name, t in times.items()}, accepted))
        print(f"batch {batch}: " + "; ".join(f"{name} {[round(x, 2) for x in t]} s" for name, t in times.items())
              + f"; lookup accepted {accepted:.2f} tokens per row and verify step "
                f"({stats['accepted']} of {stats['proposed']} proposed)", flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{where}; torch {torch.__version__}; {args.dtype}; compile {args.compile}; {args.model or 'random GPT-2'}"
          f" weights, {args.prompts} prompts; {'greedy' if args.greedy else 'sampled'}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; median of {args.runs}")
    k = args.lookup
    print(f"| batch | HF generate (s) | ours (s) | speedup | ours, lookup {k} (s) | accepted per step | "
          f"lookup speedup | HF, lookup {k} (s) |\n|---|---|---|---|---|---|---|---|")
    for batch, t, accepted in rows:
        hf_lookup = f"{t[f'HF, lookup {k}']:.2f}" if f"HF, lookup {k}" in t else "-"
        print(f"| {batch} | {t['HF']:.2f} | {t['ours']:.2f} | {t['HF'] / t['ours']:.2f} | "
              f"{t[f'ours, lookup {k}']:.2f} | {accepted:.2f} | {t['ours'] / t[f'ours, lookup {k}']:.2f} | {hf_lookup} |")
    print(f"speedup: {rows[0][1]['HF'] / rows[0][1]['ours']:.2f}")


if __name__ == "__main__":
    main()
