"""Our weights in transformers and peft, and peft's in ours: logits agree within 1e-4 (fp32)."""
import pytest
import torch

from peftsum.errors import UsageError
from peftsum.methods import apply_last_layer, apply_lora, apply_prompt_tuning, hard_prompt_ids, lora_layers
from peftsum.interop import export_merged, export_peft, load_model, load_peft_lora
from test_cli import run

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -r requirements.txt")


def ids(model, n=20):
    return torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))


def trained_lora(tiny_dir, rank=4, alpha=8):
    model, tok = load_model(str(tiny_dir))
    apply_lora(model, rank, alpha)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.c_attn.B.normal_(0, 0.2)  # a "trained" update
    return model, tok


def hf_base(tiny_dir):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(tiny_dir).eval()


def test_lora_exports_as_a_peft_adapter(tiny_dir, tmp_path):
    model, _ = trained_lora(tiny_dir)
    export_peft(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_base(tiny_dir), tmp_path / "adapter").eval()
    x = ids(model)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), atol=1e-4, rtol=0)
        assert (theirs(x).logits - hf_base(tiny_dir)(x).logits).abs().max() > 1e-2  # the adapter is in effect


def test_soft_prompt_exports_as_a_peft_adapter(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir))
    apply_prompt_tuning(model, hard_prompt_ids(tok, 6))
    with torch.no_grad():
        model.wte.prompt.add_(torch.randn_like(model.wte.prompt))
    export_peft(model, tmp_path / "prompt")
    theirs = peft.PeftModel.from_pretrained(hf_base(tiny_dir), tmp_path / "prompt").eval()
    x = ids(model)
    with torch.no_grad():
        ours = model(torch.cat([torch.tensor(model.prompt_ids).expand(2, -1), x], dim=1))
        logits = theirs(input_ids=x).logits
    torch.testing.assert_close(logits[:, -x.shape[1]:], ours[:, -x.shape[1]:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "last_layer"])
def test_merged_export_is_a_transformers_checkpoint(tiny_dir, tmp_path, method):
    from transformers import GPT2LMHeadModel
    if method == "lora":
        model, tok = trained_lora(tiny_dir)
    else:
        model, tok = load_model(str(tiny_dir))
        apply_last_layer(model)
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.1)
    x = ids(model)
    with torch.no_grad():
        expected = model(x)
    export_merged(model, tok, tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert hf.config.tie_word_embeddings == (method == "lora")
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-4, rtol=0)


def test_a_lora_adapter_made_by_peft_loads_into_ours(tiny_dir, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf_base(tiny_dir), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "adapter")
    model, _ = load_model(str(tiny_dir))
    apply_lora(model, 4, 16)
    load_peft_lora(tmp_path / "adapter", model)
    x = ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs.eval()(x).logits, atol=1e-4, rtol=0)
    other, _ = load_model(str(tiny_dir))
    apply_lora(other, 8, 16)
    with pytest.raises(UsageError, match="--lora-rank 4"):
        load_peft_lora(tmp_path / "adapter", other)


def test_cli_exports(tiny_dir, data_dir, tmp_path):
    from transformers import GPT2LMHeadModel
    base = ["--model", tiny_dir, "--data", data_dir, "--out", tmp_path / "runs", "--weights", tmp_path / "w.safetensors",
            "--batch-size", 4, "--test-size", 2, "--max-new-tokens", 4]
    run("main2.py", *base, "--train", "--max-steps", 2)
    p = run("main2.py", *base, "--export-peft", tmp_path / "adapter", "--export-merged", tmp_path / "merged")
    assert "wrote the peft adapter" in p.stdout and "rougeLsum" not in p.stdout  # exports, then exits
    peft.PeftModel.from_pretrained(hf_base(tiny_dir), tmp_path / "adapter")
    GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    loaded = run("main2.py", *base[:-6], "--weights", tmp_path / "adapter", "--test-size", 2, "--max-new-tokens", 4)
    assert "rougeLsum" in loaded.stdout  # the adapter folder works as --weights


def peft_adapter(base, folder, **options):
    """A LoRA adapter that peft made, with its update "trained" (B random), saved to `folder`; returns peft's model."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", **options)
    theirs = peft.get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(folder)
    return theirs.eval()


@pytest.mark.parametrize("options", [dict(use_rslora=True), dict(alpha_pattern={"h.1.attn.c_attn": 4}),
                                     dict(rank_pattern={r"transformer\.h\.0\.attn\.c_attn": 2},
                                          alpha_pattern={"h.0.attn.c_attn": 12})],
                         ids=["rslora", "alpha_pattern", "rank_and_alpha_pattern"])
def test_peft_adapters_with_rslora_or_patterns_load_with_peft_scale(tiny_dir, tmp_path, options):
    """Issue 22, item 6: rsLoRA scales by alpha / sqrt(r), and rank_pattern / alpha_pattern give a module its own r
    and alpha: loaded with alpha / r for all, the logits were wrong. Ours now equal peft's; and what we export of
    such a model, peft loads back to the same logits (rank_pattern and alpha_pattern where the layers differ)."""
    theirs = peft_adapter(hf_base(tiny_dir), tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["c_attn"],
                          fan_in_fan_out=True, **options)
    model, _ = load_model(str(tiny_dir))
    apply_lora(model, 4, 16)
    load_peft_lora(tmp_path / "adapter", model)
    x = ids(model)
    with torch.no_grad():
        expected = theirs(x).logits
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)
        wrong, _ = load_model(str(tiny_dir))  # the scale these adapters were loaded with before: alpha / r for all
        apply_lora(wrong, 4, 16)
        for mine, old in zip(lora_layers(model).values(), lora_layers(wrong).values()):
            old.A, old.B = mine.A, mine.B
        assert (wrong(x) - expected).abs().max() > 1e-3
    export_peft(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(hf_base(tiny_dir), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, atol=1e-4, rtol=0)


def test_a_llama_adapter_with_a_rank_pattern_loads_with_peft_scale(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM
    theirs = peft_adapter(LlamaForCausalLM.from_pretrained(llama_dir).eval(), tmp_path / "adapter", r=4,
                          lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], rank_pattern={"k_proj": 2},
                          alpha_pattern={"v_proj": 2})
    model, _ = load_model(str(llama_dir))
    apply_lora(model, 4, 8)
    load_peft_lora(tmp_path / "adapter", model)
    assert model.blocks[0].attn.k_proj.A.shape[0] == 2 and model.blocks[0].attn.v_proj.scale == 2 / 4
    x = ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, atol=1e-4, rtol=0)


def test_per_layer_alphas_have_no_gguf_adapter_but_merge(tiny_dir, tmp_path):
    pytest.importorskip("gguf", reason="gguf is a dependency: pip install -r requirements.txt")
    from peftsum.gguf_export import export_gguf
    peft_adapter(hf_base(tiny_dir), tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["c_attn"],
                 fan_in_fan_out=True, alpha_pattern={"h.1.attn.c_attn": 4})
    model, tok = load_model(str(tiny_dir))
    apply_lora(model, 4, 16)
    load_peft_lora(tmp_path / "adapter", model)
    with pytest.raises(UsageError, match="one alpha for all: add --gguf-merge"):
        export_gguf(model, tok, tmp_path / "a.gguf")
    assert export_gguf(model, tok, tmp_path / "m.gguf", merge=True) == "model"
