"""The Trainer itself on a tiny SAM (ViT, 2 blocks) at 64 px: AdaLoRA's rank allocation through
train_step/fit/resume, fp16 skipped steps, the world size of last.pt, and which parameters really update."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from cfg import Config
from common.errors import UserError
from engine import checkpoints
from engine.runtime import Runtime
from engine.sampler import steps_per_epoch
from engine.session import load_data, seed_everything
from engine.trainer import Trainer
from models import build_segmenter
from models.modes import apply_mode, get_mode

pytestmark = pytest.mark.usefixtures("one_thread")

SAM_TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
LINEARS = 4 * SAM_TINY["depth"]  # qkv, proj, lin1, lin2 per block
CONFIG = dict(net="sam", encoder="vit_b", image_size=64, dataset="synthetic", synthetic_size=8, b=2, aug="none",
              vis=0, lr=1e-3, adalora_init_r=4, adalora_target_r=2, adalora_tinit=0.1, adalora_tfinal=0.2)


def make_trainer(tmp: Path, mode: str, epochs: int = 2, **overrides) -> Trainer:
    config = Config(mod=mode, epochs=epochs, **{**CONFIG, **overrides})
    data = load_data(config, verbose=False)
    total = steps_per_epoch(len(data.train), config.b) * config.epochs
    seed_everything(config.seed)
    model = build_segmenter("sam", "vit_b", config.image_size, data.num_classes, **SAM_TINY)
    options = {name: getattr(config, name) for name in get_mode(mode).options}
    adaptation = apply_mode(model, mode, total, **options)
    return Trainer(config, Runtime(torch.device("cpu")), model, adaptation, data.train, data.val, data.class_names,
                   tmp / "run", tmp / "figs")


class Killed(Exception):
    pass


def kill_after_epoch(trainer: Trainer, epoch: int) -> None:
    """Make `trainer` stop (like a kill) right after it wrote last.pt at the end of `epoch`."""
    save = trainer._save_last

    def save_then_die():
        save()
        if trainer.state.epoch == epoch + 1:
            raise Killed

    trainer._save_last = save_then_die


def lora_e(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_E" in n}


# ----------------------------------------------------------------------------- AdaLoRA through the trainer
def test_adalora_budget_falls_to_target_through_fit_and_resume_continues_it(tmp_path):
    whole = make_trainer(tmp_path / "whole", "sam_adalora", epochs=4)  # 4 steps per epoch, 16 in all
    history = whole.fit()
    ranks = [row["total_rank"] for row in history]
    assert ranks[0] < 4 * LINEARS, f"the allocator pruned nothing during the run: {ranks}"
    assert ranks[-1] == 2 * LINEARS, f"total rank {ranks[-1]} did not reach the target {2 * LINEARS}: {ranks}"
    assert ranks == sorted(ranks, reverse=True)

    killed = make_trainer(tmp_path / "killed", "sam_adalora", epochs=4)
    kill_after_epoch(killed, 2)
    with pytest.raises(Killed):
        killed.fit()
    resumed = make_trainer(tmp_path / "killed", "sam_adalora", epochs=4)
    resumed.resume()
    assert resumed.state.epoch == 3
    again = resumed.fit()
    assert [row["total_rank"] for row in again] == ranks
    assert resumed.adaptation.tuner.rank_pattern == whole.adaptation.tuner.rank_pattern
    for name, value in lora_e(whole).items():
        torch.testing.assert_close(lora_e(resumed)[name], value, atol=1e-5, rtol=0)


def test_adalora_singular_values_train_at_their_ratio_of_the_rate_through_the_schedule(tmp_path):
    """-adalora_e_lr_ratio: lora_E in its own AdamW group at lr x ratio, every other trainable tensor at lr; the
    learning-rate schedule scales both groups alike."""
    trainer = make_trainer(tmp_path, "sam_adalora", adalora_e_lr_ratio=8.0, sched="cosine")
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    base, singular = trainer.optimizer.param_groups
    assert base["lr"] == pytest.approx(1e-3) and singular["lr"] == pytest.approx(8e-3)
    assert all("lora_E" in names[id(p)] for p in singular["params"]) and len(singular["params"]) == LINEARS
    assert not any("lora_E" in names[id(p)] for p in base["params"])
    assert len(base["params"]) + len(singular["params"]) == len(trainer.params)
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2)))
    for _ in range(3):
        trainer.train_step(batch)
    assert singular["lr"] == pytest.approx(8 * base["lr"]) and base["lr"] < 1e-3  # the schedule moved both
    assert len(make_trainer(tmp_path / "default", "sam_adalora").optimizer.param_groups) == 1


def test_skipped_fp16_step_leaves_adalora_importance_finite(tmp_path):
    """A step the gradient scaler skips (inf gradients) must not reach AdaLoRA's allocator."""
    trainer = make_trainer(tmp_path, "sam_adalora", epochs=4)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)  # what -amp fp16 uses, on the CPU
    target = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    overflow = target.register_hook(lambda grad: grad * float("inf"))  # a forced overflow
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2)))
    trainer.train_step(batch)
    overflow.remove()
    assert trainer.scaler.get_scale() < 2.0 ** 8, "the scaler should have skipped the step"
    trainer.train_step(batch)
    scores = trainer.adaptation.budget.state_dict()
    assert scores["ipt"]
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        broken = [n for n, v in scores[key].items() if not torch.isfinite(v).all()]
        assert not broken, f"{key} holds NaN/inf after a skipped step: {broken[:2]}"


