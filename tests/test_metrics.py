"""Metrics (Dice/IoU/vCDR) and the task loss, checked against hand-computed values on tiny masks."""
from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss

from engine.loss import PerClassDiceCE
from engine.metrics import MetricAccumulator, dice_iou_per_image, valid_region, vertical_cdr, vertical_extent

BIG = 20.0  # a confident logit


def logits_from(mask: torch.Tensor) -> torch.Tensor:
    """Boolean/0-1 mask -> confident logits (+BIG inside, -BIG outside)."""
    return torch.where(mask.bool(), torch.tensor(BIG), torch.tensor(-BIG))


def rows_mask(rows, size: int = 4) -> torch.Tensor:
    """size x size float mask with the given full rows set."""
    mask = torch.zeros(size, size)
    for r in rows:
        mask[r] = 1
    return mask


def all_valid(batch: int, size: int = 4) -> torch.Tensor:
    return torch.ones(batch, 1, size, size, dtype=torch.bool)


# ----------------------------------------------------------------------------- Dice / IoU


def test_dice_iou_two_classes_hand_computed():
    pred = torch.zeros(1, 2, 4, 4)
    target = torch.zeros(1, 2, 4, 4)
    # class 0: prediction = top-left 2x2 block (4 px), target = whole top row (4 px); overlap 2 px
    pred[0, 0, :2, :2] = 1
    target[0, 0, 0, :] = 1
    # class 1: prediction = first column (4 px), target = first column, rows 0..1 (2 px); overlap 2 px
    pred[0, 1, :, 0] = 1
    target[0, 1, :2, 0] = 1
    dice, iou = dice_iou_per_image(logits_from(pred), target, all_valid(1))
    assert dice.shape == iou.shape == (1, 2)
    assert dice[0].tolist() == pytest.approx([2 * 2 / (4 + 4), 2 * 2 / (4 + 2)])  # 0.5, 2/3
    assert iou[0].tolist() == pytest.approx([2 / 6, 2 / 4])  # 1/3, 0.5


def test_averaging_is_per_image_then_over_the_set_not_pooled_pixels():
    # image A: 1-pixel object predicted exactly (Dice 1, IoU 1)
    # image B: target rows 0..1 (8 px), prediction row 0 (4 px): Dice 8/12, IoU 4/8
    target = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    target[0, 0, 2, 2] = pred[0, 0, 2, 2] = 1
    target[1, 0] = rows_mask([0, 1])
    pred[1, 0] = rows_mask([0])
    dice, iou = dice_iou_per_image(logits_from(pred), target, all_valid(2))
    assert dice[:, 0].tolist() == pytest.approx([1.0, 2 / 3])
    assert iou[:, 0].tolist() == pytest.approx([1.0, 0.5])

    acc = MetricAccumulator(["lesion"])
    acc.update(logits_from(pred), target, all_valid(2))
    summary = acc.summary()
    assert summary["dice_lesion"] == pytest.approx(5 / 6)  # mean of 1 and 2/3
    assert summary["iou_lesion"] == pytest.approx(0.75)  # mean of 1 and 1/2
    # pooling pixels would give 2*5/(5+9) = 0.714 and 5/9 = 0.556: make sure that is not what we get
    assert summary["dice_lesion"] != pytest.approx(10 / 14)
    assert summary["images"] == 2


def test_accumulating_over_batches_averages_over_images():
    # same two images as above, fed one per batch: the result is the same per-image mean
    acc = MetricAccumulator(["lesion"])
    target_a, pred_a = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    target_a[0, 0, 2, 2] = pred_a[0, 0, 2, 2] = 1
    acc.update(logits_from(pred_a), target_a, all_valid(1))
    acc.update(logits_from(rows_mask([0])[None, None]), rows_mask([0, 1])[None, None], all_valid(1))
    assert acc.summary()["dice_lesion"] == pytest.approx(5 / 6)
    assert acc.summary()["images"] == 2


def test_soft_targets_are_binarised_at_one_half():
    # soft multi-rater target: 0.6 and 0.9 count as foreground, 0.4 and 0.1 as background
    target = torch.tensor([[0.9, 0.6], [0.4, 0.1]])[None, None]
    pred_exact = torch.tensor([[1, 1], [0, 0]])[None, None]
    dice, iou = dice_iou_per_image(logits_from(pred_exact), target, all_valid(1, 2))
    assert dice.item() == pytest.approx(1.0) and iou.item() == pytest.approx(1.0)
    # predicting the 0.4 pixel too is a false positive: Dice 2*2/(3+2), IoU 2/3
    pred_more = torch.tensor([[1, 1], [1, 0]])[None, None]
    dice, iou = dice_iou_per_image(logits_from(pred_more), target, all_valid(1, 2))
    assert dice.item() == pytest.approx(0.8) and iou.item() == pytest.approx(2 / 3)


