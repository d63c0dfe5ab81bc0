"""Our GPT-2 against transformers' GPT2LMHeadModel on the same weights (fp32)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from peftsum.model import PackedLinear, SwiGLU, attend, attention_bias, pack_linears
from peftsum.generation import compiled_decode_step, decode_step, generate, prefill, prepare_inference


def test_logits_match_transformers(tiny, hf_model):
    model, _ = tiny
    idx = torch.randint(0, model.config.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert ours.shape == theirs.shape == (3, 50, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cached_logits_match_transformers(tiny, hf_model):
    """Prefill a prompt, then feed the rest one token at a time through the KV cache: every step's logits equal
    the full forward pass's at that position."""
    model, _ = tiny
    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    T, S = 25, 40
    with torch.no_grad():
        theirs = hf_model(idx).logits
        valid = torch.zeros(2, S, dtype=torch.bool)
        valid[:, :T] = True
        model.setup_cache(2, S)
        pos = torch.arange(T).expand(2, T)
        torch.testing.assert_close(prefill(model, idx[:, :T], pos, valid), theirs[:, T - 1], atol=1e-4, rtol=0)
        for t in range(T, S):
            valid[:, t] = True
            logits = decode_step(model, idx[:, t], torch.full((2,), t), valid, torch.tensor([t]))
            torch.testing.assert_close(logits, theirs[:, t], atol=1e-4, rtol=0)
        model.clear_cache()


def test_left_padded_batch_decodes_like_each_row_alone(tiny, hf_model):
    """Batched greedy decoding with left padding gives, row by row, the tokens of transformers' greedy generate
    on that row alone, for rows of very different lengths."""
    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (3, 60, 17, 120)]
    ours = generate(model, prompts, 20, greedy=True)
    for prompt, row in zip(prompts, ours):
        out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                                pad_token_id=tok.eos_token_id, eos_token_id=None)
        assert row == out[0, len(prompt):].tolist()


def test_generate_stops_each_row_at_eos(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    free = generate(model, prompts, 30, greedy=True)
    eos = free[0][4]  # call the 5th token of row 0 the "EOS": row 0 must stop before it
    stopped = generate(model, prompts, 30, greedy=True, eos_id=eos)
    for f, s in zip(free, stopped):
        expected = f[:f.index(eos)] if eos in f else f
        assert s == expected
    assert len(stopped[0]) <= 4


def test_compiled_decode_gives_the_same_greedy_tokens(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7], list(range(10, 50)), [8, 9]]
    eager = generate(model, prompts, 12, greedy=True)
    assert generate(model, prompts, 12, greedy=True, compile=True) == eager
    assert generate(model, prompts[:2], 12, greedy=True, compile=True) == eager[:2]  # another batch shape


def test_compiled_decode_follows_weight_changes(tiny):
    """A compiled step (a CUDA graph on CUDA) must read the weights as they are now, never a stale copy."""
    model, _ = tiny
    prompts = [[5, 6, 7], [8, 9]]
    before = generate(model, prompts, 10, greedy=True, compile=True)
    with torch.no_grad():
        model.ln_f.weight.mul_(-4.0)  # in place, like an optimizer step or merge_lora
    after = generate(model, prompts, 10, greedy=True)
    assert after != before  # the change matters ...
    assert generate(model, prompts, 10, greedy=True, compile=True) == after  # ... and the compiled step sees it


@pytest.mark.parametrize("heads,kv_heads,T", [(4, 4, 1), (6, 2, 1), (6, 2, 5), (9, 3, 16)])
def test_attend_equals_sdpa(heads, kv_heads, T):
    """The cached path's attention (two matrix products per key/value head) is scaled_dot_product_attention with
    grouped-query heads: query head h uses key/value head h // (heads / kv_heads), as transformers' repeat_kv."""
    g = torch.Generator().manual_seed(heads + T)
    B, S, D = 3, 40, 8
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((heads, T), (kv_heads, S), (kv_heads, S)))
    mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    mask[..., 0] = True  # every query sees something
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
    bias = attention_bias(mask)
    torch.testing.assert_close(attend(q, k, v, bias), expected, atol=1e-6, rtol=1e-5)
    bf16 = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)  # in bf16: within bf16's rounding
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), expected, atol=3e-2, rtol=3e-2)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
ONEDNN_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 path on this CPU (AVX2)")


