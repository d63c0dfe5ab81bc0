"""The Llama family in the same model: parity with transformers' LlamaForCausalLM (fp32), decoding, the three
methods, loading rules and interop. Tiny random checkpoints (conftest.llama_dir), with grouped-query attention and
a tied head, and with one key/value head per query head and an untied head."""
import json

import pytest
import torch

from peftsum.errors import UsageError
from peftsum.config import Config
from peftsum.model import GPT, GPTConfig
from peftsum.methods import (apply_last_layer, apply_lora, apply_prompt_tuning, count_parameters, hard_prompt_ids,
                             lora_layers, merge_lora, trainable_state)
from peftsum.data import CHAT_INSTRUCTION, encode_examples, encode_prompts
from peftsum.generation import decode_step, generate, prefill, prepare_inference
from peftsum.interop import config_from_hf, export_merged, export_peft, load_model, load_peft_lora, model_source


def hf_llama(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder).eval()


def random_ids(model, shape, seed=0):
    return torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_config_is_read_from_the_checkpoint(llama_dir):
    model, _ = load_model(str(llama_dir))
    c, hc = model.config, hf_llama(llama_dir).config
    assert c.family == "llama" and model.wpe is None
    assert (c.n_head, c.n_kv_head, c.head_dim, c.rope_theta) == (4, hc.num_key_value_heads, 8, 500.0)
    assert c.tie_head == hc.tie_word_embeddings == (model.lm_head.weight is model.wte.weight)


def test_logits_match_transformers(llama_dir):
    model, _ = load_model(str(llama_dir))
    idx = random_ids(model, (3, 60))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_llama(llama_dir)(idx).logits, atol=1e-4, rtol=0)


def test_cached_logits_match_transformers(llama_dir):
    """Prefill, then one token at a time through the cache, which holds only the key/value heads."""
    model, _ = load_model(str(llama_dir))
    idx = random_ids(model, (2, 40), seed=1)
    T, S = 25, 40
    with torch.no_grad():
        theirs = hf_llama(llama_dir)(idx).logits
        valid = torch.zeros(2, S, dtype=torch.bool)
        valid[:, :T] = True
        model.setup_cache(2, S)
        assert model.blocks[0].attn.cache.k.shape == (2, model.config.n_kv_head, S, 8)
        logits = prefill(model, idx[:, :T], torch.arange(T).expand(2, T), valid)
        torch.testing.assert_close(logits, theirs[:, T - 1], atol=1e-4, rtol=0)
        for t in range(T, S):
            valid[:, t] = True
            logits = decode_step(model, idx[:, t], torch.full((2,), t), valid, torch.tensor([t]))
            torch.testing.assert_close(logits, theirs[:, t], atol=1e-4, rtol=0)
        model.clear_cache()


def test_left_padded_batch_decodes_like_each_row_alone_and_like_transformers(llama_dir):
    """Each row's rotary angles come from its own positions, so left padding changes nothing."""
    model, tok = load_model(str(llama_dir))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 70, 18, 120)]
    batched = generate(model, prompts, 16, greedy=True)
    hf = hf_llama(llama_dir)
    for prompt, row in zip(prompts, batched):
        assert row == generate(model, [prompt], 16, greedy=True)[0]
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                          pad_token_id=tok.eos_token_id, eos_token_id=None)
        assert row == out[0, len(prompt):].tolist()


def test_compiled_decode_gives_the_same_greedy_tokens(llama_dirs):
    model, _ = load_model(str(llama_dirs["gqa-tied"]))  # one variant: compiling costs seconds
    prompts = [[5, 6, 7], list(range(10, 50))]
    assert generate(model, prompts, 10, greedy=True, compile=True) == \
        generate(model, prompts, 10, greedy=True)