def test_logit_exactly_zero_is_background():
    # sigmoid(0) = 0.5 is not > 0.5: a zero logit is not a prediction
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])[None, None]
    logits = torch.tensor([[1e-3, 0.0], [0.0, -1.0]])[None, None]
    dice, iou = dice_iou_per_image(logits, target, all_valid(1, 2))
    assert dice.item() == pytest.approx(1.0) and iou.item() == pytest.approx(1.0)
    # all logits exactly 0 on a non-empty target: empty prediction -> 0
    dice, iou = dice_iou_per_image(torch.zeros(1, 1, 2, 2), target, all_valid(1, 2))
    assert dice.item() == 0.0 and iou.item() == 0.0


def test_empty_target_conventions():
    empty = torch.zeros(1, 1, 4, 4)
    something = rows_mask([1])[None, None]
    # empty target, empty prediction -> 1
    dice, iou = dice_iou_per_image(logits_from(empty), empty, all_valid(1))
    assert dice.item() == 1.0 and iou.item() == 1.0
    # empty target, non-empty prediction -> 0
    dice, iou = dice_iou_per_image(logits_from(something), empty, all_valid(1))
    assert dice.item() == 0.0 and iou.item() == 0.0
    # non-empty target, empty prediction -> 0
    dice, iou = dice_iou_per_image(logits_from(empty), something, all_valid(1))
    assert dice.item() == 0.0 and iou.item() == 0.0


def test_empty_class_conventions_per_class_in_one_image():
    # class 0 empty/empty (1), class 1 empty target + prediction (0)
    target = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, 1, 0, 0] = 1
    dice, iou = dice_iou_per_image(logits_from(pred), target, all_valid(1))
    assert dice[0].tolist() == [1.0, 0.0]
    assert iou[0].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- padding


def test_valid_region_shape_and_area():
    valid = valid_region(torch.tensor([[2, 4], [4, 3]]), size=4, frame=4)
    assert valid.shape == (2, 1, 4, 4) and valid.dtype == torch.bool
    assert valid[0, 0].tolist() == rows_mask([0, 1]).bool().tolist()
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[:, 3] = False
    assert valid[1, 0].tolist() == expected.tolist()


def test_valid_region_rescales_from_another_frame_with_rounding():
    # valid_hw given in a 100 x 100 frame, metrics at 4 x 4:
    # 70 rows -> 2.8 -> 3 rows (not floored to 2); 60 cols -> 2.4 -> 2 cols (not ceiled to 3)
    valid = valid_region(torch.tensor([[70, 60]]), size=4, frame=100)[0, 0]
    assert valid.sum().item() == 3 * 2
    assert valid[:3, :2].all() and not valid[3].any() and not valid[:, 2:].any()
    # 65 -> 2.6 -> 3; 100 -> 4 (the full side)
    valid = valid_region(torch.tensor([[65, 100]]), size=4, frame=100)[0, 0]
    assert valid[:3].all() and not valid[3].any()
    # frame 256 -> size 64: 192 rows -> exactly 48
    valid = valid_region(torch.tensor([[192, 256]]), size=64, frame=256)[0, 0]
    assert valid.any(dim=1).sum().item() == 48 and valid.any(dim=0).sum().item() == 64


def test_prediction_in_padding_does_not_lower_the_score():
    valid = valid_region(torch.tensor([[2, 4]]), size=4, frame=4)  # rows 2..3 are padding
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0] = rows_mask([0])  # class 0 inside the image
    pred = target.clone()
    pred[0, 0, 3, :] = 1  # extra class-0 prediction in the padding
    pred[0, 1, 2:, :] = 1  # class 1 empty in the image, predicted only in the padding
    dice, iou = dice_iou_per_image(logits_from(pred), target, valid)
    assert dice[0].tolist() == [1.0, 1.0] and iou[0].tolist() == [1.0, 1.0]
    # without the valid region the same prediction scores lower: padding really is what is excluded
    dice, _ = dice_iou_per_image(logits_from(pred), target, all_valid(1))
    assert dice[0].tolist() == pytest.approx([2 * 4 / (8 + 4), 0.0])


