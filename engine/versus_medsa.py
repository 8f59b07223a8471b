"""Our training step beside Medical-SAM-Adapter's (Med-SA) own, on this machine, in one sitting.

Med-SA's model code is imported at run time from a checkout the user names; nothing of it is copied here.
Its step is the one its `function.train_sam` takes on 2-D data: the mode's freezing (every step, as there),
image encoder, prompt encoder without gradients, mask decoder, resize to the mask, BCE-with-logits
(pos_weight 2), backward, Adam over all parameters, zero_grad; AdaLoRA adds its orthogonality term and the
RankAllocator that `train_sam` builds anew every batch. One click per image, random weights, fp32, 256 px.
Ours is benchmark.py's step (`engine.benchmark.training_step`). Each toolkit runs in a process of its own
(`serve_steps`), Med-SA's under the C library's memory defaults as its users run it, ours under -host_memory
reuse as train.py runs; the parent takes single steps from the two in turn, so both see the same phase of
a machine whose speed drifts, and `summarise` gives the median over those pairs. This module imports
nothing of the toolkit's models, whose package name Med-SA's shares.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch
import torch.nn.functional as F

from common.errors import UserError

from .runtime import PeakMemory

IMAGE_SIZE = 256
MEDSA_REGISTRIES = {"sam": "models.sam", "efficient_sam": "models.efficient_sam",
                    "mobile_sam": "models.MobileSAMv2.mobilesamv2"}


@dataclass(frozen=True)
class Row:
    net: str
    encoder: str
    mod: str
    batch: int

    @property
    def spec(self) -> str:
        return f"{self.net}:{self.encoder}:{self.mod}:{self.batch}"

    @classmethod
    def parse(cls, spec: str) -> "Row":
        parts = spec.split(":")
        if len(parts) != 4 or parts[0] not in MEDSA_REGISTRIES or not parts[3].isdigit():
            raise UserError(f"-rows: {spec!r} is not net:encoder:mod:batch with net one of "
                            f"{', '.join(MEDSA_REGISTRIES)} (e.g. mobile_sam:tiny_vit:sam_lora:1)")
        return cls(parts[0], parts[1], parts[2], int(parts[3]))


# the rows of issue 16's comparison: Med-SA's nets at 256 px, the batch it was measured at
DEFAULT_ROWS = tuple(Row.parse(spec) for spec in (
    "sam:vit_b:sam_lora:2", "sam:vit_b:sam_adpt:2", "sam:vit_b:sam_full:2",
    "mobile_sam:tiny_vit:sam_lora:1", "mobile_sam:tiny_vit:sam_adpt:1", "mobile_sam:tiny_vit:sam_adalora:1",
    "efficient_sam:vit_t:sam_lora:1", "efficient_sam:vit_t:sam_adpt:1", "efficient_sam:vit_s:sam_lora:1"))


def check_checkout(checkout: Path) -> None:
    """A one-line error unless `checkout` holds Med-SA's cfg.py and models."""
    if not (checkout / "cfg.py").is_file() or not (checkout / "models" / "sam" / "build_sam.py").is_file():
        raise UserError(f"-medsa: {checkout} is not a Medical-SAM-Adapter checkout (no cfg.py and "
                        f"models/sam/build_sam.py); clone github.com/KidsWithTokens/Medical-SAM-Adapter")


def _medsa_args(checkout: Path, row: Row):
    """Med-SA's own argument namespace for `row` (its cfg.parse_args reads sys.argv, so argv is lent to it)."""
    spec = importlib.util.spec_from_file_location("medsa_cfg", checkout / "cfg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved, sys.argv = sys.argv, ["train.py", "-net", row.net, "-encoder", row.encoder, "-mod", row.mod,
                                 "-image_size", str(IMAGE_SIZE), "-out_size", str(IMAGE_SIZE), "-b", str(row.batch)]
    try:
        return module.parse_args()
    finally:
        sys.argv = saved