def test_inference_fuses_projections_and_computes_the_same(llama_dirs):
    """prepare_inference makes q/k/v one projection and gate/up one (fewer, larger matrix products): in float32
    the same logits (within 1e-5; bit for bit on the CPUs measured) and the same greedy tokens, with the cache."""
    for folder in llama_dirs.values():
        model, _ = load_model(str(folder))
        idx = random_ids(model, (2, 30))
        prompts = [[5, 6, 7], list(range(10, 50))]
        with torch.no_grad():
            logits, tokens = model(idx), generate(model, prompts, 10, greedy=True)
            prepare_inference(model, torch.float32)
            attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
            assert attn.fused and attn.projections() == ["c_attn"] and not hasattr(attn, "q_proj")
            assert mlp.gate_up is not None and not hasattr(mlp, "gate_proj")
            torch.testing.assert_close(model(idx), logits, atol=1e-5, rtol=0)
            assert generate(model, prompts, 10, greedy=True) == tokens


SMOLLM2_135M = GPTConfig("llama", vocab_size=49152, n_positions=8192, n_layer=30, n_head=9, n_embd=576,
                                n_kv_head=3, head_dim=64, n_inner=1536, rope_theta=100000.0, tie_head=True)


@pytest.mark.parametrize("method,expected", [("prompt_tuning", 13_824), ("last_layer", 28_311_552),
                                             ("lora", 1_290_240)])
def test_trainable_counts_on_smollm2_135m(method, expected):
    """24 x 576; 49,152 x 576; 30 x 16 x ((576 + 576) + 2 x (576 + 192)). Shapes only, on the meta device."""
    apply = {"prompt_tuning": lambda m: apply_prompt_tuning(m, [0] * 24),
             "last_layer": apply_last_layer, "lora": lambda m: apply_lora(m, 16, 32)}[method]
    with torch.device("meta"):
        model = GPT(SMOLLM2_135M)
        assert count_parameters(model)[1] == 134_515_008  # SmolLM2-135M
        assert count_parameters(apply(model))[0] == expected


def test_lora_adapts_q_k_v_each_with_its_own_matrices_and_merges(llama_dir):
    model, _ = load_model(str(llama_dir))
    x = random_ids(model, (2, 16))
    with torch.no_grad():
        before = model(x)
        apply_lora(model, rank=4, alpha=8)
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # B = 0: the pretrained model
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable == [f"blocks.{i}.attn.{proj}.{ab}" for i in range(2) for proj in ("q_proj", "k_proj", "v_proj")
                             for ab in "AB"]
        kv = model.config.n_kv_head * 8
        assert model.blocks[0].attn.k_proj.B.shape == (kv, 4) and model.blocks[0].attn.q_proj.B.shape == (32, 4)
        for layer in lora_layers(model).values():
            layer.B.normal_()
        adapted = model(x)
        assert (adapted - before).abs().max() > 1e-2
        merge_lora(model)
        assert not lora_layers(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)


