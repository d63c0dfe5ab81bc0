"""Weights: safetensors read and written with clear errors, and the trained weights of a run with its run record
in their metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peftsum.errors import UsageError
from peftsum.model import GPT
from peftsum.methods import trainable_state
from peftsum.files import atomic_path, usual_permissions


def save_weights(path: Path, tensors: dict[str, torch.Tensor], record: dict) -> None:
    """The trained tensors with the run record as metadata. NaN or infinite values are refused: a diverged run is
    never saved as a trained one."""
    check_finite_weights(tensors, f"the trained weights for {path}")
    write_safetensors(path, tensors, {"record": json.dumps(record)})



def load_weights(path: Path, model: GPT, method: str) -> dict:
    """Load trained tensors into `model` (already changed by the method); returns the file's run record."""
    record = weights_record(path)
    _, tensors = read_safetensors(path, WEIGHTS_HINT)
    if record.get("method") != method:
        raise UsageError(f"{path} holds weights of method '{record.get('method')}', not '{method}': "
                         "use that method's script, or pass --weights")
    expected = trainable_state(model)
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise UsageError(f"{path} does not fit this model: trained on '{record.get('base_model')}' with other "
                         f"hyperparameters; pass the same --model and method flags it was trained with")
    check_finite_weights(tensors, str(path))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])
    return record



WEIGHTS_HINT = "retrain with --train or pass --weights"



def weights_record(path: Path) -> dict:
    """The run record in the metadata of a weights file (its header only), or a UsageError that names what the file
    is instead: unreadable, a training checkpoint, or safetensors that these scripts did not write."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({type(e).__name__}): {WEIGHTS_HINT}") from None
    if "state" in metadata and "record" not in metadata:
        weights = path.name.removesuffix(".ckpt.safetensors") + ".safetensors"
        raise UsageError(f"{path} is a training checkpoint, not finished weights: continue that training with "
                         f"--train --resume --weights {path.with_name(weights)}, or wait for it to write {weights}")
    if "record" not in metadata:
        raise UsageError(f"{path} has no run record in its metadata, so it was not written by these scripts; "
                         "pass a peft adapter as its folder, or retrain with --train")
    return json_object(metadata["record"], f"the run record in {path}", WEIGHTS_HINT)



def check_finite_weights(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UsageError(f"{what} hold NaN or infinite values (in {bad[0]}): a diverged run; retrain, e.g. with a "
                         "lower --lr")



def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically. safetensors' save_file writes a temporary file of its own (`.tmpXXXXXX`, a name that says
    neither whose it is nor for what) beside the file it is given, so it is given one inside our temporary folder:
    a write killed at any moment leaves only that folder, which `remove_orphans` knows."""
    with atomic_path(path, private_folder=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        usual_permissions(tmp)



def read_safetensors(path: Path, hint: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; an unreadable one (empty, truncated, not safetensors) is a
    UsageError that ends in `hint`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({type(e).__name__}): {hint}") from None



def json_object(text: str | None, what: str, hint: str) -> dict:
    """The JSON object in `text`; anything else (no text, bad JSON, a list, a number) is a UsageError."""
    try:
        value = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"{what} is missing or not a JSON object: {hint}")
    return value
