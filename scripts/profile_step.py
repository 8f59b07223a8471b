"""Where a training step's time goes: torch.profiler's table of the top operators (self CPU time).

    python scripts/profile_step.py mobile_sam sam_lora 256 1            (net, mode, image size, batch)
    python scripts/profile_step.py mobile_sam sam_lora 256 1 --plain_prefix   (frozen prefix off: before)

The step is benchmark.py's (random base weights, synthetic batch, one click, the trainer's AdamW, -amp none); two
warm-up steps, then two profiled steps.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import models.frozen_prefix as frozen_prefix
    from cfg import Config
    from engine.benchmark import synthetic_batch
    from engine.loss import PerClassDiceCE
    from engine.optim import adamw
    from engine.session import build_model
    from engine.trainer import keep_frozen_batchnorm_in_eval
    from models.registry import resolve_encoder

    net, mod, size, batch = argv[0], argv[1], int(argv[2]), int(argv[3])
    frozen_prefix.ENABLED = "--plain_prefix" not in argv
    config = dataclasses.replace(Config(), net=net, encoder=resolve_encoder(net, "default"), mod=mod,
                                 image_size=size, b=batch, amp="none", device="cpu", sam_ckpt="random")
    device = torch.device("cpu")
    model, adaptation = build_model(config, 1, total_steps=100, device=device, verbose=False)
    images, masks, prompts = synthetic_batch(config, 1, device)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-2)
    loss_fn = PerClassDiceCE()
    model.train()
    keep_frozen_batchnorm_in_eval(model)

    def step() -> None:
        logits, _ = model(images, prompts)
        logits = torch.nn.functional.interpolate(logits, size=masks.shape[-2:], mode="bilinear")
        loss_fn(logits, masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print(f"{net} {mod} {size}px batch {batch}, frozen prefix {'on' if frozen_prefix.ENABLED else 'off'}, "
          f"{torch.get_num_threads()} threads; 2 steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main(sys.argv[1:])