def _medsa_net(checkout: Path, row: Row, args) -> torch.nn.Module:
    # its mobile_sam imports MobileSAMv2's EfficientViT trainers, which import torchpack and onnxsim; the
    # TinyViT path never calls them, so empty modules stand in where they are not installed
    if importlib.util.find_spec("torchpack") is None:
        distributed = sys.modules["torchpack.distributed"] = types.ModuleType("torchpack.distributed")
        sys.modules["torchpack"] = types.ModuleType("torchpack")
        sys.modules["torchpack"].distributed = distributed
    if importlib.util.find_spec("onnxsim") is None:
        sys.modules["onnxsim"] = types.ModuleType("onnxsim")
        sys.modules["onnxsim"].simplify = None
    # its models/ is a namespace folder (no __init__.py), which the toolkit's own models package would
    # shadow: bind the name to Med-SA's folder before anything imports it
    if "models" in sys.modules:
        raise RuntimeError("Med-SA's step must run in a process that has not imported the toolkit's models")
    sys.path.append(str(checkout))  # last: the toolkit's cfg (for its error lines) must win over Med-SA's
    models = types.ModuleType("models")
    models.__path__ = [str(checkout / "models")]
    sys.modules["models"] = models
    try:
        registry = importlib.import_module(MEDSA_REGISTRIES[row.net]).sam_model_registry
    except ModuleNotFoundError as error:
        raise UserError(f"-medsa: Medical-SAM-Adapter's {row.net} needs the package {error.name}; "
                        f"install it with pip install {error.name}") from error
    if row.encoder not in registry:
        raise UserError(f"-rows: Med-SA's {row.net} has no encoder {row.encoder!r} ({', '.join(registry)})")
    if row.net == "efficient_sam":
        return registry[row.encoder](args)
    if row.net == "mobile_sam":
        return registry[row.encoder](args, checkpoint=None)
    with tempfile.TemporaryDirectory() as folder:  # its SAM builder opens a file: an empty state dict, random weights
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        return registry[row.encoder](args, checkpoint=str(empty))


