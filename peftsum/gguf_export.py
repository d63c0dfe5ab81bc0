"""GGUF out: the trained weights as files that llama.cpp, Ollama and LM Studio run. LoRA becomes a llama.cpp adapter
for the base model's GGUF (`--lora`), or, merged, a complete model file; the last layer a complete model file with
its own output head. A model file carries the base model's tokenizer and chat template, so it runs on its own. A soft
prompt has no place in GGUF (a file holds weights and a tokenizer, not learned input rows): --export-peft writes it.

Written with the `gguf` package, the one llama.cpp's own converters use; llama.cpp is never imported. Names, shapes
and metadata follow what llama.cpp reads (its convert_hf_to_gguf.py, convert_lora_to_gguf.py, llama-adapter.cpp):
GGUF lists a tensor's dimensions innermost first, so an nn.Linear weight (out, in) is written as it is, in both
families (our GPT-2 keeps its weights as nn.Linear, not as Conv1D's (in, out)). How to run the files: docs/gguf.md."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import torch

from peftsum.errors import UsageError
from peftsum.config import Config
from peftsum.model import GPT, GPTConfig
from peftsum.methods import PromptEmbedding, lora_layers, merge_lora
from peftsum.files import atomic_path
from peftsum.data import CHAT_INSTRUCTION, bos_ids
from peftsum.interop import hf_name, model_source


OUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # tensor types of --gguf-type; norms, biases and positions stay f32


NO_SOFT_PROMPT = ("a soft prompt has no place in a GGUF file (GGUF holds a model's weights and tokenizer, not learned "
                  "input embeddings): export it with --export-peft and run it with peft, or summarize with --article")


def export_gguf(model: GPT, tokenizer, path: Path, out_type: str = "f16", merge: bool = False,
                base_gguf: Path | None = None, description: str = "") -> str:
    """Write the trained model as one GGUF file; returns what it wrote, "adapter" or "model".
    With LoRA layers and not `merge`: a llama.cpp LoRA adapter for the base model's GGUF. Otherwise a complete model
    (LoRA merged into its weights first: this changes `model`), with the tokenizer metadata of `base_gguf` when the
    base model is a GGUF file, else built from the transformers tokenizer."""
    if isinstance(model.wte, PromptEmbedding):
        raise UsageError(NO_SOFT_PROMPT)
    if out_type not in OUT_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(OUT_TYPES)}, got '{out_type}'")
    c = model.config
    name = f"{model.name or c.family} (peftsum)"
    if lora_layers(model) and not merge:
        lora = next(iter(lora_layers(model).values()))
        alphas = {m.scale * m.A.shape[0] for m in lora_layers(model).values()}
        if not all(math.isclose(a, lora.scale * lora.A.shape[0]) for a in alphas):
            raise UsageError("these LoRA layers have alphas of their own (a peft adapter with alpha_pattern or "
                             "rank_pattern), and a GGUF adapter has one alpha for all: add --gguf-merge")

        def adapter_metadata(writer) -> None:
            import gguf
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            # llama.cpp scales B A by alpha / rank, the rank read from B's shape: our scale, whatever the rank
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.scale * lora.A.shape[0])
            add_description(writer, name, description)

        write_gguf(path, c, adapter_metadata, adapter_tensors(model), out_type)
        return "adapter"
    # before merging: a tokenizer this export cannot describe is refused with the model unchanged
    vocab = copied_vocab(base_gguf) if base_gguf else built_vocab(tokenizer, c.vocab_size, model.name)

    def model_metadata(writer) -> None:
        import gguf
        writer.add_type(gguf.GGUFType.MODEL)
        add_description(writer, name, description)
        add_hyperparameters(writer, c, out_type)
        for key, value, *types in vocab:
            writer.add_key_value(key, value, *types)

    merge_lora(model)
    write_gguf(path, c, model_metadata, model_tensors(model), out_type)
    return "model"


def check_flags(cfg: Config, method: str) -> None:
    """Before any slow work: the GGUF flags fit together, and the method's weights have a place in GGUF."""
    if (cfg.gguf_merge or cfg.gguf_type != Config.gguf_type) and not cfg.export_gguf:
        raise UsageError("--gguf-merge and --gguf-type say how --export-gguf writes: add --export-gguf PATH")
    if cfg.gguf_type not in OUT_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(OUT_TYPES)}, got '{cfg.gguf_type}'")
    if cfg.export_gguf and method == "prompt_tuning":
        raise UsageError(NO_SOFT_PROMPT)