@needs_onednn_bf16
def test_packed_linear_gives_the_bits_of_nn_linear_in_bf16(tiny):
    """prepare_inference packs a bf16 model's weights for oneDNN on the CPU: the same bits out, layer and model."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(32, 48, bias=bias).bfloat16()
        for shape in ((5, 32), (3, 7, 32)):
            x = torch.randn(*shape, generator=g).bfloat16()
            assert torch.equal(PackedLinear(linear)(x), linear(x))
    model.eval().to(torch.bfloat16)
    packed = pack_linears(copy.deepcopy(model))
    assert all(isinstance(m, PackedLinear) for m in (packed.lm_head, packed.blocks[0].attn.c_attn))
    idx = torch.randint(0, model.config.vocab_size, (2, 30), generator=g)
    with torch.no_grad():
        assert torch.equal(packed(idx), model(idx))
    prompts = [[5, 6, 7], list(range(10, 50))]
    assert generate(packed, prompts, 12, seed=1) == generate(model, prompts, 12, seed=1)


@needs_onednn
def test_prepare_inference_packs_bf16_on_the_cpu_only_where_onednn_can(tiny):
    """Packing a bf16 weight needs oneDNN's bf16 path (AVX-512 or AVX-NE-CONVERT): on an AVX2 CPU it raised, and
    `--dtype bf16` ended in a traceback; there the model keeps nn.Linear and still runs in bf16."""
    model, _ = tiny
    prepare_inference(model, torch.float32)
    assert type(model.lm_head) is torch.nn.Linear
    prepare_inference(model, torch.bfloat16)
    assert isinstance(model.lm_head, PackedLinear) == ONEDNN_BF16 and model.wte.weight.dtype == torch.bfloat16
    assert generate(model, [[5, 6, 7]], 4, seed=1)


@needs_onednn_bf16
def test_bf16_inference_to_compile_is_not_packed_and_compiles(tiny):
    """inductor cannot lower a weight packed by us (it packs frozen weights itself): `--compile --dtype bf16` on
    the CPU once ended in a LoweringException."""
    model, _ = tiny
    prepare_inference(model, torch.bfloat16, compile=True)
    assert type(model.lm_head) is torch.nn.Linear
    prompts = [[5, 6, 7], list(range(10, 30))]
    assert [len(r) for r in generate(model, prompts, 6, greedy=True, compile=True)] == [6, 6]
    step, S = compiled_decode_step("cpu"), 64  # the cache the compiled generate left: one step, both ways
    token, pos, slot = torch.tensor([8, 9]), torch.tensor([3, 20]), torch.tensor([21])
    valid = torch.zeros(2, S, dtype=torch.bool)
    valid[0, 17:22], valid[1, :22] = True, True
    with torch.no_grad():
        torch.testing.assert_close(step(model, token, pos, valid, slot).float(),
                                   decode_step(model, token, pos, valid, slot).float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gives_autograd_bits_and_keeps_two_tensors(dtype):
    """`SwiGLU` against silu(gate) · up as autograd runs it: the same output and gradients, bit for bit, keeping
    gate and up for the backward pass where autograd keeps silu(gate) too."""
    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(2, 33, 48, generator=g).to(dtype) for _ in range(3))

    def run(f):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = f(a, b)
        out.backward(grad)
        return out, a.grad, b.grad, {t.untyped_storage().data_ptr() for t in saved}

    *ours, kept = run(SwiGLU.apply)
    *reference, kept_by_autograd = run(lambda a, b: F.silu(a) * b)
    assert all(torch.equal(x, y) for x, y in zip(ours, reference))
    assert len(kept) == 2 and len(kept_by_autograd) == 3
