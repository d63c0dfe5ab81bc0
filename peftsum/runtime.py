"""Where and how a run computes: device and precision (decided once), torchrun ranks, the machine's name, peak
memory, and whether the Hugging Face hub can be reached."""
from __future__ import annotations

import functools
import math
import os
import platform
import shlex
import socket
import sys
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from huggingface_hub import constants, try_to_load_from_cache

from peftsum.errors import UsageError


def hub_access(name: str) -> dict:
    """`from_pretrained` arguments for `name`: none for a local folder; local_files_only for a hub name already in
    the cache. A hub name that is neither cached nor reachable is a UsageError at once, instead of a minute of
    huggingface_hub's retries."""
    if Path(name).is_dir():
        return {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    if not hub_reachable():
        raise UsageError(f"cannot download '{name}': the Hugging Face hub is not reachable from this machine; "
                         "pass --model with a checkpoint folder or a .gguf file")
    return {}


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (HF_HUB_OFFLINE=1: no)."""
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_device(name: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device of --device `name`, and the autocast dtype of --dtype `precision` (float32: no autocast), decided
    once. A device this machine lacks is a UsageError."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device '{name}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}, but torch finds no CUDA GPU on this machine: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if precision == "auto":
        if device.type == "cuda":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def machine(device: torch.device) -> str:
    """What a speed number was measured on: the GPU's name, or the CPU's model, threads and bf16 support."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = "AMX" if amx else "AVX-512 BF16" if cpu_has_native_bf16() else "no"
    return f"{name}, {torch.get_num_threads()} threads, native bf16: {bf16}"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16). Elsewhere bf16 is emulated and about 3x
    slower than fp32, so --dtype auto picks fp32 there."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                        "_is_avx512_bf16_supported"))


def precision_name(dtype: torch.dtype) -> str:
    """How a run's arithmetic is said in its first lines and its record: "fp32", or "bf16 autocast"."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


PROC_STATUS = "/proc/self/status"  # Linux: the process's memory, VmHWM its peak


def reset_peak_memory(device: torch.device) -> None:
    """Count peak memory from now on, so that a training reports its own peak and not the model loading's: CUDA's
    counter, or the process's high-water mark (Linux: VmHWM, which writing 5 to /proc/self/clear_refs resets;
    elsewhere the peak since the process started)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory since `reset_peak_memory` (or since the process started), in MiB: on a GPU what torch
    allocated there, on a CPU the process's resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open(PROC_STATUS) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10  # kB
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource  # POSIX only
    except ImportError:  # Windows has no getrusage
        return math.nan
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def world() -> tuple[int, int]:
    """(rank, world size) of a torchrun job; (0, 1) otherwise."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(device: str) -> str:
    """Join the torchrun job: one process per GPU (gloo on CPUs); only rank 0 logs. Returns this rank's --device."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def resume_command() -> str:
    """The command that continues this run: this process's command line with --resume; under torchrun, the
    torchrun command of the same world size (a run's data order and steps depend on it)."""
    args = [*sys.argv] + ([] if "--resume" in sys.argv else ["--resume"])
    _, n_ranks = world()
    if n_ranks == 1:
        return shlex.join([Path(sys.executable).name, *args])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", n_ranks))
    if per_node == n_ranks:
        return shlex.join(["torchrun", "--standalone", f"--nproc-per-node={per_node}", *args])
    return shlex.join(["torchrun", f"--nnodes={n_ranks // per_node}", f"--nproc-per-node={per_node}", *args]) + \
        " (on every node, with the first run's rendezvous flags)"