def export_for_cli(method: str, model: GPT, tokenizer, cfg: Config) -> str:
    """--export-gguf: write the file; returns what the CLI prints: what was written, and the llama.cpp command that
    summarizes an article with it."""
    base = base_gguf_file(cfg.model)
    kind = export_gguf(model, tokenizer, Path(cfg.export_gguf), cfg.gguf_type, cfg.gguf_merge, base,
                       f"{method} on {cfg.model}, {prompt_format(cfg)}")
    if kind == "adapter":
        wrote = (f"wrote the GGUF LoRA adapter {cfg.export_gguf} ({cfg.gguf_type}) for the base model "
                 f"{base or cfg.model + ' as a GGUF file (convert it with llama.cpp convert_hf_to_gguf.py)'}")
        command = llama_cpp_command(cfg, str(base or "BASE.gguf"), cfg.export_gguf)
    else:
        wrote = f"wrote the GGUF model {cfg.export_gguf} ({cfg.gguf_type})"
        command = llama_cpp_command(cfg, cfg.export_gguf)
    return f"{wrote}\nsummarize article.txt with llama.cpp (docs/gguf.md):\n  {command}"


def base_gguf_file(name: str) -> Path | None:
    """The GGUF file of --model (a .gguf path, or the one a pip package carries); None for a transformers checkpoint."""
    folder, extra = model_source(name)
    return Path(folder) / extra["gguf_file"] if "gguf_file" in extra else None


# --- tensors: names, layouts and types ---------------------------------------------------------------------------

def gguf_name(name: str, c: GPTConfig) -> str:
    """The GGUF name of one of our tensors, e.g. blocks.0.attn.c_attn.weight -> blk.0.attn_qkv.weight, found through
    the transformers name in the gguf package's own table (the one llama.cpp's converter uses)."""
    found = tensor_names(c).get_name(hf_name(name, c.family), try_suffixes=(".weight", ".bias"))
    assert found, f"no GGUF name for {name}"
    return found


def tensor_names(c: GPTConfig):
    import gguf
    arch = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA}[c.family]
    return gguf.get_tensor_name_map(arch, c.n_layer)


