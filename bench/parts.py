"""Where the time of a batch of summaries goes, per part, for our model in each precision, beside the floor that
the machine sets: the prefill (compute-bound: its matrix products against this machine's measured peak), one
decoding step of the model (bound by reading every weight and the whole KV cache: its bytes against the measured
memory bandwidth) and the sampler's share of a step (temperature, top-p, the draw).

  python3 bench/parts.py --model /folder/of/smollm2 --prompts data/cnn_dm_real/test.jsonl
  python3 bench/parts.py --model gpt2-shape --prompt-len 512

Same --model, --prompts and defaults as bench/generate.py (batch 8, up to 144 new tokens after real articles).
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from shapes import SHAPES, load_hf, load_tokenizer, make_prompts  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_bandwidth(runs: int) -> float:
    """Bytes per second of reading a 512 MiB tensor (far larger than any cache): what a decode step can hope for."""
    x = torch.ones(2 ** 27)
    return x.numel() * 4 / median_time(lambda: x.sum(), runs)


def matmul_peak(dtype, runs: int) -> float:
    """FLOP/s of a large matrix product in `dtype`: what the prefill can hope for."""
    a, b = torch.randn(2048, 1024, dtype=dtype), torch.randn(1024, 1536, dtype=dtype)
    return 2 * 2048 * 1024 * 1536 / median_time(lambda: a @ b, runs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-shape", help=f"{' or '.join(SHAPES)} (random weights), or a checkpoint")
    p.add_argument("--prompts", default="random", help="random, or a .jsonl file of articles")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512, help="tokens of a random prompt")
    p.add_argument("--max-article-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=144, help="the cache holds prompt + this many slots")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    hf = load_hf(args.model)
    model = common.from_hf(hf)
    B, V = args.batch, model.config.vocab_size
    prompts = make_prompts(args, B, V, load_tokenizer(args.model))
    T = max(map(len, prompts))
    S = T + args.new_tokens
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    valid = torch.zeros(B, S, dtype=torch.bool)
    for i, p in enumerate(prompts):
        valid[i, T - len(p):T + args.new_tokens // 2] = True  # a step halfway through the summary
    pos = (valid[:, :T].cumsum(-1) - 1).clamp(min=0)
    c = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe", "lm_head")))
    load = os.getloadavg()[0]

    bandwidth = memory_bandwidth(args.runs)
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        m = copy.deepcopy(model)
        common.prepare_inference(m, dtype)
        size = torch.finfo(dtype).bits // 8
        m.setup_cache(B, S)
        with torch.no_grad():
            prefill = median_time(lambda: common.prefill(m, idx, pos, valid), max(1, args.runs // 2))
            step = T + args.new_tokens // 2
            token, at, slot = idx[:, -1], pos[:, -1] + args.new_tokens // 2, torch.tensor([step])
            decode = median_time(lambda: common.decode_step(m, token, at, valid, slot), args.runs * 4)
            logits = common.decode_step(m, token, at, valid, slot)
            gen = torch.Generator().manual_seed(0)
            sampling = median_time(lambda: common.sample_logits(logits, gen, 0.9, 0.9),
                                   args.runs * 4)
        m.clear_cache()
        # a step reads every weight once (the head's V x C, the body), writes nothing big, and reads the cache
        weights = (body + V * c.n_embd) * size
        cache = 2 * c.n_layer * B * c.n_kv_head * S * c.head_dim * size
        flops = 2 * body * B * T + 4 * c.n_layer * B * T * T * c.n_head * c.head_dim  # matmuls + attention
        peak = matmul_peak(dtype, args.runs)
        rows.append((name, prefill, flops / peak, decode, (weights + cache) / bandwidth, weights, cache, sampling))

    print(f"\n{common.machine(torch.device('cpu'))}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} "
          f"at the end; torch {torch.__version__}; {args.model}; batch {B}, prompts of {T} tokens (left-padded), "
          f"cache of {S} slots; memory bandwidth {bandwidth / 1e9:.1f} GB/s (a 512 MiB read); median of "
          f"{args.runs}")
    print("| precision | prefill (s) | its floor (s) | decode step (ms) | its floor (ms) | weights + cache read "
          "per step (MB) | sampling per step (ms) |\n|---|---|---|---|---|---|---|")
    for name, prefill, pre_floor, decode, dec_floor, weights, cache, sampling in rows:
        print(f"| {name} | {prefill:.2f} | {pre_floor:.2f} | {decode * 1e3:.1f} | {dec_floor * 1e3:.1f} | "
              f"{weights / 1e6:.0f} + {cache / 1e6:.0f} | {sampling * 1e3:.1f} |")


if __name__ == "__main__":
    main()
