"""Final metrics are computed at each image's original resolution against its original mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfg import Config
from datasets import DataOptions, build_datasets
from engine.evaluation import EvalSettings, evaluate
from engine.runtime import Runtime


class Everywhere(nn.Module):
    """A stand-in segmenter that predicts every pixel of the S x S frame as foreground."""

    def forward(self, images, prompts, embeddings=None, valid_hw=None):
        return torch.full((images.shape[0], 1, *images.shape[-2:]), 10.0), torch.ones(images.shape[0], 1)


def test_original_resolution_metrics_use_the_original_masks():
    config = Config(net="mobile_sam", dataset="synthetic", image_size=32, synthetic_size=8, aug="none", b=3)
    test = build_datasets(DataOptions.pick(config)).test
    expected = []
    for i in range(len(test)):
        mask = test.original_mask(i)[0] > 0.5  # H x W at the generated image's own size (96..192 px)
        assert mask.shape == tuple(test[i]["original_hw"].tolist()) and mask.shape[0] > 32
        expected.append(2 * mask.sum() / (mask.sum() + mask.size))
    runtime = Runtime(torch.device("cpu"))
    settings = EvalSettings(batch_size=3, workers=0, amp="none", image_size=32)  # only what evaluation reads
    per_image: list = []
    original = evaluate(Everywhere(), test, settings, runtime, ["lesion"], original=True, per_image=per_image)
    assert original["dice_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert original["images"] == len(test)
    # one row per image, in dataset order, with that image's own scores
    assert [row["image"] for row in per_image] == test.names
    assert [row["dice_lesion"] for row in per_image] == pytest.approx([float(e) for e in expected], abs=1e-6)
    assert all(0 < row["iou_lesion"] < row["dice_lesion"] for row in per_image)
    with pytest.raises(ValueError, match="original-resolution"):
        evaluate(Everywhere(), test, settings, runtime, ["lesion"], per_image=[])
    at_model_size = evaluate(Everywhere(), test, settings, runtime, ["lesion"])
    assert at_model_size["dice_mean"] != pytest.approx(original["dice_mean"], abs=1e-4)  # 32 px masks differ