# ----------------------------------------------------------------------------- resume under another world size
def test_resume_refuses_another_number_of_processes(tmp_path):
    trainer = make_trainer(tmp_path, "sam_lora", epochs=2)
    kill_after_epoch(trainer, 1)
    with pytest.raises(Killed):
        trainer.fit()
    path = tmp_path / "run" / checkpoints.LAST_STATE
    state = checkpoints.load_state(path)
    assert state.get("world_size") == 1, "last.pt must record the number of processes"
    state["world_size"] = 2  # as if the run had been started with torchrun --nproc_per_node 2
    checkpoints.save_state(path, state)
    with pytest.raises(UserError, match="--nproc_per_node 2"):
        make_trainer(tmp_path, "sam_lora", epochs=2).resume()


# ----------------------------------------------------------------------------- trainable vs updated
@pytest.mark.parametrize("mode", ["sam_decoder", "sam_lora", "sam_full"])  # sam_full: seen while stepping in backward
def test_parameter_table_tells_trainable_from_updated(tmp_path, mode):
    trainer = make_trainer(tmp_path, mode)
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2)))
    grads = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            param.register_hook(lambda grad, name=name: grads.__setitem__(name, grad.detach().clone()))
    seen = set()
    for _ in range(2):  # LoRA's A gets no gradient while its zero-initialised B is still zero (step 1)
        grads.clear()
        trainer.train_step(batch)
        seen |= {n for n, g in grads.items() if torch.count_nonzero(g) > 0}
    updated = sum(p.numel() for n, p in trainer.model.named_parameters() if n in seen)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert updated < trainable  # the IoU head and the unused mask tokens' hypernetworks get no gradient
    if mode == "sam_lora":  # every encoder adapter counts as updated, its A halves included
        assert all(n in seen for n, p in trainer.model.named_parameters() if p.requires_grad and ".lora_" in n)
    counts = trainer.updated_parameters
    assert counts is not None and sum(counts.values()) == updated
    row = trainer._epoch_row()
    assert (row["trainable_params"], row["updated_params"]) == (trainable, updated)
    from engine.session import format_parameter_table

    table = format_parameter_table(trainer.model, mode, counts)
    header, all_row = table.splitlines()[1], table.splitlines()[-1]
    assert "updated" in header
    assert all_row.split()[1:3] == [f"{trainable:,}", f"{updated:,}"]


def test_full_fine_tuning_steps_in_backward_to_the_same_weights(tmp_path):
    trainers = [make_trainer(tmp_path / name, "sam_full") for name in ("in_backward", "after")]
    assert trainers[0].stepping_in_backward is not None
    trainers[1].stepping_in_backward.remove()
    trainers[1].stepping_in_backward = None
    batch = next(iter(torch.utils.data.DataLoader(trainers[0].train_set, batch_size=2)))
    start = {n: p.detach().clone() for n, p in trainers[0].model.named_parameters()}
    losses = [[trainer.train_step(batch) for _ in range(3)] for trainer in trainers]
    assert losses[0] == losses[1]
    weights = [dict(trainer.model.named_parameters()) for trainer in trainers]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in start)
    assert sum(not torch.equal(weights[0][n], start[n]) for n in start) > len(start) // 2
    assert make_trainer(tmp_path / "adapters", "sam_lora").stepping_in_backward is None


# ----------------------------------------------------------------------------- -val_freq 0
def test_val_freq_zero_never_validates_and_keeps_the_final_weights(tmp_path):
    from safetensors.torch import load_file

    trainer = make_trainer(tmp_path, "sam_lora", epochs=2, val_freq=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-legend warning from the curves without validation
        history = trainer.fit()
    assert not any(key.startswith("val_") for row in history for key in row)
    best, last = load_file(tmp_path / "run" / "best.safetensors"), load_file(tmp_path / "run" / "last.safetensors")
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