def rope_interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a Llama q or k projection (or of its LoRA B), (n_head · D, ...), in the order llama.cpp rotates:
    Hugging Face's layout turns dimensions i and i + D/2 of a head together, llama.cpp's turns 2i and 2i + 1, so
    each head's rows (h0, h1) become interleaved. Every Llama GGUF is written so (convert_hf_to_gguf.py), and
    transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(name: str, c: GPTConfig) -> int:
    """How many heads' rows `rope_interleave` reorders in this tensor: the query or key heads; 0 for the others."""
    if c.family != "llama":
        return 0
    return c.n_head if ".q_proj." in name else c.n_kv_head if ".k_proj." in name else 0


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Every weight of a complete model by its GGUF name. A head tied to the embeddings is not written (llama.cpp
    and transformers' loader then use token_embd for it); an untied one is `output.weight`."""
    c, tied = model.config, model.lm_head.weight is model.wte.weight
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        heads = rope_heads(name, c)
        out[gguf_name(name, c)] = rope_interleave(t, heads) if heads else t
    return out


def adapter_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The LoRA update of each adapted weight W, as llama.cpp's adapter loader pairs them: `<W's GGUF name>.lora_a`,
    our A (rank, in), and `.lora_b`, our B (out, rank); llama.cpp adds (alpha / rank) · B A x. For Llama's q and k,
    B's rows are reordered as the base GGUF's W rows are, so that B A is the update of that W."""
    c, out = model.config, {}
    for module, lora in lora_layers(model).items():
        name = gguf_name(module + ".weight", c)
        heads = rope_heads(module + ".", c)
        out[name + ".lora_a"] = lora.A
        out[name + ".lora_b"] = rope_interleave(lora.B, heads) if heads else lora.B
    return out


def encode_tensor(name: str, t: torch.Tensor, out_type: str):
    """(data, GGML type) of one tensor for `out_type`. As llama.cpp's converter does: vectors (norms, biases) and
    GPT-2's position table stay f32, and a q8_0 tensor whose rows are not whole blocks of 32 values falls back to
    f16. The `gguf` package rounds: to f16 as numpy does, to bf16 to nearest even, to q8_0 as ggml's reference."""
    import gguf
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    data = t.detach().float().cpu().numpy()
    qtype = types["f32" if data.ndim == 1 or name == "position_embd.weight" else out_type]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, types["f16"]), types["f16"]


def write_gguf(path: Path, c: GPTConfig, add_metadata, tensors: dict[str, torch.Tensor], out_type: str) -> None:
    """One GGUF file for the architecture of `c`: the metadata `add_metadata(writer)` adds, then the tensors.
    Written atomically: the file appears whole, or not at all."""
    import gguf
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, c.family)  # our family names are llama.cpp's architecture names
        try:
            add_metadata(writer)
            for name, t in tensors.items():
                data, qtype = encode_tensor(name, t, out_type)
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


# --- metadata --------------------------------------------------------------------------------------------------

def add_description(writer, name: str, description: str) -> None:
    writer.add_name(name)
    if description:
        writer.add_description(description)


def add_hyperparameters(writer, c: GPTConfig, out_type: str) -> None:
    """The architecture's keys, those llama.cpp and transformers' GGUF loader read (`<arch>.block_count`, ...)."""
    import gguf
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.n_positions)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(c.n_inner)
    writer.add_head_count(c.n_head)
    if c.family == "gpt2":
        writer.add_layer_norm_eps(c.norm_eps)
    else:
        writer.add_head_count_kv(c.n_kv_head)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_vocab_size(c.vocab_size)
        if c.head_dim != c.n_embd // c.n_head:
            writer.add_key_length(c.head_dim)
            writer.add_value_length(c.head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def copied_vocab(path: Path) -> list[tuple]:
    """Every `tokenizer.*` key of a GGUF file (vocabulary, merges, special tokens, chat template) with its type, as
    (key, value, type[, element type]) for `GGUFWriter.add_key_value`: the base's tokenizer, unchanged."""
    import gguf
    reader = gguf.GGUFReader(path)
    return [(key, field.contents(), field.types[0], *field.types[1:][-1:])
            for key, field in reader.fields.items() if key.startswith("tokenizer.")]


def built_vocab(tokenizer, vocab_size: int, model_name: str) -> list[tuple]:
    """The tokenizer metadata llama.cpp reads for a byte-level BPE vocabulary (GPT-2's, SmolLM2's), built from a
    transformers tokenizer as convert_hf_to_gguf.py builds it: tokens by id (ids the tokenizer lacks as unused
    [PAD<id>] rows), their types, the merges, the special tokens, whether a BOS starts every text, the chat template."""
    import gguf
    Keys, T, V = gguf.Keys.Tokenizer, gguf.TokenType, gguf.GGUFValueType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if spec.get("model", {}).get("type") != "BPE" or pre is None:
        raise UsageError(f"the tokenizer of '{model_name}' is not a byte-level BPE split as GPT-2's or SmolLM2's, "
                         "the kinds this export describes for llama.cpp: convert the base model with llama.cpp's "
                         "convert_hf_to_gguf.py and pass that .gguf as --model (its tokenizer is then copied)")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UsageError(f"the tokenizer of '{model_name}' has ids up to {max(by_id)}, more than the model's "
                         f"{vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    kind = lambda i: T.UNUSED if i not in by_id else T.NORMAL if i not in added else \
        T.CONTROL if added[i].special else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]  # "a b" or ["a", "b"]
    fields = [(Keys.MODEL, "gpt2", V.STRING), (Keys.PRE, pre, V.STRING),
              (Keys.LIST, [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)], V.ARRAY, V.STRING),
              (Keys.TOKEN_TYPE, [int(kind(i)) for i in range(vocab_size)], V.ARRAY, V.INT32),
              (Keys.MERGES, merges, V.ARRAY, V.STRING)]
    for key, token_id in ((Keys.BOS_ID, tokenizer.bos_token_id), (Keys.EOS_ID, tokenizer.eos_token_id),
                          (Keys.UNK_ID, tokenizer.unk_token_id), (Keys.PAD_ID, tokenizer.pad_token_id)):
        if token_id is not None:
            fields.append((key, token_id, V.UINT32))
    fields.append((Keys.ADD_BOS, bool(bos_ids(tokenizer)), V.BOOL))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        fields.append((Keys.CHAT_TEMPLATE, tokenizer.chat_template, V.STRING))
    return fields


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how a byte-level tokenizer splits text before its merges: GPT-2's
    pattern ("gpt-2"), or each digit alone and then GPT-2's pattern ("smollm"); None for any other split."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel" or not steps[-1].get("use_regex", True):
        return None
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return None


# --- running the files -----------------------------------------------------------------------------------------

def prompt_format(cfg: Config) -> str:
    """How the weights were trained to be prompted (the file's description)."""
    if cfg.chat:
        return (f"trained with the chat template: a user turn '{CHAT_INSTRUCTION.strip()}' + two newlines + the "
                "article; the summary is the assistant's turn")
    return f"trained as raw text: the article, then {cfg.separator!r}; the summary follows"


def llama_cpp_command(cfg: Config, model_file: str, adapter: str = "", article: str = "article.txt") -> str:
    """The llama.cpp command line that summarizes the text file `article` with the exported file, prompted as the
    weights were trained, sampling as --temperature/--top-p/--top-k/--greedy say."""
    files = ["-m", model_file] + (["--lora", adapter] if adapter else [])
    sampling = ["--temp", "0"] if cfg.greedy else ["--temp", f"{cfg.temperature:g}", "--top-p", f"{cfg.top_p:g}",
                                                    "--top-k", str(cfg.top_k), "--min-p", "0"]
    head = shlex.join(["llama-completion", *files, "-n", str(cfg.max_new_tokens), *sampling])
    if cfg.chat:  # llama.cpp applies the file's chat template to the one user turn
        instruction = CHAT_INSTRUCTION.replace("\n", "\\n")
        return f"{head} --jinja --single-turn -p \"$(printf '{instruction}'; cat {shlex.quote(article)})\""
    return f"{head} -no-cnv -p \"$(cat {shlex.quote(article)})\"{shlex.quote(cfg.separator)}"