def test_last_layer_unties_a_tied_head_and_keeps_an_untied_one(llama_dir):
    model, _ = load_model(str(llama_dir))
    head, tied = model.lm_head.weight, model.config.tie_head
    apply_last_layer(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    assert model.lm_head.weight is not model.wte.weight
    assert (model.lm_head.weight is head) == (not tied)  # an untied head is trained as it is, not replaced
    torch.testing.assert_close(model.lm_head.weight, head)


def test_prompt_tuning_starts_at_the_hard_prompt_after_the_bos(llama_dir):
    """The tokenizer puts <s> before every text; our examples have it once, at the very start, before the prompt."""
    model, tok = load_model(str(llama_dir))
    cfg = Config(max_summary_tokens=16)
    rows = [{"id": "a", "article": "The police said a man was arrested.", "highlights": "A man was arrested."}]
    hard = hard_prompt_ids(tok, 5)
    assert tok.bos_token_id not in hard
    (ids, n_context), = encode_examples(rows, tok, hard, cfg, 256)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids[1:6] == hard
    assert ids[-1] == tok.eos_token_id
    with torch.no_grad():
        ref = model(torch.tensor([ids]))
        apply_prompt_tuning(model, hard)
        (soft_ids, _), = encode_examples(rows, tok, model.prompt_ids, cfg, 256)
        torch.testing.assert_close(model(torch.tensor([soft_ids])), ref, atol=1e-5, rtol=0)


def test_chat_format_wraps_the_article_in_the_template(llama_dirs):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llama_dirs["gqa-tied"])
    cfg = Config(chat=True, max_new_tokens=8)
    rows = [{"id": "a", "article": "The team won the final match.", "highlights": "x"}]
    (prompt,), n_cut = encode_prompts(rows, tok, [], cfg, 256)
    text = tok.decode(prompt)
    assert text.startswith("<|user|>\n" + CHAT_INSTRUCTION) and text.endswith("</s>\n<|assistant|>\n")
    assert "The team won the final match." in text and n_cut == 0
    cut, n_cut = encode_prompts(rows, tok, [], Config(chat=True, max_article_tokens=2), 256)
    assert n_cut == 1 and tok.decode(cut[0]).endswith("</s>\n<|assistant|>\n")  # the article is cut, not the template


def test_prompt_tuning_in_the_chat_format_starts_at_the_chat_template_zero_shot(llama_dirs, tmp_path):
    """Issue 25, item 8: with --chat the soft prompt takes the instruction's place in the user's turn, starting
    from the instruction's tokens, so the untrained prompt-tuned model gives the chat baseline's logits; trained,
    its record says how many tokens it has, an evaluation follows it, and another --prompt-tokens is refused."""
    from peftsum.data import chat_instruction_ids
    from conftest import cli
    model, tok = load_model(str(llama_dirs["gqa-tied"]))
    cfg = Config(chat=True, max_summary_tokens=16)
    rows = [{"id": "a", "article": "The police said a man was arrested.", "highlights": "A man was arrested."}]
    (ids, n_context), = encode_examples(rows, tok, [], cfg, 256)
    init = chat_instruction_ids(tok)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))
        apply_prompt_tuning(model, init)
        (soft_ids, n_soft), = encode_examples(rows, tok, model.prompt_ids, cfg, 256)
        assert n_soft == n_context and [i >= model.config.vocab_size for i in soft_ids].count(True) == len(init)
        torch.testing.assert_close(model(torch.tensor([soft_ids])), ref, atol=1e-5, rtol=0)

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(dict(r, id=f"{split}{i}")) + "\n"
                                                     for i, r in enumerate(rows * 4)))
    flags = ["--model", llama_dirs["gqa-tied"], "--data", data, "--out", tmp_path / "runs", "--max-new-tokens", 4]
    train = ["--train", "--chat", "--batch-size", 2, "--warmup-steps", 1]
    trained = cli("main.py", *flags, *train, "--max-steps", 2, "--weights", tmp_path / "w.safetensors")
    assert trained.returncode == 0, trained.stderr[-2000:]
    record = json.loads((tmp_path / "runs" / "prompt_tuning.json").read_text())
    assert record["hparams"]["prompt_tokens"] == len(init) and record["config"]["chat"] is True
    again = cli("main.py", *flags, "--weights", tmp_path / "w.safetensors", "--run-name", "again")  # no --chat
    assert again.returncode == 0 and "| chat template" in again.stdout, again.stderr[-2000:]
    refused = cli("main.py", *flags, *train, "--prompt-tokens", 3, "--weights", tmp_path / "v.safetensors")
    assert refused.returncode == 2 and f"instruction's {len(init)} tokens" in refused.stderr, refused.stderr
    export = cli("main.py", *flags, "--weights", tmp_path / "w.safetensors", "--export-peft", tmp_path / "adapter")
    assert export.returncode == 2 and "where a peft adapter cannot put it" in export.stderr, export.stderr
    assert not (tmp_path / "adapter").exists()


