"""The training loop: step, validate, log metrics and memory, write checkpoints and figures."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from cfg import Config
from common.errors import UserError
from models.modes import get_mode
from models.modes.adaptation import Adaptation, parameter_parts, trainable_without_gradient
from models.segmenter import PromptableSegmenter
from common.progress import progress as progress_bar

from . import checkpoints
from .amp import resolve_amp
from .evaluation import EvalSettings, IndexedDataset, autocast_context, evaluate, predict_logits, resize_target
from .logbook import TensorBoardLog, format_number, plot_curves, write_metrics_csv
from .loss import PerClassDiceCE
from .optim import StepInBackward, adamw, learning_rate_groups, steps_in_backward
from .peft_format import PEFT_DIR, write_peft_folder
from .runtime import PeakMemory, Runtime, compiled, synchronize
from .sampler import EpochShuffleSampler


def learning_rate_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at `step` of `total` (stepped every iteration)."""
    progress = min(step / max(total, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** int(progress >= 2 / 3)
    return 1.0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """Frozen BatchNorm layers (TinyViT's in the PEFT modes) keep their running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.eval()


# Zero-initialised adapter halves (LoRA's B, the Adapter's up-projection, AdaLoRA's E) leave their partners
# without gradient in the very first step; from the second step on every trained parameter has one.
UPDATE_PROBE_STEPS = 2


def nonzero_gradient_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters()
            if param.requires_grad and param.grad is not None and bool(torch.count_nonzero(param.grad))}


def updated_parameter_counts(model: nn.Module, mode: str, updated: set[str]) -> dict[str, int]:
    """Per part of the parameter table, the trainable elements among `updated` (the parameters whose gradient
    was non-zero in the first UPDATE_PROBE_STEPS steps): trainable parameters that never get one (SAM's IoU
    head, the hypernetworks of the mask tokens no class reads) are counted as trainable but not as updated."""
    counts: dict[str, int] = {}
    for part, name, param in parameter_parts(model, get_mode(mode).adapter_prefix):
        if name in updated:
            counts[part] = counts.get(part, 0) + param.numel()
    return counts


@dataclass
class TrainState:
    """Everything that changes during a run and must survive a kill (kept in last.pt)."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    images_seen: int = 0
    seconds: float = 0.0
    best_dice: float = -1.0
    history: list = field(default_factory=list)


class Trainer:
    """Trains one adapted segmenter; only the main process writes files."""

    def __init__(self, config: Config, runtime: Runtime, model: PromptableSegmenter, adaptation: Adaptation,
                 train_set: Dataset, val_set: Dataset, class_names: list[str], run_dir: Path, figs_dir: Path,
                 checkpoint_every: int = 0):
        self.config, self.runtime, self.model, self.adaptation = config, runtime, model, adaptation
        self.train_set, self.val_set, self.class_names = train_set, val_set, class_names
        self.run_dir, self.figs_dir, self.checkpoint_every = Path(run_dir), Path(figs_dir), checkpoint_every
        self.sampler = EpochShuffleSampler(len(train_set), config.b * runtime.world_size, config.seed,
                                           runtime.rank, runtime.world_size)
        self.total_steps = self.sampler.steps_per_epoch() * config.epochs
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.parameter_names = {param: name for name, param in model.named_parameters()}
        self.saves_all = get_mode(config.mod).saves_all  # full fine-tuning: checkpoints hold every tensor
        self.optimizer = adamw(learning_rate_groups(model, config.lr, adaptation.lr_ratios), config.lr,
                               config.weight_decay)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # learning_rate_factor scales them
        self.amp = resolve_amp(config.amp, runtime.device, announce=runtime.is_main)  # auto: what it chose
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.stepping_in_backward = None
        if steps_in_backward(self.saves_all, self.amp, runtime.distributed):
            self.stepping_in_backward = StepInBackward(self.optimizer, on_gradient=self._probe_gradient)
        self.loss_fn = PerClassDiceCE()
        self.memory = PeakMemory(runtime.device)
        self.state = TrainState()
        self.embedding_cache: dict[int, Tensor] = {}
        if config.cache_embeddings:
            self.train_set = IndexedDataset(train_set)
        self.updated_parameters: Optional[dict[str, int]] = None  # per part, after UPDATE_PROBE_STEPS steps
        self.gradient_seen: set[str] = set()
        self.network = model
        if runtime.distributed:
            # find_unused (an extra graph traversal every step) only where a trainable parameter may get no
            # gradient: the IoU head when the decoder trains fully, the prompt encoder in sam_full, ...;
            # static_graph failed with sam_lora
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.network = DistributedDataParallel(model, device_ids=device_ids,
                                                   find_unused_parameters=bool(trainable_without_gradient(model)))
        if config.compile:  # the forward (and its backward) of the training step; checkpoints use self.model
            self.network = compiled(self.network)
        self.tensorboard = TensorBoardLog(self.run_dir / "tensorboard" if runtime.is_main else None)

    def _probe_gradient(self, param: nn.Parameter) -> None:
        """While stepping in backward: what `nonzero_gradient_names` would see after it."""
        if self.updated_parameters is None and bool(torch.count_nonzero(param.grad)):
            self.gradient_seen.add(self.parameter_names[param])

    # ----------------------------------------------------------------------------- resume
    def resume(self) -> None:
        saved = checkpoints.load_state(self.run_dir / checkpoints.LAST_STATE)
        world = saved.get("world_size", self.runtime.world_size)  # last.pt files before it was recorded
        if world != self.runtime.world_size:
            # steps per epoch, total steps, the AdaLoRA budget and the resume point all depend on it
            how = f"torchrun --nproc_per_node {world} train.py" if world > 1 else "python train.py"
            raise UserError(f"{self.run_dir} was trained by {world} process(es), this is {self.runtime.world_size}: "
                            f"resume it the same way, {how} -resume {self.run_dir}")
        own = self.model.state_dict()
        self.model.load_state_dict({k: v.to(own[k].device) for k, v in saved["model"].items()}, strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.adaptation.load_state_dict(saved["adaptation"])
        self.state = TrainState(**saved["train_state"])
        self._schedule_learning_rate()
        if self.state.global_step and self.updated_parameters is None:
            self.updated_parameters = saved.get("updated_parameters")
        set_rng_state(saved["rng"])

    def _wait_for_writer(self) -> None:
        """Every rank waits until the main process has written a file that other ranks may read next
        (train.py's final evaluation loads best.safetensors on every rank)."""
        if self.runtime.distributed:
            dist.barrier()

    def _save_last(self) -> None:
        if not self.runtime.is_main:
            self._wait_for_writer()
            return
        state = {"model": checkpoints.changed_tensors(self.model, self.saves_all), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "adaptation": self.adaptation.state_dict(),
                 "train_state": vars(self.state).copy(),
                 "rng": rng_state(), "world_size": self.runtime.world_size,
                 "updated_parameters": self.updated_parameters}
        checkpoints.save_state(self.run_dir / checkpoints.LAST_STATE, state)
        self._wait_for_writer()

    def _save_weights(self, name: str) -> None:
        if self.runtime.is_main:
            metadata = {"net": self.config.net, "encoder": self.config.encoder, "mod": self.config.mod}
            checkpoints.save_weights(self.run_dir / name, self.model, self.saves_all, metadata)
            if name == "best.safetensors":  # the same weights in peft's own format (engine/peft_format.py)
                write_peft_folder(self.run_dir / PEFT_DIR, self.model, self.adaptation, metadata)
        self._wait_for_writer()

    # ----------------------------------------------------------------------------- training
    @torch.no_grad()
    def cached_embeddings(self, batch: dict) -> Tensor:
        """-cache_embeddings: the frozen encoder's output per sample, computed once (images never change)."""
        missing = [i for i, index in enumerate(batch["index"].tolist()) if index not in self.embedding_cache]
        if missing:
            images = batch["image"][missing].to(self.runtime.device)
            valid_hw = batch["valid_hw"][missing].to(self.runtime.device)
            with autocast_context(self.config.amp, self.runtime.device):
                computed = self.model.encode(images, valid_hw).float().cpu()
            for row, i in enumerate(missing):
                self.embedding_cache[int(batch["index"][i])] = computed[row]
        stacked = torch.stack([self.embedding_cache[int(index)] for index in batch["index"]])
        return stacked.to(self.runtime.device, non_blocking=True)

    def train_step(self, batch: dict) -> float:
        size = self.config.out_size or self.config.image_size
        embeddings = self.cached_embeddings(batch) if self.config.cache_embeddings else None
        logits = predict_logits(self.network, batch, self.runtime.device, self.config.amp, size, embeddings)
        target = resize_target(batch["mask"].to(self.runtime.device), size)
        loss = self.loss_fn(logits, target)
        extra = self.adaptation.extra_loss()
        total = loss if extra is None else loss + extra
        self.scaler.scale(total).backward()  # full fine-tuning: the optimizer steps in here (StepInBackward)
        if self.updated_parameters is None:
            self.gradient_seen |= nonzero_gradient_names(self.model)
            if self.state.global_step + 1 >= UPDATE_PROBE_STEPS:
                self.updated_parameters = updated_parameter_counts(self.model, self.adaptation.mode,
                                                                   self.gradient_seen)
        scale = self.scaler.get_scale()
        if self.stepping_in_backward is None:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.global_step += 1
        # -amp fp16: the scaler skips a step with inf/NaN gradients (and lowers its scale); AdaLoRA's
        # allocator must not see those gradients (one call makes its importance scores NaN for good)
        if self.scaler.get_scale() >= scale:
            self.adaptation.after_backward(self.state.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        self._schedule_learning_rate()
        return float(loss.detach())

    def _schedule_learning_rate(self) -> None:
        """Each group's rate for the next step: its base rate x the -sched factor at the global step."""
        factor = learning_rate_factor(self.config.sched, self.state.global_step, self.total_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def _train_epoch(self) -> None:
        state, config = self.state, self.config
        self.model.train()
        keep_frozen_batchnorm_in_eval(self.model)
        self.sampler.set_epoch(state.epoch, skip_steps=state.step_in_epoch)
        self.train_set.set_epoch(state.epoch)
        loader = DataLoader(self.train_set, batch_size=config.b, sampler=self.sampler, num_workers=config.workers,
                            pin_memory=self.runtime.device.type == "cuda", drop_last=True)
        progress = progress_bar(loader, desc=f"epoch {state.epoch}/{config.epochs}", disable=not self.runtime.is_main)
        steps = self.sampler.steps_per_epoch()
        synchronize(self.runtime.device)
        started = time.perf_counter()
        for batch in progress:
            unknown = self.updated_parameters is None
            loss = self.train_step(batch)
            if unknown and self.updated_parameters is not None and self.runtime.is_main:
                from .session import format_parameter_table

                progress.write(format_parameter_table(self.model, self.config.mod, self.updated_parameters))
            state.loss_sum += loss * batch["image"].shape[0]
            state.images_seen += batch["image"].shape[0]
            state.step_in_epoch += 1
            progress.set_postfix(loss=f"{loss:.4f}")
            self.tensorboard.step_scalars({"train/loss_step": loss, "train/lr_step": self.optimizer.param_groups[0]["lr"]},
                                          (state.epoch - 1) * steps + state.step_in_epoch)
            if self.checkpoint_every and state.step_in_epoch % self.checkpoint_every == 0:
                synchronize(self.runtime.device)
                state.seconds += time.perf_counter() - started
                started = time.perf_counter()
                self._save_last()
        synchronize(self.runtime.device)
        state.seconds += time.perf_counter() - started

    def _epoch_row(self) -> dict:
        state, world = self.state, self.runtime.world_size
        loss_sum = torch.tensor([state.loss_sum, float(state.images_seen)], dtype=torch.float64)
        if self.runtime.distributed:
            dist.all_reduce(loss_sum)
        steps = self.sampler.steps_per_epoch()
        row = {"epoch": state.epoch, "train_loss": float(loss_sum[0] / loss_sum[1]),
               "lr": self.optimizer.param_groups[0]["lr"], "peak_mem_mb": round(self.memory.peak_mb(), 1),
               "images_per_s": round(float(loss_sum[1]) / max(state.seconds, 1e-9), 3),
               "sec_per_step": round(state.seconds / steps, 4),
               "trainable_params": sum(p.numel() for p in self.params),
               "updated_params": sum((self.updated_parameters or {}).values()), "world_size": world}
        rank = self.adaptation.total_rank()
        if rank is not None:
            row["total_rank"] = rank
        return row

    def fit(self) -> list[dict]:
        config, state = self.config, self.state
        while state.epoch <= config.epochs:
            self.memory.reset()
            self._train_epoch()
            row = self._epoch_row()
            if not config.val_freq:  # never validated: the final weights are the ones tested
                if state.epoch == config.epochs:
                    self._save_weights("best.safetensors")
            elif state.epoch % config.val_freq == 0 or state.epoch == config.epochs:
                summary = evaluate(self.model, self.val_set, EvalSettings.of(config), self.runtime, self.class_names,
                                   "val")
                row.update({f"val_{k}": v for k, v in summary.items() if k != "images"})
                if summary["dice_mean"] > state.best_dice:
                    state.best_dice = summary["dice_mean"]
                    self._save_weights("best.safetensors")
            self._save_weights("last.safetensors")
            state.history.append(row)
            self._report(row)
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            state.loss_sum, state.images_seen, state.seconds = 0.0, 0, 0.0
            self._save_last()
        self.tensorboard.close()
        return state.history

    # ----------------------------------------------------------------------------- outputs
    def _report(self, row: dict) -> None:
        if not self.runtime.is_main:
            return
        print(" ".join(f"{k}={format_number(v)}" for k, v in row.items()), flush=True)
        write_metrics_csv(self.run_dir / "metrics.csv", self.state.history)
        plot_curves(self.state.history, self.figs_dir / "curves.png", self.run_dir.name)
        self.tensorboard.scalars(row, row["epoch"])
        if self.config.vis and row["epoch"] % self.config.vis == 0:
            path = self.figs_dir / f"overlay_epoch{row['epoch']:03d}.png"
            save_prediction_overlays(self.model, self.val_set, self.config, self.runtime.device, path,
                                     f"{self.run_dir.name} epoch {row['epoch']}")
            self.tensorboard.image("val_overlays", path, row["epoch"])


@torch.no_grad()
def save_prediction_overlays(model: PromptableSegmenter, dataset: Dataset, config: Config, device: torch.device,
                             path: Path, title: str, count: int = 4) -> None:
    """Image, ground truth, prediction and prompt for the first samples of `dataset`."""
    from .overlays import save_overlay_grid

    was_training = model.training
    model.eval()
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = torch.utils.data.default_collate(samples)
    logits = predict_logits(model, batch, device, config.amp, config.image_size)
    save_overlay_grid(samples, path, predictions=list((logits > 0).cpu()), title=title)
    model.train(was_training)
