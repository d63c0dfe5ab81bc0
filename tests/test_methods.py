"""The three methods: trainable counts on GPT-2 small, each starts at the pretrained model, what each trains."""
import pytest
import torch

from peftsum.model import GPT, GPTConfig
from peftsum.methods import (LoRALinear, apply_last_layer, apply_lora, apply_prompt_tuning, count_parameters,
                             hard_prompt_ids, merge_lora)
from peftsum.generation import generate
from peftsum.interop import load_model


@pytest.fixture(scope="module")
def gpt2_small_counts(tiny_dir):
    """Trainable parameters of each method on a GPT-2-small-shaped model (random weights: counts need no values)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)  # any tokenizer: only the prompt's ids are taken from it
    small = lambda: GPT(GPTConfig())
    assert count_parameters(small())[1] == 124_439_808  # GPT-2 small
    return {"prompt_tuning": count_parameters(apply_prompt_tuning(small(), hard_prompt_ids(tok, 24)))[0],
            "last_layer": count_parameters(apply_last_layer(small()))[0],
            "lora": count_parameters(apply_lora(small(), 16, 32))[0]}


@pytest.mark.parametrize("method,expected", [("prompt_tuning", 18_432), ("last_layer", 38_597_376),
                                             ("lora", 589_824)])
def test_trainable_counts_on_gpt2_small(gpt2_small_counts, method, expected):
    assert gpt2_small_counts[method] == expected


def test_prompt_tuning_starts_at_the_hard_prompt_baseline(tiny_dir):
    """The soft prompt is initialized from the hard prompt's embeddings and holds positions 0..n-1, so before
    training the prompt-tuned model gives exactly the logits of GPT-2 reading the hard prompt."""
    model, tok = load_model(str(tiny_dir))
    article = tok.encode(" the police said a man was arrested")
    hard = hard_prompt_ids(tok, 7)
    with torch.no_grad():
        ref = model(torch.tensor([hard + article]))
        apply_prompt_tuning(model, hard)
        assert len(model.prompt_ids) == 7 and min(model.prompt_ids) >= model.config.vocab_size
        soft = model(torch.tensor([model.prompt_ids + article]))
    torch.testing.assert_close(soft, ref, atol=1e-5, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["wte.prompt"]


def test_soft_tokens_hold_positions_zero_to_n_in_a_left_padded_batch(tiny_dir):
    """Generation with a soft prompt behind left padding decodes exactly like the row alone."""
    model, tok = load_model(str(tiny_dir))
    apply_prompt_tuning(model, hard_prompt_ids(tok, 5))
    with torch.no_grad():
        model.wte.prompt.add_(torch.randn_like(model.wte.prompt))  # a "trained" prompt, unlike any word
    short, long = model.prompt_ids + [5, 6, 7], model.prompt_ids + list(range(10, 60))
    batched = generate(model, [short, long], 10, greedy=True)
    assert batched == [generate(model, [short], 10, greedy=True)[0],
                       generate(model, [long], 10, greedy=True)[0]]


def test_last_layer_is_untied_and_trains_only_the_head(tiny):
    model, _ = tiny
    wte = model.wte.weight.detach().clone()
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(x)
    apply_last_layer(model)
    assert model.lm_head.weight is not model.wte.weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    torch.testing.assert_close(model(x), before)  # untying alone changes nothing
    assert not model.hidden(x).requires_grad  # the frozen body records no autograd graph
    opt = torch.optim.SGD([model.lm_head.weight], lr=1.0)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(model.lm_head.weight, wte)  # the head moved ...
    assert torch.equal(model.wte.weight, wte)  # ... and the input embeddings did not


def test_lora_is_identity_at_init_and_merge_keeps_outputs(tiny):
    model, _ = tiny
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(x)
        apply_lora(model, rank=4, alpha=8)
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # B = 0: exactly the pretrained model
        for block in model.blocks:
            block.attn.c_attn.B.normal_()  # a "trained" update
        adapted = model(x)
        assert (adapted - before).abs().max() > 1e-2
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)


def test_lora_targets_c_attn_only(tiny):
    model, _ = tiny
    apply_lora(model, rank=2, alpha=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"blocks.{i}.attn.c_attn.{ab}" for i in range(2) for ab in "AB"]
    assert all(b.attn.c_attn.scale == 2.0 for b in model.blocks)  # alpha / rank
