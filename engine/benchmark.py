"""Speed, memory and cost of every (net, mode, amp, activation checkpointing, host memory) combination.

Each combination is measured in a fresh child process, started with its -host_memory policy's
environment, so peak memory belongs to it alone. The matmul reference that a row's achieved GFLOP/s are
compared with is measured by the parent right before and right after that row's process: on a shared
virtual machine a reference taken minutes earlier can be in another speed state. With several rounds the
rows take turns, so a stretch of slow machine time (a shared virtual machine's small operators can run 40%
slower for tens of seconds) falls on one round of several rows rather than on every round of one.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from cfg import Config
from common.tables import markdown_table
from models.merge import merge_adapters
from models.modes import get_mode
from models.saved_tensors import without_recipes
from models.segmenter import Prompts

from .amp import resolve_amp
from .checkpoints import save_weights
from .host_memory import set_host_memory, start_up_environment
from .loss import PerClassDiceCE
from .optim import StepInBackward, adamw, learning_rate_groups, steps_in_backward
from .runtime import PeakMemory, compiled, median_seconds, resolve_device, synchronize
from .session import build_base, build_model
from .trainer import keep_frozen_batchnorm_in_eval
from .evaluation import autocast_context

PLAIN = "plain_full"  # the -mod column of the reference row: a minimal full fine-tuning loop

COLUMNS = ("net", "encoder", "mod", "decoder", "amp", "grad_ckpt", "recompute_mlp", "host_memory", "compile", "compile_s", "image_size", "batch",
           "trainable_params", "total_params", "ckpt_mb", "rounds", "sec_per_step", "sec_per_step_min", "sec_per_step_max",
           "images_per_s", "peak_mem_mb", "train_mem_mb", "train_gflops_per_s",
           "matmul_reference", "matmul_fraction", "time_vs_plain", "peak_vs_plain", "train_mem_vs_plain", "infer_base_ms",
           "infer_unmerged_ms", "infer_merged_ms", "merged_over_base")


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a large float32 matmul: the machine's practical limit for this run."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def synthetic_batch(config: Config, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Prompts]:
    """Random images, disc-shaped masks and one click per class, at the model's input size."""
    generator = torch.Generator().manual_seed(0)
    size, batch = config.image_size, config.b
    images = torch.randint(0, 256, (batch, 3, size, size), generator=generator).float()
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).float()
    centre = torch.full((2,), size / 2)
    masks = ((grid - centre).norm(dim=-1) < size / 4).float().expand(batch, classes, size, size).contiguous()
    points = centre.flip(0).expand(batch, classes, 1, 2).contiguous()
    labels = torch.ones(batch, classes, 1, dtype=torch.long)
    return images.to(device), masks.to(device), Prompts(points, labels).to(device)