# ----------------------------------------------------------------------------- vertical CDR


def test_vertical_extent_counts_rows_first_to_last():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 1:7] = True  # rows 2..4 (3 rows), 6 columns wide
    masks[1, 1, 3] = masks[1, 6, 3] = True  # rows 1 and 6 with a gap: extent 6
    assert vertical_extent(masks).tolist() == [3.0, 6.0, 0.0]


def test_vertical_cdr_hand_made_masks():
    disc = torch.zeros(3, 8, 8, dtype=torch.bool)
    cup = torch.zeros(3, 8, 8, dtype=torch.bool)
    disc[0, 1:7, 0:8] = True  # 6 rows tall, 8 wide
    cup[0, 2:5, 3:5] = True  # 3 rows tall, 2 wide: vertical ratio 0.5 (horizontal would be 0.25)
    disc[1, 0:8, 2:6] = True  # 8 rows
    cup[1, 1:3, 2:6] = True  # 2 rows -> 0.25
    cup[2, 3, 3] = True  # no disc: NaN
    cdr = vertical_cdr(disc, cup)
    assert cdr[:2].tolist() == pytest.approx([0.5, 0.25])
    assert math.isnan(cdr[2].item())
    # empty cup inside a disc: 0
    assert vertical_cdr(disc[:1], torch.zeros(1, 8, 8, dtype=torch.bool)).tolist() == [0.0]


# ----------------------------------------------------------------------------- accumulator


def disc_cup_batch():
    """Three 4x4 disc+cup images (full-width row bands) with hand-computed scores.

    image 0: truth disc rows 0-3, cup rows 1-2 (vCDR 0.5); pred disc rows 0-3, cup row 1 (vCDR 0.25)
             disc Dice 1 IoU 1; cup Dice 2*4/(4+8) = 2/3, IoU 4/8 = 1/2; vCDR error 0.25
    image 1: truth = pred = disc rows 0-1, cup row 0: all 1, vCDR error 0
    image 2: truth disc rows 0-1, no cup; pred empty: disc 0/0, cup 1/1 (both empty), vCDR undefined
    """
    truth = torch.stack([
        torch.stack([rows_mask([0, 1, 2, 3]), rows_mask([1, 2])]),
        torch.stack([rows_mask([0, 1]), rows_mask([0])]),
        torch.stack([rows_mask([0, 1]), rows_mask([])]),
    ])
    pred = torch.stack([
        torch.stack([rows_mask([0, 1, 2, 3]), rows_mask([1])]),
        torch.stack([rows_mask([0, 1]), rows_mask([0])]),
        torch.stack([rows_mask([]), rows_mask([])]),
    ])
    return logits_from(pred), truth


