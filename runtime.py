"""Where and how a script runs: the device, the dtype, the processes of a distributed run, the GPU peak FLOP/s
for MFU, and the CPU allocator setting. Shared by train.py, test.py, compare.py and the benchmarks."""
import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cli import CLIError

DEVICES = ("auto", "cpu", "cuda", "mps")  # what --device takes (test.py and the benchmarks also take cuda:N)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from NVIDIA's datasheets. Matched as a whole word
# against torch.cuda.get_device_name(); the first match wins.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
)


def pick_device(requested: str) -> str:
    """The device to run on: requested ("cpu", "cuda", "cuda:1", "mps"), or for "auto" cuda, then mps, then cpu.
    A device that is not there is a CLIError."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(requested).type
    except RuntimeError:
        raise CLIError(f"--device {requested}: not a device (auto, cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise CLIError(f"--device {requested}: {kind} is not available here")
    return requested


def pick_dtype(requested: str, device_type: str) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def device_peak_flops(device: str, override: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the override, else the GPU table; None when unknown."""
    if override is not None or not device.startswith("cuda"):
        return override
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_FLOPS if re.search(rf"\b{key}\b", name)), None)


@dataclass(frozen=True)
class Runtime:
    """Where a run computes: its process among world_size, its device and dtype, and what follows from them."""
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cuda:<local rank>", "mps" or "cpu"
    dtype: torch.dtype
    compile: bool
    peak_flops: float | None

    @classmethod
    def start(cls, device: str, dtype: str, compile: bool | None, peak_flops: float | None) -> "Runtime":
        """Pick the device and dtype (see pick_device, pick_dtype), join torchrun's processes when there are
        several, and turn TF32 matmuls on on CUDA. compile None: on CUDA only."""
        device = pick_device(device)
        rank, local_rank, world_size = start_processes(device)
        if device == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
            device = f"cuda:{local_rank}"
        device_type = device.split(":")[0]
        return cls(rank, local_rank, world_size, device, pick_dtype(dtype, device_type),
                   device_type == "cuda" if compile is None else compile, device_peak_flops(device, peak_flops))

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def start_processes(device_type: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, joining the process group when there are
    several processes: NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, local_rank, world_size


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel.

    A CPU training step allocates and frees the same large buffers every step (the logits alone are
    B x T x vocab floats: 412 MB for the shakespeare preset's batch). By default glibc maps each of them afresh
    and unmaps it when freed, so every step pays for page faults on hundreds of MB: 37% of the step time of the
    shakespeare preset on a 2-core CPU (951 -> 1,364 tok/s with this). The process's memory stays at its peak
    instead. Nothing happens where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (an int): give back only a free top of the heap over 2 GiB
        mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap, where freed ones are reused


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on device: the GPU's free memory and the allocator's unused cache, or
    the kernel's MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu" and sys.platform == "linux":
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+) kB$", meminfo, re.MULTILINE).group(1)) * 1024
    return None


def release_freed_memory(device: torch.device):
    """Hand the memory glibc keeps after frees (runtime.keep_freed_memory) back to the kernel, so that
    MemAvailable counts it again. The CUDA allocator's cache is counted by available_memory already."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None
    if device.type == "cpu" and malloc_trim is not None:
        malloc_trim(0)


def check_memory(needs: int, device, what: str) -> None:
    """Refuse, before anything is allocated, what needs more bytes than device has free: a config of two million
    layers, or a batch of 10^20 sequences, fails here at once, not after minutes of allocation."""
    free = available_memory(torch.device(device))
    if free is not None and needs > free:
        raise CLIError(f"{what} need {needs / 2**30:,.1f} GiB at least, and {free / 2**30:,.1f} GiB are free on "
                       f"{device}")


def check_model_fits(configs, device, dtype: torch.dtype = torch.float32) -> None:
    """check_memory for models (ModelConfigs): their weights in dtype, and their RoPE tables (built in float64)."""
    weights = sum(config.num_params() for config in configs) * torch.empty(0, dtype=dtype).element_size()
    rope = sum(16 * config.block_size * config.rope_dim for config in configs)
    check_memory(weights + rope, device, "the model's weights and RoPE tables")


def synchronize(device) -> None:
    """Wait for the GPU to finish its queued work (no-op elsewhere), so that wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
