"""One decoder-only transformer that is GPT-2 or Llama (its config says which), with a preallocated KV cache, and
the inference-only forms of its layers (fused projections, oneDNN-packed bf16 weights)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


IGNORE = -100  # label of positions that carry no loss (article, separator, padding)


@dataclass
class GPTConfig:
    """The architecture. The two families differ in exactly the places that read `family`:
    GPT-2: learned positions, LayerNorm, GELU MLP, one fused q/k/v projection, biases, head tied to the embeddings.
    Llama: rotary positions (RoPE), RMSNorm, SwiGLU MLP, grouped-query attention (n_kv_head <= n_head), no biases,
    head tied or not."""
    family: str = "gpt2"  # "gpt2" or "llama"
    vocab_size: int = 50257
    n_positions: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0  # key/value heads (0: n_head)
    head_dim: int = 0  # (0: n_embd // n_head)
    n_inner: int = 0  # MLP width (0: 4 x n_embd)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama's rotary base (the checkpoint's)
    tie_head: bool = True  # the LM head is the token embedding matrix

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"unknown family {self.family!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated: (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, shape: tuple[int, int, int, int], dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(shape[0], device=device)[:, None], persistent=False)  # per-row writes

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at `slots`: (T,) shared by all rows, or (B, T) per row (speculative decoding,
        where each row has accepted a different number of tokens)."""
        if slots.dim() == 1:
            self.k[:, :, slots] = k.to(self.k.dtype)
            self.v[:, :, slots] = v.to(self.v.dtype)
        else:  # indexed as (row, slot): on the CPU far faster than scatter_ along the slots (docs/speed.md)
            self.k[self.rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, K, D)
            self.v[self.rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k, self.v


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embeddings (Su et al. 2021) at positions pos (B, T): dimension pair (i, i + head_dim/2) turns
    by pos / theta^(2i/head_dim) (the half-split layout of Hugging Face's Llama checkpoints), each row's angles
    from its own positions. Returns cos and a signed sin (B, 1, T, head_dim) for `apply_rope`, computed in float32
    and then, as transformers does, given in `dtype`: the precision of the hidden states."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, head_dim / 2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, T, head_dim) by their positions' angles: x · cos + rotate_half(x) · sin,
    where rotate_half(x) = (-x2, x1) for the halves x1, x2 of x, here x rolled by half its length times the signed
    sin (-sin, sin): the same products, bit for bit, in fewer operations."""
    cos, sin = rope
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """Llama's norm: x / rms(x) · weight, computed in float32 (as the reference does) whatever the input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(c: GPTConfig) -> nn.Module:
    return RMSNorm(c.n_embd, c.norm_eps) if c.family == "llama" else nn.LayerNorm(c.n_embd, eps=c.norm_eps)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        self.fused = c.family == "gpt2"
        if self.fused:  # GPT-2 stores one q/k/v projection, and LoRA adapts it as one matrix
            self.c_attn = nn.Linear(c.n_embd, q_dim + 2 * kv_dim)
        else:  # Llama: three projections, each a LoRA target of its own (peft's layout)
            self.q_proj = nn.Linear(c.n_embd, q_dim, bias=False)
            self.k_proj = nn.Linear(c.n_embd, kv_dim, bias=False)
            self.v_proj = nn.Linear(c.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(q_dim, c.n_embd, bias=c.family == "gpt2")
        self.cache: KVCache | None = None

    def projections(self) -> list[str]:
        """The names of the q/k/v projection layers: what LoRA adapts."""
        return ["c_attn"] if self.fused else ["q_proj", "k_proj", "v_proj"]

    def heads(self, x, rope):
        """Queries (B, H, T, D), keys and values (B, K, T, D) of x (B, T, C), queries and keys rotated by `rope`
        (if given): with one projection, as one tensor of H + K heads."""
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.fused:
            qk, v = self.c_attn(x).split([(H + K) * D, K * D], dim=2)
            qk = qk.view(B, T, H + K, D).transpose(1, 2)
            q, k = (qk if rope is None else apply_rope(qk, rope)).split([H, K], dim=1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, K, D).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v.view(B, T, K, D).transpose(1, 2)

    def forward(self, x, rope, mask, slots):
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.heads(x, rope)
        if slots is None:  # training: causal attention over this input alone
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask, enable_gqa=K != H)
        else:  # with the KV cache, over the slots the mask covers: (B, K, S, D), only the K key/value heads; with
            # few queries `hidden` made the mask a bias for `attend`
            k, v = self.cache.update(slots, k, v)
            if k.shape[2] > mask.shape[-1] or k.dtype != q.dtype:  # a no-op slice and cast cost time too
                k, v = k[:, :, :mask.shape[-1]].to(q.dtype), v[:, :, :mask.shape[-1]].to(q.dtype)
            y = attend(q, k, v, mask) if mask.is_floating_point() else \
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


FEW_QUERIES = 16  # new tokens per row up to which cached attention is two matrix products (decode, verify)


def attention_bias(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask (B, 1, T, S), True where a query may attend, as what `attend` adds to the scores: 0 there,
    -inf elsewhere, float32 (B, 1, 1, T, S). Made once per forward pass, for every layer."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, -math.inf)[:, :, None]


def attend(q, k, v, bias):
    """Attention of a few queries q (B, H, T, D) over keys and values k, v (B, K, S, D), masked by `bias`
    (`attention_bias`): the same as scaled_dot_product_attention with enable_gqa, as two matrix products per
    key/value head, each with its group of G = H / K query heads (G · T rows), softmax in float32. A decode step
    is bound by reading the cache; this reads it once, in the model's precision, where the CPU's SDPA kernel is
    many times slower in bf16, with a mask or without (measured in docs/speed.md)."""
    assert bias.is_floating_point(), "attend takes attention_bias(mask), not the mask"
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    # (B·K, G·T, S): query head h uses key/value head h // G
    scores = torch.bmm(q.reshape(B * K, H // K * T, D), k.reshape(B * K, S, D).transpose(1, 2))
    scores = torch.add(bias, scores.view(B, K, H // K, T, S), alpha=D ** -0.5)  # float32: scaled, masked
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B * K, H // K * T, S)
    return torch.bmm(probs, v.reshape(B * K, S, D)).view(B, H, T, D)


class MLP(nn.Module):
    """GPT-2: c_proj(gelu(c_fc(x))). Llama (SwiGLU): down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.swiglu = c.family == "llama"
        if self.swiglu:
            self.gate_proj = nn.Linear(c.n_embd, c.n_inner, bias=False)
            self.up_proj = nn.Linear(c.n_embd, c.n_inner, bias=False)
            self.down_proj = nn.Linear(c.n_inner, c.n_embd, bias=False)
            self.gate_up: nn.Linear | None = None  # both in one, for inference (see `fuse_projections`)
        else:
            self.c_fc = nn.Linear(c.n_embd, c.n_inner)
            self.c_proj = nn.Linear(c.n_inner, c.n_embd)

    def forward(self, x):
        if not self.swiglu:
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(SwiGLU.apply(gate, up) if gate.requires_grad else F.silu(gate) * up)


class SwiGLU(torch.autograd.Function):
    """silu(gate) · up in training, keeping only gate and up for the backward pass, which computes silu(gate) again:
    autograd would also keep silu(gate), a third tensor as large (0.4 GB of a SmolLM2 step at batch 8). The same
    gradients, bit for bit: the same operations as autograd's in the same order."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate) if ctx.needs_input_grad[0] else None
        return d_gate, (grad * F.silu(gate)).to(up.dtype) if ctx.needs_input_grad[1] else None


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(c)
        self.attn = Attention(c)
        self.ln_2 = make_norm(c)
        self.mlp = MLP(c)

    def forward(self, x, rope, mask, slots):
        x = x + self.attn(self.ln_1(x), rope, mask, slots)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        # GPT-2 adds a learned position embedding to the input; Llama rotates queries and keys instead (RoPE)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd) if c.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = make_norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_head:
            self.lm_head.weight = self.wte.weight
        self.prompt_ids: list[int] = []  # token ids every input starts with (a hard or a soft prompt)
        self.separator_ids: list[int] | None = None  # between article and summary (None: the --separator text's)
        self.gradient_checkpointing = False  # keep only each block's input for backward, recompute the rest
        self.name = ""  # the checkpoint it came from, as the user named it

    def hidden(self, idx, pos=None, mask=None, slots=None):
        """Final hidden states (B, T, C) of token ids `idx` (B, T).
        pos: (B, T) absolute positions (default 0..T-1); mask: (B, 1, T, S) bool, True where a query may attend
        (default causal); slots: KV-cache slots to write, (T,) for every row or (B, T) per row (default: no cache);
        attention then runs over the whole cache, masked (with few queries, by `attend`: the mask becomes its
        bias here, once for every layer)."""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)[None]
        x, rope = self.wte(idx), None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = rope_angles(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        if slots is not None and idx.shape[1] <= FEW_QUERIES:  # the cached path's `attend`
            mask = attention_bias(mask)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:  # with checkpointing, backward runs each block's forward again, then its backward
            x = checkpoint(block, x, rope, mask, slots, use_reentrant=False) if recompute else \
                block(x, rope, mask, slots)
        return self.ln_f(x)

    def forward(self, idx, pos=None, mask=None, slots=None, targets=None):
        """Logits (B, T, vocab); with `targets` (B, T), the summed cross-entropy over the positions whose target
        is not IGNORE instead, computing the LM head there only: the article's positions (~90 % of a CNN/DM
        example) need no logits. `idx` may also be final hidden states (B, T, C) computed earlier by a frozen
        body (see `cache_features`); then only the head runs."""
        h = idx if idx.is_floating_point() else self.hidden(idx, pos, mask, slots)
        if targets is None:
            return self.lm_head(h)
        keep = targets != IGNORE
        return F.cross_entropy(self.lm_head(h[keep]).float(), targets[keep], reduction="sum")

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Preallocate the KV cache; an existing one of the same shape is kept (its stale entries are masked)."""
        c, w = self.config, self.lm_head.weight
        shape = (batch, c.n_kv_head, max_len, c.head_dim)
        for block in self.blocks:
            cache = block.attn.cache
            if cache is None or cache.k.shape != shape or cache.k.dtype != w.dtype or cache.k.device != w.device:
                block.attn.cache = KVCache(shape, w.dtype, w.device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None


class PackedLinear(nn.Module):
    """An inference-only nn.Linear for bf16 on the CPU, its weight packed once into oneDNN's blocked layout, the
    layout oneDNN's bf16 kernels compute in. nn.Linear hands oneDNN the plain weight, which it repacks at every
    call, so a decode step reads each weight twice and writes it once; packed, it reads it once: the same bits
    out (tested), in less time (docs/speed.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose outputs are those of `linears`, one after the other."""
    weight = torch.cat([l.weight for l in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return fused


def fuse_projections(model: GPT) -> GPT:
    """For inference (after merge_lora): each Llama layer's q/k/v projections become one, as GPT-2's c_attn, and
    its gate and up projections one: 4 matrix products per layer instead of 7, each as many bytes of weights. A
    decode step at batch 8 is so small that each call's fixed cost counts."""
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if not attn.fused:
            attn.c_attn = concat_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.fused = True
        if mlp.swiglu and mlp.gate_up is None:
            mlp.gate_up = concat_linears(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj
    return model


def can_pack(model: GPT) -> bool:
    """Whether PackedLinear can run here: a bf16 model on a CPU whose oneDNN has a bf16 path (AVX-512 or
    AVX-NE-CONVERT; on an AVX2 CPU packing raises, and --dtype bf16 runs plain, emulated nn.Linear)."""
    w, mkldnn = model.lm_head.weight, torch.ops.mkldnn
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_is_mkldnn_bf16_supported")
            and mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: GPT) -> GPT:
    """Every nn.Linear of a bf16 model on the CPU becomes a PackedLinear (after merge_lora: for inference only; a
    tied LM head gets a packed copy of the embeddings, which the input lookup keeps using)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear(module))
    return model