def test_accumulator_summary_disc_cup():
    logits, truth = disc_cup_batch()
    acc = MetricAccumulator(["disc", "cup"])
    acc.update(logits, truth, all_valid(3))
    summary = acc.summary()
    assert set(summary) == {"dice_disc", "dice_cup", "iou_disc", "iou_cup", "dice_mean", "iou_mean",
                            "vcdr_mae", "vcdr_failed", "images"}
    assert summary["dice_disc"] == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3
    assert summary["iou_disc"] == pytest.approx(2 / 3)
    assert summary["dice_cup"] == pytest.approx(8 / 9)  # (2/3 + 1 + 1) / 3
    assert summary["iou_cup"] == pytest.approx(5 / 6)  # (1/2 + 1 + 1) / 3
    assert summary["dice_mean"] == pytest.approx(7 / 9)
    assert summary["iou_mean"] == pytest.approx(3 / 4)
    # image 2's predicted disc is empty: it counts with the largest possible error, max(0, 1 - 0) = 1
    assert summary["vcdr_mae"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert summary["vcdr_failed"] == 1
    assert summary["images"] == 3


def test_vcdr_counts_an_image_whose_predicted_disc_is_missing():
    """One perfect image and one with an empty prediction: Dice 0.5 must not come with vCDR error 0."""
    truth = torch.stack([torch.stack([rows_mask([0, 1, 2, 3]), rows_mask([1, 2])])] * 2)  # vCDR 0.5
    pred = torch.stack([truth[0], torch.zeros(2, 4, 4)])
    acc = MetricAccumulator(["disc", "cup"])
    acc.update(logits_from(pred), truth, all_valid(2))
    summary = acc.summary()
    assert summary["dice_disc"] == pytest.approx(0.5)
    assert summary["vcdr_mae"] == pytest.approx((0 + 0.5) / 2)  # failed image: error max(0.5, 1 - 0.5)
    assert summary["vcdr_failed"] == 1  # how many images had no predicted disc


def test_accumulator_without_disc_cup_has_no_vcdr():
    logits, truth = disc_cup_batch()
    acc = MetricAccumulator(["a", "b"])
    acc.update(logits, truth, all_valid(3))
    summary = acc.summary()
    assert set(summary) == {"dice_a", "dice_b", "iou_a", "iou_b", "dice_mean", "iou_mean", "images"}
    assert summary["dice_a"] == pytest.approx(2 / 3)


def test_state_tensor_sum_equals_one_accumulator_over_all_batches():
    logits, truth = disc_cup_batch()
    together = MetricAccumulator(["disc", "cup"])
    together.update(logits, truth, all_valid(3))
    rank0, rank1 = MetricAccumulator(["disc", "cup"]), MetricAccumulator(["disc", "cup"])
    rank0.update(logits[:2], truth[:2], all_valid(2))
    rank1.update(logits[2:], truth[2:], all_valid(1))  # this rank has no image with a defined vCDR
    assert rank0.summary() != together.summary()
    flat0, flat1 = rank0.state_tensor(), rank1.state_tensor()
    assert flat0.shape == flat1.shape == together.state_tensor().shape and flat0.dim() == 1
    rank0.load_state_tensor(flat0 + flat1)  # what all_reduce(SUM) does
    assert rank0.summary() == pytest.approx(together.summary())
    assert torch.allclose(rank0.state_tensor(), together.state_tensor())


def test_state_tensor_of_a_rank_without_images_sums_correctly():
    # a rank whose shard is empty (fewer evaluation images than processes) must still contribute a
    # tensor of the same length, full of zeros, to the sum
    logits, truth = disc_cup_batch()
    busy, idle = MetricAccumulator(["disc", "cup"]), MetricAccumulator(["disc", "cup"])
    busy.update(logits, truth, all_valid(3))
    expected = busy.summary()
    assert idle.state_tensor().shape == busy.state_tensor().shape
    assert idle.state_tensor().abs().sum().item() == 0
    idle.load_state_tensor(busy.state_tensor() + idle.state_tensor())
    assert idle.summary() == pytest.approx(expected)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("soft_target", [False, True])  # soft: masks resized bilinearly to the model size
def test_per_class_dice_ce_is_mean_of_monai_per_channel(soft_target):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 3, 6, 6, generator=generator)).requires_grad_(True)
    target = torch.rand(2, 3, 6, 6, generator=generator)
    target = target if soft_target else (target > 0.6).float()
    reference = DiceCELoss(sigmoid=True)
    expected = torch.stack([reference(logits[:, c:c + 1], target[:, c:c + 1]) for c in range(3)]).mean()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = PerClassDiceCE()(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_per_class_dice_ce_hand_computed_at_zero_logits():
    # zero logits: sigmoid 0.5 everywhere, BCE = ln 2 for every pixel.
    # channel 0 (2 of 4 pixels set): Dice loss = 1 - (2*0.5*2 + e)/(0.5*4 + 2 + e) = 0.5
    # channel 1 (empty target):      Dice loss = 1 - e/(0.5*4 + e) ~= 1
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0, 0] = 1
    loss = PerClassDiceCE()(torch.zeros(1, 2, 2, 2), target)
    assert loss.item() == pytest.approx((0.5 + 1.0) / 2 + math.log(2), abs=1e-4)


def test_per_class_dice_ce_small_for_perfect_large_for_wrong():
    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, 2:6, 2:6] = 1  # disc
    target[:, 1, 3:5, 3:5] = 1  # cup inside the disc (overlapping sigmoid classes)
    loss_fn = PerClassDiceCE()
    perfect = loss_fn(logits_from(target), target).item()
    wrong = loss_fn(logits_from(1 - target), target).item()
    assert 0 <= perfect < 1e-3
    # everything wrong and confident: Dice loss ~1 plus BCE ~= log(1 + e^20) ~= 20 per pixel
    assert wrong == pytest.approx(21.0, abs=1e-2)
    half = target.clone()
    half[:, :, 2:4] = 0  # miss part of each object
    assert perfect < loss_fn(logits_from(half), target).item() < wrong