def test_other_architectures_are_refused_with_the_supported_families(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="unsupported architecture 'gpt_neox'.*GPT-2.*Llama"):
        load_model(str(tmp_path))


def test_llama_variants_we_do_not_compute_are_refused():
    from transformers import LlamaConfig
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UsageError, match="rope scaling 'linear'"):
        config_from_hf(scaled)
    with pytest.raises(UsageError, match="attention biases"):
        config_from_hf(LlamaConfig(attention_bias=True))


def test_a_checkpoint_missing_weights_is_refused_not_filled_at_random(llama_dirs, tmp_path):
    """transformers initializes missing weights at random and only warns; we refuse."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "partial"
    shutil.copytree(llama_dirs["gqa-tied"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError, match="lacks weights.*up_proj"):
        load_model(str(folder))


def test_model_source_finds_gguf_files_and_packages(tmp_path, monkeypatch):
    (tmp_path / "pkg_with_gguf").mkdir()
    (tmp_path / "pkg_with_gguf" / "__init__.py").write_text("")
    (tmp_path / "pkg_with_gguf" / "Model.Q4_1.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert model_source("pkg-with-gguf") == (str(tmp_path / "pkg_with_gguf"), {"gguf_file": "Model.Q4_1.gguf"})
    gguf = tmp_path / "pkg_with_gguf" / "Model.Q4_1.gguf"
    assert model_source(str(gguf)) == (str(gguf.parent), {"gguf_file": gguf.name})
    assert model_source("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", {})
    for missing in (str(tmp_path / "nope"), str(tmp_path / "nope.gguf"), "./nope"):
        with pytest.raises(UsageError, match="no (model folder|GGUF file) at"):
            model_source(missing)


peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -r requirements.txt")


def test_lora_exports_as_a_peft_adapter_and_peft_adapters_load(llama_dir, tmp_path):
    model, _ = load_model(str(llama_dir))
    apply_lora(model, 4, 8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.B.normal_(0, 0.2)
    export_peft(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj"] and not config["fan_in_fan_out"]
    theirs = peft.PeftModel.from_pretrained(hf_llama(llama_dir), tmp_path / "ours").eval()
    x = random_ids(model, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x), atol=1e-4, rtol=0)
        theirs.save_pretrained(tmp_path / "theirs")  # peft's own writing, read back by us
        again, _ = load_model(str(llama_dir))
        apply_lora(again, 4, 8)
        load_peft_lora(tmp_path / "theirs", again)
        torch.testing.assert_close(again(x), theirs(x).logits, atol=1e-4, rtol=0)


def test_a_peft_adapter_of_more_modules_is_refused(llama_dirs, tmp_path):
    llama_dir = llama_dirs["gqa-tied"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_llama(llama_dir), config).save_pretrained(tmp_path / "adapter")
    model, _ = load_model(str(llama_dir))
    apply_lora(model, 4, 8)
    with pytest.raises(UsageError, match="more than the q/k/v projections"):
        load_peft_lora(tmp_path / "adapter", model)


@pytest.mark.parametrize("method", ["lora", "last_layer"])
def test_merged_export_is_a_transformers_llama_checkpoint(llama_dir, tmp_path, method):
    model, tok = load_model(str(llama_dir))
    if method == "lora":
        apply_lora(model, 4, 8)
    else:
        apply_last_layer(model)
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(torch.randn_like(p) * 0.2)
    x = random_ids(model, (2, 20))
    with torch.no_grad():
        expected = model(x)
    export_merged(model, tok, tmp_path / "merged")
    hf = hf_llama(tmp_path / "merged")
    assert hf.config.tie_word_embeddings == (method == "lora" and model.config.tie_head)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-4, rtol=0)
    reloaded, _ = load_model(str(tmp_path / "merged"))  # and back into ours
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, atol=1e-4, rtol=0)
