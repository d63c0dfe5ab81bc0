"""The three methods, each one change to a frozen model that starts exactly at the pretrained model: prompt
tuning, the last layer, LoRA (and its merge)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftsum.config import HARD_PROMPT
from peftsum.errors import UsageError
from peftsum.model import GPT


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


class PromptEmbedding(nn.Module):
    """Token embedding with `n` learned soft-prompt rows (Lester et al. 2021). Ids >= vocab_size select the
    soft rows, so a soft prompt is just a prefix of ids, and positions, padding and caching work as for words."""

    def __init__(self, wte: nn.Embedding, init_ids: list[int]):
        super().__init__()
        self.wte = wte
        self.prompt = nn.Parameter(wte.weight[init_ids].detach().clone())  # (n, C)

    def forward(self, idx):
        V, n = self.wte.num_embeddings, self.prompt.shape[0]
        soft = idx >= V
        words = self.wte(idx.masked_fill(soft, 0))
        prompt = self.prompt[(idx - V).clamp(0, n - 1)]
        return torch.where(soft[..., None], prompt.to(words.dtype), words)


def hard_prompt_ids(tokenizer, n: int) -> list[int]:
    """The tokens of HARD_PROMPT repeated to fill n slots."""
    ids = tokenizer.encode(HARD_PROMPT, add_special_tokens=False)
    return (ids * n)[:n]


def apply_prompt_tuning(model: GPT, init_ids: list[int]) -> GPT:
    """Train len(init_ids) soft embeddings placed before the article, initialized from the embeddings of those
    tokens (hard_prompt_ids: then the untrained soft prompt equals the --baseline). Everything else stays frozen."""
    model.requires_grad_(False)
    model.wte = PromptEmbedding(model.wte, init_ids)
    V = model.config.vocab_size
    model.prompt_ids = list(range(V, V + len(init_ids)))  # soft tokens hold positions 0..n-1 of their row
    return model


def apply_learned_separator(model: GPT, tokenizer, separator: str) -> GPT:
    """One new token between article and summary instead of `separator`'s tokens (the seed: "a new token
    separating article and summary gives a better loss curve"), its embedding trained with the method. It is one
    more soft row (see PromptEmbedding), after a soft prompt's, and starts at the mean of `separator`'s token
    embeddings."""
    ids = tokenizer.encode(separator, add_special_tokens=False)
    if not ids:
        raise UsageError("--learned-separator starts from the embeddings of --separator's tokens: give a --separator")
    if not isinstance(model.wte, PromptEmbedding):
        model.wte = PromptEmbedding(model.wte, [])
    soft = model.wte
    soft.prompt = nn.Parameter(torch.cat([soft.prompt.detach(), soft.wte.weight[ids].detach().mean(0, keepdim=True)]))
    model.separator_ids = [model.config.vocab_size + soft.prompt.shape[0] - 1]
    return model


def apply_last_layer(model: GPT) -> GPT:
    """Train the LM head only. GPT-2 (and SmolLM2) tie it to the input embeddings, so training the tied matrix
    would silently change every input embedding too: untie it first, from a copy of the same values. A head that
    is its own matrix already (TinyLlama) trains as it is."""
    model.requires_grad_(False)
    if model.lm_head.weight is model.wte.weight:
        model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    model.lm_head.weight.requires_grad_(True)
    # The frozen body has no parameter that requires grad, so autograd records nothing before the head.
    return model


def apply_full(model: GPT) -> GPT:
    """Full fine-tuning, the ceiling the methods are measured against (Hu et al. 2021 compare LoRA with it): every
    parameter trains, a tied head with its embeddings as the one matrix it is."""
    return model.requires_grad_(True)


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / rank) · B A x with W, b frozen (Hu et al. 2021). B starts at zero, so the update is
    zero and training starts exactly at the pretrained model; A gets a small random init so gradients reach B."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA reference code

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


def apply_lora(model: GPT, rank: int, alpha: float) -> GPT:
    """Low-rank updates on the q/k/v projections of every block and nothing else: GPT-2's fused `c_attn` as one
    matrix, Llama's `q_proj`, `k_proj` and `v_proj` each with its own A and B (peft's layouts). Named exactly, since
    a pattern like "c_proj" would also hit the MLP. A rank above a projection's smaller side adds parameters and
    no expressiveness, so it is refused before anything is allocated."""
    attn = model.blocks[0].attn
    limit, name = min((min(getattr(attn, n).in_features, getattr(attn, n).out_features), n) for n in attn.projections())
    if rank > limit:
        raise UsageError(f"--lora-rank {rank} is above the rank of {name}'s weight ({limit}): an update of rank r is "
                         f"at most min(in, out) = {limit}; pass --lora-rank {limit} or less")
    model.requires_grad_(False)
    for block in model.blocks:
        for name in block.attn.projections():
            setattr(block.attn, name, LoRALinear(getattr(block.attn, name), rank, alpha))
    return model


def lora_layers(model: GPT) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, e.g. 'blocks.0.attn.c_attn'."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: GPT) -> GPT:
    """Fold each update into its weight, W ← W + scale · B A, for inference with zero overhead. Our layers are
    nn.Linear, (out, in), like B A; HF's Conv1D would be (in, out), and there the update is (B A)ᵀ."""
    for name, lora in lora_layers(model).items():
        with torch.no_grad():
            lora.base.weight += lora.scale * (lora.B @ lora.A)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lora.base)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