def medsa_step(checkout: Path, row: Row) -> Callable[[], None]:
    """Med-SA's training step for `row` on CPU (see the module docstring)."""
    check_checkout(checkout)
    net = _medsa_net(checkout, row, _medsa_args(checkout, row)).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-08, weight_decay=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(row.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    masks = (torch.rand(row.batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) > 0.5).float()
    clicks = torch.randint(0, IMAGE_SIZE, (row.batch, 1, 2), generator=generator).float()
    labels = torch.ones(row.batch, 1, dtype=torch.int)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full([1], 2.0))
    lora = importlib.import_module("models.common.loralib") if row.mod in ("sam_lora", "sam_adalora") else None
    steps = iter(range(1, 10 ** 9))

    def freeze() -> None:
        if lora is not None:
            lora.mark_only_lora_as_trainable(net.image_encoder)
            return
        for name, parameter in net.image_encoder.named_parameters():
            parameter.requires_grad = "Adapter" in name if row.mod == "sam_adpt" else True

    def decode(embeddings: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if row.net == "efficient_sam":  # its prompt layout: six points per query, scaled to 1024, -1 padding
                points = F.pad(clicks * 1024 / IMAGE_SIZE, (0, 0, 0, 5), value=-1.0)
                sparse = net.prompt_encoder(points, F.pad(labels.float(), (0, 5), value=-1.0))
            else:
                sparse, dense = net.prompt_encoder(points=(clicks, labels), boxes=None, masks=None)
        if row.net == "efficient_sam":
            return net.mask_decoder(image_embeddings=embeddings, image_pe=net.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse[:, None], multimask_output=False)[0]
        return net.mask_decoder(image_embeddings=embeddings, image_pe=net.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)[0]

    def step() -> None:
        index = next(steps)
        freeze()
        if row.mod == "sam_adalora":
            allocator = lora.RankAllocator(net.image_encoder, lora_r=4, target_rank=8, init_warmup=500,
                                           final_warmup=1500, mask_interval=10, total_step=3000,
                                           beta1=0.85, beta2=0.85)
        prediction = F.interpolate(decode(net.image_encoder(images)), size=(IMAGE_SIZE, IMAGE_SIZE))
        loss = criterion(prediction, masks)
        if row.mod == "sam_adalora":
            (loss + lora.compute_orth_regu(net, regu_weight=0.1)).backward()
        else:
            loss.backward()
        optimizer.step()
        if row.mod == "sam_adalora":
            allocator.update_and_mask(net, index)
        optimizer.zero_grad()

    return step


def ours_step(row: Row) -> Callable[[], None]:
    """benchmark.py's training step for `row` on CPU, under -host_memory reuse as train.py runs (the process
    must have started with `start_up_environment("reuse", ...)` for glibc's thread cache to be off)."""
    from cfg import Config
    from engine.benchmark import synthetic_batch, training_step
    from engine.host_memory import set_host_memory

    set_host_memory("reuse")
    config = Config(net=row.net, encoder=row.encoder, mod=row.mod, b=row.batch, image_size=IMAGE_SIZE,
                    amp="none", sam_ckpt="random", device="cpu")
    return training_step(config, synthetic_batch(config, 1, torch.device("cpu")), total_steps=1000)[3]


def serve_steps(step: Callable[[], None], commands: TextIO, replies: TextIO) -> None:
    """Run `step` as the parent of a sitting asks, one JSON line per command, until `commands` ends:
    "warm N": N untimed steps; "step": one step and its seconds; "memory": the process's peak RSS (MB) and
    how far the steps raised it above the RSS before the first (model, batch, optimizer, libraries built)."""
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    before = memory.peak_mb()
    for command in commands:
        word, *count = command.split()
        if word == "warm":
            for _ in range(int(count[0])):
                step()
            reply = {"warm": int(count[0])}
        elif word == "step":
            started = time.perf_counter()
            step()
            reply = {"seconds": time.perf_counter() - started}
        elif word == "memory":
            peak = memory.peak_mb()
            reply = {"peak_mb": peak, "added_mb": peak - before}
        else:
            raise ValueError(f"unknown command {command.strip()!r}: warm N, step or memory")
        print(json.dumps(reply), file=replies, flush=True)


def summarise(measured: dict) -> dict:
    """One row's line from its paired steps ({row, medsa_s, ours_s: seconds of the same pairs, in order;
    medsa_/ours_ peak_mb and added_mb}): each toolkit's median step; speed, the median over the pairs of
    Med-SA's seconds / ours (speed_q1, speed_q3: their quartiles); peak_ratio and added_ratio = ours / Med-SA's."""
    medsa, ours = measured["medsa_s"], measured["ours_s"]
    if not medsa or len(medsa) != len(ours):
        raise ValueError(f"{measured['row']}: as many steps of each toolkit are needed, got {len(medsa)} and {len(ours)}")
    ratios = sorted(m / o for m, o in zip(medsa, ours))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    line = {"row": measured["row"], "pairs": len(ratios), "medsa_s": statistics.median(medsa),
            "ours_s": statistics.median(ours), "speed": statistics.median(ratios), "speed_q1": q1, "speed_q3": q3}
    for toolkit in ("medsa", "ours"):
        line |= {f"{toolkit}_peak_mb": measured[f"{toolkit}_peak_mb"], f"{toolkit}_added_mb": measured[f"{toolkit}_added_mb"]}
    line["peak_ratio"] = line["ours_peak_mb"] / line["medsa_peak_mb"]
    line["added_ratio"] = line["ours_added_mb"] / line["medsa_added_mb"]
    return line


def sitting_header(checkout: Path, pairs: int, warmup: int) -> str:
    """One line naming what the table's figures depend on: Med-SA's commit, torch, threads, the matmul rate."""
    import subprocess

    from .benchmark import matmul_gflops

    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = found.stdout.strip() if found.returncode == 0 else "unknown (not a git checkout)"
    return (f"Medical-SAM-Adapter {commit} against the toolkit; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, matmul reference {matmul_gflops(torch.device('cpu')):.0f} GFLOP/s "
            f"(fp32, at the start); per row, both toolkits in their own fresh process, {warmup} warm-up steps each, "
            f"then {pairs} pairs of steps taken in turn (Med-SA first in every other pair)")


def versus_table(lines: list[dict]) -> str:
    from common.tables import markdown_table

    headers = ("net:encoder:mod:batch", "Med-SA s/step", "ours s/step", "speed vs Med-SA (pairs' quartiles)",
               "Med-SA peak MB", "ours peak MB", "peak vs Med-SA", "Med-SA added MB", "ours added MB",
               "added vs Med-SA")
    return markdown_table(headers, [(
        line["row"], f"{line['medsa_s']:.3f}", f"{line['ours_s']:.3f}",
        f"{line['speed']:.2f}x ({line['speed_q1']:.2f}-{line['speed_q3']:.2f})",
        f"{line['medsa_peak_mb']:,.0f}", f"{line['ours_peak_mb']:,.0f}", f"{line['peak_ratio']:.2f}x",
        f"{line['medsa_added_mb']:,.0f}", f"{line['ours_added_mb']:,.0f}", f"{line['added_ratio']:.2f}x")
        for line in lines])
