"""What the three entry scripts import, and the map of the code behind it: the package `peftsum`, one module per
concern. Each module imports only modules above it in this list; none does work at import. The last two are
report.py's, not the scripts'.

  errors      UsageError (one line, exit code 2), Interrupted (a training stopped by a signal)
  config      the settings: the dataclass the CLI is generated from, its checks, the run's mode (imports no torch)
  records     the run record (in <out> and in a weights file), run names, the run validation chooses, the one shipped
  files       atomic writes, the lock of a weights file, checks that a folder can take a run's files (no torch)
  runtime     device and precision, decided once; torchrun ranks; the machine's name; whether the hub answers
  model       one transformer that is GPT-2 or Llama as its config says, its KV cache, its inference-only forms
  methods     prompt tuning, the last layer, LoRA: each one change to a frozen model
  weights     safetensors with clear errors, and trained weights with their run record
  data        CNN/DailyMail rows from a folder or the hub, drawn by a seeded shuffle, as token ids and batches
  sampling    temperature, top-k, top-p and the draw, as pure functions; speculative acceptance rules
  generation  prefill and decode over the KV cache: batched, streamed, speculative (prompt lookup)
  interop     transformers checkpoints and GGUF files in; peft adapters in and out; transformers checkpoints out
  gguf_export GGUF files out, for llama.cpp, Ollama and LM Studio: a LoRA adapter, or a complete model
  checkpoints a training's resumable state, its checkpoints, and the run identity a checkpoint continues only
  training    the training loop: steps, epochs, early stopping, torchrun, and stopping on a signal with a checkpoint
  evaluation  summaries of the test set, ROUGE, the run record and predictions
  cli         setup before the slow work, one mode per run, one-line errors
  results     what run records say: bootstrap intervals, paired differences, the README's results (no torch)
  figures     report.py's figures from the same records, with matplotlib (no torch)

Each method is one change to the model (`apply_prompt_tuning`, `apply_last_layer`, `apply_lora`); after it,
training, sampling and evaluation do not know which method ran.
"""
from peftsum.errors import Interrupted, UsageError, first_line
from peftsum.config import HARD_PROMPT, MODES, Args, Config, arg, check_config, parse_args, resolve_mode
from peftsum.records import RunRecord, run_name
from peftsum.files import atomic_path, weights_lock
from peftsum.runtime import autocast, machine, resolve_device, world
from peftsum.model import GPT, IGNORE, GPTConfig
from peftsum.methods import (LoRALinear, PromptEmbedding, apply_full, apply_last_layer, apply_learned_separator,
                             apply_lora, apply_prompt_tuning, count_parameters, hard_prompt_ids, lora_layers,
                             merge_lora, trainable_state)
from peftsum.weights import load_weights, save_weights
from peftsum.data import collate, encode_examples, encode_prompts, length_batches, load_splits
from peftsum.sampling import logits_to_probs, nucleus, sample, sample_logits
from peftsum.generation import (DecodeStats, cut_at_eos, decode_step, generate, generate_batch, generate_stream,
                                prefill, prepare_inference, verify_step)
from peftsum.interop import (config_from_hf, export_merged, export_peft, from_hf, hf_config, load_model,
                             load_peft_lora, model_source)
from peftsum.gguf_export import export_gguf
from peftsum.checkpoints import TrainState
from peftsum.training import optimizer_step, train
from peftsum.evaluation import lead_3, rouge, rouge_scores, score_and_write, split_sentences, summarize
from peftsum.cli import Job, cli_errors, prompt_tuning_init, run, setup

__all__ = [
    "Interrupted", "UsageError", "first_line",
    "HARD_PROMPT", "MODES", "Args", "Config", "arg", "check_config", "parse_args", "resolve_mode",
    "RunRecord", "run_name",
    "atomic_path", "weights_lock",
    "autocast", "machine", "resolve_device", "world",
    "GPT", "IGNORE", "GPTConfig",
    "LoRALinear", "PromptEmbedding", "apply_full", "apply_last_layer", "apply_learned_separator", "apply_lora",
    "apply_prompt_tuning", "count_parameters", "hard_prompt_ids", "lora_layers", "merge_lora", "trainable_state",
    "load_weights", "save_weights",
    "collate", "encode_examples", "encode_prompts", "length_batches", "load_splits",
    "logits_to_probs", "nucleus", "sample", "sample_logits",
    "DecodeStats", "cut_at_eos", "decode_step", "generate", "generate_batch", "generate_stream", "prefill",
    "prepare_inference", "verify_step",
    "config_from_hf", "export_merged", "export_peft", "from_hf", "hf_config", "load_model", "load_peft_lora",
    "model_source",
    "export_gguf",
    "TrainState", "optimizer_step", "train",
    "lead_3", "rouge", "rouge_scores", "score_and_write", "split_sentences", "summarize",
    "Job", "cli_errors", "prompt_tuning_init", "run", "setup",
]