def counted_gflop(step: Callable[[], None]) -> float:
    """GFLOP of one `step`, counted by torch's FlopCounterMode. Imported here, after a row's peak is read:
    it imports triton, about 80 MB of resident memory that training does not use."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def measure_plain(config: Config, steps: int, warmup: int) -> dict:
    """The reference row: plain PyTorch full fine-tuning of the base net (forward under the row's autocast,
    Dice+CE loss, backward, AdamW step) without any toolkit machinery, for the *_vs_plain ratios: no mode,
    and autograd keeps every activation it saves (the net's saved-tensor recipes are off)."""
    device = resolve_device(config.device)
    model = build_base(config, 1).to(device).train()
    images, masks, prompts = synthetic_batch(config, 1, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = PerClassDiceCE()

    def train_step() -> None:
        with autocast_context(config.amp, device), without_recipes():
            logits, _ = model(images, prompts)
        logits = torch.nn.functional.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear")
        loss_fn(logits, masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = PeakMemory(device)
    memory.reset()
    start_mb = memory.peak_mb()
    for _ in range(max(warmup - 1, 0)):
        train_step()
    sec_per_step = median_seconds(train_step, steps, device)
    peak = memory.peak_mb()
    gflop = counted_gflop(train_step)
    params = sum(p.numel() for p in model.parameters())
    chosen = resolve_amp(config.amp, device)
    return {"net": config.net, "encoder": config.encoder, "mod": PLAIN, "decoder": "", "grad_ckpt": False, "recompute_mlp": False,
            "amp": f"auto:{chosen}" if config.amp == "auto" else config.amp, "image_size": config.image_size,
            "batch": config.b, "trainable_params": params, "total_params": params,
            "sec_per_step": round(sec_per_step, 4), "images_per_s": round(config.b / sec_per_step, 2),
            "peak_mem_mb": round(peak, 1), "train_mem_mb": round(peak - start_mb, 1),
            "train_gflops_per_s": round(gflop / sec_per_step, 2)}


def training_step(config: Config, batch: tuple, total_steps: int) -> tuple[torch.nn.Module, object, list, Callable]:
    """The trainer's step on `batch` (synthetic_batch's images, masks, prompts).

    Returns the model in training state, its adaptation, the trainable parameters and step(net=model): forward
    under the config's autocast, Dice+CE plus the mode's extra loss, backward, AdamW (inside backward where
    the trainer steps there: `steps_in_backward`), the mode's after-backward hook. `net` may be a compiled
    wrapper of the model."""
    device = resolve_device(config.device)
    model, adaptation = build_model(config, 1, total_steps=total_steps, device=device, verbose=False)
    images, masks, prompts = batch
    params = [p for p in model.parameters() if p.requires_grad]
    # the trainer's optimizer (torch's default decay)
    optimizer = adamw(learning_rate_groups(model, 1e-5, adaptation.lr_ratios), lr=1e-5, weight_decay=1e-2)
    in_backward = steps_in_backward(get_mode(config.mod).saves_all, resolve_amp(config.amp, device), False)
    if in_backward:
        StepInBackward(optimizer)
    loss_fn = PerClassDiceCE()
    step_counter = iter(range(1, 10 ** 9))

    def step(net: torch.nn.Module = model) -> None:
        with autocast_context(config.amp, device):
            logits, _ = net(images, prompts)
        logits = torch.nn.functional.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear")
        loss = loss_fn(logits, masks)
        extra = adaptation.extra_loss()
        (loss if extra is None else loss + extra).backward()  # full fine-tuning: the optimizer steps in here
        if not in_backward:
            optimizer.step()
        adaptation.after_backward(next(step_counter))
        optimizer.zero_grad(set_to_none=True)

    model.train()
    keep_frozen_batchnorm_in_eval(model)  # as the trainer does
    return model, adaptation, params, step


def measure(config: Config, steps: int, warmup: int) -> dict:
    """One row: train `steps` steps after `warmup`, then time inference of base, unmerged and merged models.

    peak_mem_mb is the whole process (CUDA: allocated tensors; CPU: resident set, which includes the
    libraries); train_mem_mb is what training adds on top of the built model, batch and optimizer."""
    device = resolve_device(config.device)
    batch = synthetic_batch(config, 1, device)
    model, adaptation, params, train_step = training_step(config, batch, total_steps=steps + warmup + 10)
    images, _, prompts = batch
    net = compiled(model) if config.compile else model
    memory = PeakMemory(device)
    memory.reset()
    start_mb = memory.peak_mb()  # model, batch and optimizer are in memory; training adds the rest
    started = time.perf_counter()
    train_step(net)  # -compile: compiles here
    first_step = time.perf_counter() - started
    for _ in range(max(warmup - 2, 0)):
        train_step(net)
    sec_per_step = median_seconds(lambda: train_step(net), steps, device, warm=warmup >= 2)  # the first step is a warm-up step
    peak = memory.peak_mb()
    gflop = counted_gflop(train_step)  # counted on the eager model (the same operations)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_weights(path, model, get_mode(config.mod).saves_all, {})
        ckpt_mb = path.stat().st_size / 2 ** 20

    model.eval()
    infer = lambda net: median_seconds(lambda: net(images, prompts), 5, device) * 1000  # noqa: E731
    with torch.no_grad():
        unmerged_ms = infer(model)
        merged_ms = None
        if adaptation.tuner is not None:
            merge_adapters(adaptation)
            merged_ms = infer(model)
        base = build_base(config, 1).to(device)
        base_ms = infer(base.eval())
    chosen = resolve_amp(config.amp, device)
    amp = f"auto:{chosen}" if config.amp == "auto" else config.amp  # what auto chose on this machine
    decoder = config.decoder if "decoder" in get_mode(config.mod).options else ""
    return {"net": config.net, "encoder": config.encoder, "mod": config.mod, "decoder": decoder, "amp": amp,
            "grad_ckpt": config.grad_ckpt, "recompute_mlp": config.recompute_mlp, "compile": config.compile,
            "compile_s": round(first_step - sec_per_step, 1) if config.compile else None,
            "image_size": config.image_size, "batch": config.b, "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in base.parameters()),
            "ckpt_mb": round(ckpt_mb, 2), "sec_per_step": round(sec_per_step, 4),
            "images_per_s": round(config.b / sec_per_step, 2), "peak_mem_mb": round(peak, 1),
            "train_mem_mb": round(peak - start_mb, 1),
            "train_gflops_per_s": round(gflop / sec_per_step, 2), "infer_base_ms": round(base_ms, 2),
            "infer_unmerged_ms": round(unmerged_ms, 2),
            "infer_merged_ms": None if merged_ms is None else round(merged_ms, 2),
            "merged_over_base": None if merged_ms is None else round(merged_ms / base_ms, 3)}


def _measure_in_child(args: tuple[dict, int, int, int]) -> dict:
    values, steps, warmup, threads = args
    torch.set_num_threads(threads)
    config = Config(**values)
    host_memory, _ = set_host_memory(config.host_memory)  # each row runs in a fresh process
    row = (measure_plain if config.mod == PLAIN else measure)(config, steps, warmup)
    return {**row, "host_memory": host_memory}


@contextlib.contextmanager
def started_with(environment: dict[str, str]) -> Iterator[None]:
    """Inside the block, processes start with `environment` (os.environ is restored afterwards)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def merge_rounds(measured: list[dict]) -> dict:
    """One row from a config's rounds: the median round's timings (its seconds per step, throughput, GFLOP/s
    and inference times belong together), the fastest and slowest seconds per step, the highest peaks."""
    median = statistics.median_low(row["sec_per_step"] for row in measured)
    row = dict(next(row for row in measured if row["sec_per_step"] == median))
    times = [row["sec_per_step"] for row in measured]
    row.update(rounds=len(measured), sec_per_step_min=min(times), sec_per_step_max=max(times),
               peak_mem_mb=max(row["peak_mem_mb"] for row in measured),
               train_mem_mb=max(row["train_mem_mb"] for row in measured))
    return row


def run_benchmark(configs: list[Config], steps: int, warmup: int, rounds: int = 1) -> tuple[list[dict], list[float]]:
    """Measure every config in its own process, `rounds` times with the configs taking turns; returns one
    row per config (`merge_rounds`) and every matmul reference measured. A row's `matmul_reference` is the
    mean of the references right before and after its (median) round's process; its `matmul_fraction`
    divides its GFLOP/s by that."""
    device = resolve_device(configs[0].device)
    threads = torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    references, measured = [], [[] for _ in configs]
    for round_number in range(1, rounds + 1):
        for config, measurements in zip(configs, measured):
            before = matmul_gflops(device)
            with started_with(start_up_environment(config.host_memory, os.environ)), context.Pool(1) as pool:
                measurement = pool.apply(_measure_in_child, ((config.to_json(), steps, warmup, threads),))
            after = matmul_gflops(device)
            references += [before, after]
            measurements.append({**measurement, "matmul_reference": round((before + after) / 2, 1)})
            print(f"round {round_number}/{rounds}: {format_row(measurements[-1])}", flush=True)
    rows = []
    for measurements in measured:
        row = merge_rounds(measurements)
        row["matmul_fraction"] = round(row["train_gflops_per_s"] / row["matmul_reference"], 3)
        plain = next((r for r in rows if r["mod"] == PLAIN and (r["net"], r["encoder"], r["amp"])
                      == (row["net"], row["encoder"], row["amp"])), None)
        if plain is not None:
            for column, key in (("time_vs_plain", "sec_per_step"), ("peak_vs_plain", "peak_mem_mb"),
                                ("train_mem_vs_plain", "train_mem_mb")):
                row[column] = round(row[key] / plain[key], 3)
        rows.append(row)
    return rows, references


def format_row(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in COLUMNS if k in row)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def benchmark_table(rows: list[dict]) -> str:
    return markdown_table(COLUMNS, ([_cell(row.get(k)) for k in COLUMNS] for row in rows))


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
