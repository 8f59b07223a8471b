"""Where the run executes: device choice, distributed process group, peak memory."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.errors import UserError

from .host_memory import set_host_memory


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("-device cuda: no CUDA device is visible; use -device cpu or auto")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def start_runtime(device_choice: str, host_memory: str) -> Runtime:
    """Join the torchrun process group when launched by torchrun, and apply the -host_memory policy (the
    main process says which is in force)."""
    runtime = _join_process_group(resolve_device(device_choice))
    _, host_line = set_host_memory(host_memory)
    if runtime.is_main:
        print(host_line)
    return runtime


def _join_process_group(device: torch.device) -> Runtime:
    """This process's Runtime; under torchrun it joins the group (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world_size)


def stop_runtime(runtime: Runtime) -> None:
    """Every process waits for the others (rank 0 may still be evaluating) before the group is torn down:
    a process leaving a gloo group early aborts at exit."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` for -compile, with static shapes. Each encoder stage calls the same code at its own
    grid size, so automatic dynamic shapes made those sizes symbolic, and inductor then failed on TinyViT's
    window arithmetic (MobileSAM sam_lora, 256 px: "cannot determine truth value of Relational")."""
    return torch.compile(module, dynamic=False)


class PeakMemory:
    """Peak memory in MB: CUDA peak allocated on GPU; on CPU the process peak RSS (VmHWM), reset per window."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            clear_refs = Path(f"/proc/{os.getpid()}/clear_refs")
            try:
                clear_refs.write_text("5")  # Linux: reset the peak RSS to the current RSS
            except OSError:
                pass  # other systems: the peak then covers the whole process lifetime

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        status = Path(f"/proc/{os.getpid()}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, repeats: int, device: torch.device, warm: bool = True) -> float:
    """Median seconds per call over `repeats` calls, after one untimed call (first-call allocations;
    warm=False: the caller made it)."""
    if warm:
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)
