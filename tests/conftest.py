"""Fixtures: a tiny GPT-2 checkpoint (random weights, a small byte-level BPE tokenizer trained here) and tiny
CNN/DM-shaped data, written to temp folders so the real loading paths run; `cli`, which runs an entry script in this
process. No network, no ../shared."""
import contextlib
import io
import json
import random
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(script: str, *args, stdin: str = "") -> Result:
    """Run an entry script as `python3 ROOT/script args` does, but in this process: runpy as __main__, with its own
    argv, stdin, stdout and stderr, and its exit code caught. The code path is the subprocess's (a subprocess would
    add only starting Python and importing torch again, seconds each); an exception other than SystemExit is not
    caught, so a traceback fails the test. Tests that need a real process (signals, torchrun) start one."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(ROOT / script), *map(str, args)]
    with mock.patch.object(sys, "argv", argv), mock.patch.object(sys, "stdin", io.StringIO(stdin)), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return Result(code, out.getvalue(), err.getvalue())

WORDS = ("the police said a man was arrested on monday after the fire in the city center . officials reported "
         "that the storm hit the coast and thousands of homes lost power . the team won the final match with a late "
         "goal . scientists found a new species of frog in the forest . the president met leaders to discuss trade "
         "and climate . prices rose again this year as demand grew").split()


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20 + ["Summarize TL;DR: \n"] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def tiny_gpt2(folder: Path, n_positions: int) -> Path:
    """A GPT-2 checkpoint in `folder`: 2 layers, 32 wide, the tokenizer above, random weights (seed 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_layer=2, n_head=2, n_embd=32,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A GPT-2 checkpoint folder: 2 layers, 32 wide, 256 positions, ~400-token vocabulary."""
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), n_positions=256)


@pytest.fixture(scope="session")
def gpt2_1024_dir(tmp_path_factory) -> Path:
    """The same tiny GPT-2 with GPT-2's 1024 positions: the training benchmark's ~580-token rows fit, and a GGUF file
    of it loads back in transformers' GGUF loader (which reads a GPT-2 file's context length into `n_ctx`, which
    GPT2Config ignores, so a file of any other length would not load back there; llama.cpp reads it)."""
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2-1024"), n_positions=1024)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(tiny_dir).eval()


@pytest.fixture
def tiny(tiny_dir):
    """(our model, tokenizer), fresh for each test so method changes don't leak."""
    from peftsum.interop import load_model
    return load_model(str(tiny_dir))


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[:-1]) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """train/validation/test.jsonl with columns id, article, highlights."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for split, n in (("train", 24), ("validation", 6), ("test", 6)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                article = " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(3, 12)))
                highlights = "\n".join(sentence(rng, rng.randint(4, 8)) for _ in range(2))
                f.write(json.dumps({"id": f"{split}-{i}", "article": article, "highlights": highlights}) + "\n")
    return folder


@pytest.fixture(scope="session")
def lora_weights(tiny_dir, data_dir, tmp_path_factory) -> Path:
    """LoRA weights that main2.py trained for 2 steps, shared by the tests that only read them (copy to change)."""
    folder = tmp_path_factory.mktemp("lora-weights")
    p = cli("main2.py", "--model", tiny_dir, "--data", data_dir, "--out", folder / "runs", "--weights",
            folder / "lora.safetensors", "--train", "--max-steps", 2, "--batch-size", 4, "--test-size", 2,
            "--max-new-tokens", 4, "--eval-batch-size", 2, "--warmup-steps", 1)
    assert p.returncode == 0, p.stderr[-2000:]
    return folder / "lora.safetensors"


def train_args(tiny_dir, data_dir, folder: Path) -> list:
    """The resume tests' training: LoRA, 3 epochs of 12 steps, a checkpoint every 2 steps, into `folder`."""
    return ["--model", tiny_dir, "--data", data_dir, "--train", "--epochs", 3, "--patience", 3, "--batch-size", 2,
            "--save-every", 2, "--warmup-steps", 2, "--test-size", 2, "--max-new-tokens", 4, "--eval-batch-size", 2,
            "--weights", folder / "w.safetensors", "--out", folder / "runs"]


@pytest.fixture(scope="session")
def uninterrupted(tiny_dir, data_dir, tmp_path_factory) -> Path:
    """The folder of that training run uninterrupted: w.safetensors and runs/lora.json."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    p = cli("main2.py", *train_args(tiny_dir, data_dir, folder))
    assert p.returncode == 0, p.stderr[-2000:]
    return folder


@pytest.fixture(scope="session")
def interrupted(tiny_dir, data_dir, tmp_path_factory) -> Path:
    """The folder of the same run stopped as by Ctrl-C after step 5, mid-epoch: it holds the checkpoint and no
    weights. (In this process the signal is simulated where the loop polls for it; test_resume_ddp sends real ones.)"""
    import signal
    from peftsum import training
    folder = tmp_path_factory.mktemp("interrupted")
    steps = iter(range(1, 100))  # the loop asks after every step (and after each validation: not before step 12)
    with mock.patch.object(training, "agreed_signal", lambda received, device: signal.SIGINT * (next(steps) == 5)):
        p = cli("main2.py", *train_args(tiny_dir, data_dir, folder))
    assert p.returncode == 130, p.stderr[-2000:]
    assert (folder / "w.ckpt.safetensors").is_file() and not (folder / "w.safetensors").exists()
    return folder


def make_llama_tokenizer(folder: Path):
    """A SentencePiece-free Llama-style tokenizer: byte-level BPE, <s> added before every text (as Llama 2's and
    TinyLlama's tokenizers do), </s> as EOS, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20 + ["Summarize TL;DR: \n"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template="{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                                                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    fast.save_pretrained(folder)
    return fast


def make_llama(folder: Path, n_kv_head: int, tied: bool):
    """A Llama checkpoint folder: 2 layers, 32 wide, 4 query heads of 8, n_kv_head key/value heads, RoPE base 500."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_llama_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv_head, head_dim=8, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random norm weights, so a norm loaded wrong shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


LLAMA_VARIANTS = {"gqa-tied": (2, True), "mha-untied": (4, False)}  # (key/value heads of 4, tied head)


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama checkpoints: grouped-query attention (2 key/value heads for 4 query heads) with a tied head, and
    one key/value head per query head with an untied head."""
    return {name: make_llama(tmp_path_factory.mktemp(name), *v) for name, v in LLAMA_VARIANTS.items()}


@pytest.fixture(params=list(LLAMA_VARIANTS))
def llama_dir(request, llama_dirs) -> Path:
    """Each tiny Llama checkpoint in turn."""
    return llama_dirs[request.param]
