"""Where a training step's time goes: torch.profiler's table of the top operators (self CPU time), and how
close the step could come to the matmul limit if only its FLOP-carrying operators took time.

    python scripts/profile_step.py mobile_sam sam_lora 256 1            (net, mode, image size, batch)
    python scripts/profile_step.py efficient_sam:vit_t sam_lora 256 1   (net:encoder; default: the net's default)
    python scripts/profile_step.py mobile_sam sam_lora 256 1 --plain_prefix   (frozen prefix off: before)

The step is benchmark.py's (random base weights, synthetic batch, one click, the trainer's AdamW and the
mode's after-backward work, -amp none, -host_memory reuse as its rows run: started with glibc's thread cache
off); two warm-up steps, then two profiled steps.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what the operators carrying the FLOPs that torch's FlopCounterMode counts are named like: matrix products
# (mm, addmm, bmm, baddbmm), convolutions forward and backward, fused attention
FLOP_OPERATOR_PARTS = ("mm", "conv", "flash_attention", "efficient_attention")


def main(argv: list[str]) -> None:
    from engine.host_memory import set_host_memory, start_up_environment

    environment = start_up_environment("reuse", os.environ)
    if environment != dict(os.environ):  # the thread cache is set when a process starts: start again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)
    _, host_line = set_host_memory("reuse")

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    import models.frozen_prefix as frozen_prefix
    from cfg import Config
    from engine.benchmark import matmul_gflops, synthetic_batch, training_step
    from models.registry import resolve_encoder

    (net, _, encoder), mod, size, batch = argv[0].partition(":"), argv[1], int(argv[2]), int(argv[3])
    frozen_prefix.ENABLED = "--plain_prefix" not in argv
    config = dataclasses.replace(Config(), net=net, encoder=resolve_encoder(net, encoder or "default"), mod=mod,
                                 image_size=size, b=batch, amp="none", device="cpu", sam_ckpt="random")
    device = torch.device("cpu")
    _, _, _, step = training_step(config, synthetic_batch(config, 1, device), total_steps=100)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    with FlopCounterMode(display=False) as counter:
        step()
    reference = matmul_gflops(device)
    print(f"{net} {config.encoder} {mod} {size}px batch {batch}, frozen prefix {'on' if frozen_prefix.ENABLED else 'off'}, "
          f"{torch.get_num_threads()} threads; 2 steps; {host_line}")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    total_us = sum(event.self_cpu_time_total for event in averages)
    flop_us = sum(event.self_cpu_time_total for event in averages
                  if any(part in event.key for part in FLOP_OPERATOR_PARTS))
    gflop = 2 * counter.get_total_flops() / 1e9  # two profiled steps
    print(f"FLOP-carrying operators (names with {', '.join(FLOP_OPERATOR_PARTS)}): "
          f"{100 * flop_us / total_us:.1f}% of the profiled time. The step's GFLOP/s over the whole profiled time: "
          f"{gflop / total_us * 1e6 / reference:.3f} of the matmul reference ({reference:.0f} GFLOP/s); over "
          f"those operators' time alone (every other operator free): {gflop / flop_us * 1e6 / reference:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
