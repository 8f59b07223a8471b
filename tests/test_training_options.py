"""Training options: AMP, embedding cache, worker errors reach the user as one line."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cfg import Config
from common.cli import one_line
from common.errors import UserError
from engine.runtime import Runtime
from engine.session import build_model, load_data
from engine.evaluation import autocast_context, predict_logits, prompts_from_batch
from engine.trainer import Trainer


def small_run(tmp_path, **changes) -> tuple[Trainer, Config]:
    config = Config(image_size=64, synthetic_size=8, b=2, epochs=1, vis=0, **changes)
    data = load_data(config, verbose=False)
    model, adaptation = build_model(config, data.num_classes, 4, torch.device("cpu"), verbose=False)
    trainer = Trainer(config, Runtime(torch.device("cpu")), model, adaptation, data.train, data.val,
                      data.class_names, tmp_path / "run", tmp_path / "figs")
    return trainer, config


def test_bf16_autocast_runs_and_keeps_loss_float32(tmp_path):
    trainer, config = small_run(tmp_path, amp="bf16")
    batch = next(iter(DataLoader(trainer.train_set, batch_size=2)))
    with autocast_context("bf16", torch.device("cpu")):
        raw, _ = trainer.model(batch["image"], prompts_from_batch(batch, torch.device("cpu")))
    assert raw.dtype == torch.bfloat16  # the net really runs in bf16
    logits = predict_logits(trainer.model, batch, torch.device("cpu"), "bf16", 64)
    assert logits.dtype == torch.float32
    loss = trainer.train_step(batch)
    assert isinstance(loss, float) and loss == loss


def test_fp16_needs_cuda():
    with pytest.raises(UserError, match="-amp fp16"):
        autocast_context("fp16", torch.device("cpu"))


def test_cached_embeddings_encode_each_image_once(tmp_path):
    trainer, _ = small_run(tmp_path, mod="sam_decoder", aug="none", cache_embeddings=True)
    calls = []
    encode = trainer.model.encode
    trainer.model.encode = lambda images, valid_hw: calls.append(images.shape[0]) or encode(images, valid_hw)
    trainer._train_epoch()  # epoch 1 fills the cache
    filled = sum(calls)
    assert filled == len(trainer.train_set) and len(trainer.embedding_cache) == len(trainer.train_set)
    trainer.state.epoch, trainer.state.step_in_epoch = 2, 0
    trainer._train_epoch()  # epoch 2 reuses it: no new encodes
    assert sum(calls) == filled


def test_worker_error_becomes_one_line():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise UserError("cannot decode image x.jpg: re-download or remove it")

    with pytest.raises(UserError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert one_line(caught.value) == "cannot decode image x.jpg: re-download or remove it"


def test_console_numbers_and_tensorboard_tags():
    from engine.logbook import format_number, tensorboard_tag

    assert [format_number(v) for v in (1e-5, 0.123456, 3, 12.0, 0.0)] == ["1e-05", "0.1235", "3", "12", "0"]
    assert [tensorboard_tag(k) for k in ("val_dice_mean", "train_loss", "lr", "peak_mem_mb")] == \
        ["val/dice_mean", "train/loss", "train/lr", "run/peak_mem_mb"]
