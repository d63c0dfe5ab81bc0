"""Run an entry script as torchrun would, and also write each rank's trained weights to OUT/rank<r>.safetensors,
so a test can compare the ranks, and its process id to OUT/pid<r>, so a test can kill one.
usage: torchrun ... tests/ddp_worker.py OUT SCRIPT [script args]"""
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peftsum.runtime import world  # noqa: E402
from peftsum.methods import trainable_state  # noqa: E402
from peftsum import training  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

out, script = Path(sys.argv[1]), sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
train = training.train


def train_and_dump(model, *args, **kwargs):
    history = train(model, *args, **kwargs)
    rank, _ = world()
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    return history


training.train = train_and_dump  # what the CLI calls
(out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
runpy.run_path(script, run_name="__main__")
