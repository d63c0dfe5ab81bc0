"""Our weights in transformers and peft, and peft's in ours: logits agree within 1e-4 (fp32)."""
import pytest
import torch

from peftsum.errors import UsageError
from peftsum.methods import apply_last_layer, apply_lora, apply_prompt_tuning, hard_prompt_ids
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
