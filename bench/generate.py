"""Generation speed: our KV-cached sampler vs Hugging Face `generate`, on the same GPT-2-small-shaped weights.

Random weights (speed does not depend on the values; nothing to download), fp32, on whatever device is given.
Both sides sample with temperature 0.9 and top-p 0.9 (top-k off) and generate exactly --new-tokens tokens per
row from prompts of --prompt-len tokens. Runs alternate after a warm-up; the median of --runs is reported.

  python3 bench/generate.py                      # CPU, batch 8 and 1, fp32
  python3 bench/generate.py --device cuda --batches 8 64 --dtype bf16 --compile

The last line is `speedup: X.XX`: HF time / ours at the first batch size, medians.
"""
import argparse
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="compile our decode step")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    ours = common.from_hf(hf).to(device=device, dtype=dtype).eval()
    hf = hf.to(device=device, dtype=dtype)
    sampling = dict(temperature=0.9, top_p=0.9)

    def run_ours(prompts):
        return common.generate(ours, prompts, args.new_tokens, top_k=0, seed=0, compile=args.compile, **sampling)

    def run_hf(ids):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               pad_token_id=50256, **sampling)

    rows = []
    for batch in args.batches:
        ids = torch.randint(0, 50257, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        prompts = ids.tolist()
        ids = ids.to(device)
        assert all(len(r) == args.new_tokens for r in run_ours(prompts))  # warm-up (and compile)
        assert run_hf(ids).shape[1] == args.prompt_len + args.new_tokens
        t_ours, t_hf = [], []
        for _ in range(args.runs):
            t_hf.append(timed(lambda: run_hf(ids), device))
            t_ours.append(timed(lambda: run_ours(prompts), device))
        rows.append((batch, statistics.median(t_hf), statistics.median(t_ours)))
        print(f"batch {batch}: HF {t_hf} s, ours {t_ours} s", flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{where}; torch {torch.__version__}; {args.dtype}; compile {args.compile}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; median of {args.runs}")
    print("| batch | HF generate (s) | ours (s) | speedup |\n|---|---|---|---|")
    for batch, h, o in rows:
        print(f"| {batch} | {h:.2f} | {o:.2f} | {h / o:.2f} |")
    print(f"speedup: {rows[0][1] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
