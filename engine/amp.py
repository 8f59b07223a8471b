"""-amp auto: the autocast precision the hardware runs natively, and why.

bf16 autocast is only fast where the hardware computes in bf16: CUDA devices that support it, CPUs with
AVX512-BF16 or AMX. Elsewhere (for example AVX2-only CPUs) PyTorch emulates it and a training step can
be 15x slower than fp32, so `auto` falls back to fp16 with a gradient scaler on older CUDA devices and
to fp32 on such CPUs.
"""
from __future__ import annotations

import sys
from functools import lru_cache

import torch

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the flags that say so."""
    found = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in cpu_flags()]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, far slower than fp32)"


def cuda_supports_bf16(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8  # Ampere and later


def choose_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """-amp value (auto|none|bf16|fp16) -> (none|bf16|fp16, the reason in words)."""
    if amp != "auto":
        if amp == "bf16" and device.type == "cpu" and not native_bf16_cpu()[0]:
            return amp, "requested; " + native_bf16_cpu()[1]
        return amp, "requested"
    if device.type == "cuda":
        if cuda_supports_bf16(device):
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no bf16: fp16 with a gradient scaler"
    if device.type == "cpu":
        native, why = native_bf16_cpu()
        return ("bf16" if native else "none"), why
    return "none", f"no mixed precision chosen for {device.type}"


_warned: set[str] = set()


def resolve_amp(amp: str, device: torch.device, announce: bool = False) -> str:
    """The concrete -amp for `device`; with `announce`, print what auto chose (once per process) and warn
    in one line about an explicit bf16 on a CPU that would emulate it."""
    chosen, reason = choose_amp(amp, device)
    if amp == "bf16" and device.type == "cpu" and not native_bf16_cpu()[0] and "bf16" not in _warned:
        _warned.add("bf16")
        print(f"warning: -amp bf16 on this CPU is emulated and much slower than fp32 ({reason.split('; ')[1]}); "
              f"use -amp auto or none", file=sys.stderr, flush=True)
    if announce and amp == "auto" and "auto" not in _warned:
        _warned.add("auto")
        print(f"-amp auto: {chosen if chosen != 'none' else 'fp32'} ({reason})", flush=True)
    return chosen
