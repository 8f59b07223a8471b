"""-dataset nifti: layouts, volume splits, intensity, labels, slice samples, 3D metrics, written label volumes,
bad input, and a tiny end-to-end run of train.py / val.py on synthetic volumes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import nibabel as nib  # noqa: E402

from cfg import Config  # noqa: E402
from common.errors import UserError  # noqa: E402
from datasets import build_datasets  # noqa: E402
from datasets import nifti  # noqa: E402
from engine.evaluation import EvalSettings  # noqa: E402
from engine.runtime import Runtime  # noqa: E402
from engine.volumes import dice_iou_3d, evaluate_volumes, predict_volume, write_label_volume  # noqa: E402
from scripts.synthetic_volumes import AFFINE, make_case, write_volumes  # noqa: E402
from tests.test_cli_errors import assert_one_line_error, run  # noqa: E402,F401

SHAPE = (40, 48, 10)  # the synthetic cases: labels in axial slices 2..7


@pytest.fixture
def volumes(tmp_path) -> Path:
    return write_volumes(tmp_path / "ct", count=5, shape=SHAPE)


def build(make_options, root, **overrides):
    return build_datasets(make_options(dataset="nifti", data_path=root, prompt="box", **overrides))


# --- layout, splits, slices ---------------------------------------------------------------------

def test_split_by_volume_train_slices_with_foreground(make_options, volumes):
    data = build(make_options, volumes)
    keys = {split: set(names) for split, names in data.splits.items()}
    assert [len(keys[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    assert len(data.train) == 3 * 6  # only the slices holding a label
    assert len(data.val) == len(data.test) == SHAPE[2]  # evaluation: every slice
    assert {n.split("_")[0] for n in data.train.names} == {Path(k).name[:6] for k in keys["train"]}
    assert data.class_names == ["liver", "kidney"] and data.num_classes == 2
    again = build(make_options, volumes, seed=0)
    assert again.splits == data.splits
    reused = build_datasets(make_options(dataset="nifti", data_path=volumes, prompt="box"), data.splits)
    assert reused.splits == data.splits


def test_images_masks_layout_and_slice_axis(make_options, tmp_path, volumes):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        for src, dst in (("imagesTr", "images"), ("labelsTr", "masks")):
            (root / dst / f"p{i}.nii.gz").write_bytes((volumes / src / f"case0{i}.nii.gz").read_bytes())
    data = build(make_options, root, slice_axis=0)
    assert data.class_names == ["label1", "label2"]  # no dataset.json
    sample = data.val[0]
    assert tuple(sample["original_hw"].tolist()) == (SHAPE[1], SHAPE[2])  # sagittal slice: y x z in RAS
    assert sample["name"].endswith("_x000")


def test_orientation_round_trip(volumes):
    path = volumes / "labelsTr" / "case00.nii.gz"
    raw = np.asarray(nib.load(str(path)).dataobj)
    ras = nifti.load_ras(path)
    assert ras.shape == SHAPE  # flips only for this affine
    assert not np.array_equal(ras, raw)  # x and y are flipped: the reader did reorient
    assert np.array_equal(nifti.ras_to_file_orientation(ras, AFFINE), raw)
    permuted = np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(raw, permuted), str(volumes / "p.nii.gz"))
    ras = nifti.load_ras(volumes / "p.nii.gz")
    assert ras.shape == (SHAPE[2], SHAPE[0], SHAPE[1])  # file axes 0, 1, 2 point along -y, z, x
    assert nifti.ras_shape(volumes / "p.nii.gz", SHAPE) == ras.shape
    assert np.array_equal(nifti.ras_to_file_orientation(ras, permuted), raw)


def test_window_and_percentile_scaling():
    volume = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert nifti.to_uint8(volume, (40.0, 400.0)).tolist() == [0, 0, 128, 255, 255]
    ramp = np.linspace(0, 1000, 1001)
    scaled = nifti.to_uint8(ramp, None)  # 0.5 / 99.5 percentiles = 5 / 995
    assert scaled[5] == 0 and scaled[995] == 255 and scaled[500] == 128
    with pytest.raises(UserError, match="`window`"):
        nifti.parse_window("40")


def test_window_flag_applies_to_samples(make_options, volumes):
    data = build(make_options, volumes, window="40,400")
    image = data.val.load_image(0)
    assert image.shape == (SHAPE[0], SHAPE[1], 3) and (image[..., 0] == image[..., 2]).all()
    assert image.min() == 0  # air at -1000 HU is below the window


def test_labels_pick_and_order(make_options, volumes):
    data = build(make_options, volumes, labels="2,1")
    assert data.class_names == ["kidney", "liver"]
    truth = nifti.read_label_values(Path(data.val.volumes[0].label_path))
    codes = data.val.volumes[0].code_volume()
    assert np.array_equal(codes == 1, truth == 2) and np.array_equal(codes == 2, truth == 1)
    one = build(make_options, volumes, labels="2")
    assert one.class_names == ["kidney"] and one.num_classes == 1
    with pytest.raises(UserError, match="`labels` 3"):
        build(make_options, volumes, labels="3")


def test_dataset_json_label_formats(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left kidney": 1}}))
    assert nifti.class_names_from_json(tmp_path, [1, 2]) == ["left_kidney", "label2"]


def test_box_prompt_is_the_slice_tight_box(make_options, volumes):
    data = build(make_options, volumes, image_size=48)  # 40 x 48 slices: no resize, boxes in voxels
    volume = data.val.volumes[0]
    k = 4
    sample = data.val[data.val.slices_of(0)[k]]
    for c in range(2):
        rows, cols = np.nonzero(volume.code(k) == c + 1)
        assert sample["boxes"][c].tolist() == [cols.min(), rows.min(), cols.max(), rows.max()]
    empty = data.val[data.val.slices_of(0)[0]]
    assert not empty["present"].any() and empty["mask"].sum() == 0


# --- metrics and written volumes ----------------------------------------------------------------

def test_dice_3d_by_hand():
    truth = np.zeros((4, 4, 3), np.uint8)
    truth[0:2, 0:2, 0:2] = 1  # 8 voxels of class 1
    pred = np.zeros_like(truth)
    pred[0:2, 0:2, 1:3] = 1  # 8 voxels, 4 shared
    pred[3, 3, 2] = 2  # class 2 absent in the truth: a false positive
    dice, iou = dice_iou_3d(pred, truth, 3)
    assert dice[0] == pytest.approx(2 * 4 / 16) and iou[0] == pytest.approx(4 / 12)
    assert dice[1] == 0 and iou[1] == 0
    assert dice[2] == 1 and iou[2] == 1  # empty in both


class BoxNet(nn.Module):
    """A stand-in segmenter: logit +10 inside each class's box prompt, -10 elsewhere."""

    def forward(self, images, prompts, embeddings=None, valid_hw=None):
        boxes = prompts.boxes
        size = images.shape[-1]
        rows = torch.arange(size)[:, None]
        cols = torch.arange(size)[None, :]
        inside = ((cols >= boxes[..., 0, None, None]) & (cols <= boxes[..., 2, None, None])
                  & (rows >= boxes[..., 1, None, None]) & (rows <= boxes[..., 3, None, None]))
        return torch.where(inside, 10.0, -10.0), None


def test_box_protocol_prediction_volume_and_written_file(make_options, volumes, tmp_path):
    data = build(make_options, volumes, image_size=48)
    dataset, model = data.test, BoxNet()
    codes = predict_volume(model, dataset, 0, 4, "none", torch.device("cpu"))
    truth = dataset.volumes[0].code_volume()
    assert codes.shape == SHAPE
    assert not codes[..., :2].any() and not codes[..., 8:].any()  # no label in the slice: no prompt, empty
    dice, _ = dice_iou_3d(codes, truth, 2)
    assert (dice > 0.7).all()  # a box around an ellipse slice

    path = write_label_volume(codes, dataset, 0, tmp_path / "pred")
    source = nib.load(dataset.volumes[0].image_path)
    written = nib.load(str(path))
    assert written.shape == source.shape
    assert np.array_equal(written.affine, source.affine)
    values = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(values).tolist()) <= {0, 1, 2}
    raw_truth = np.asarray(nib.load(dataset.volumes[0].label_path).dataobj)  # file voxel order
    assert np.array_equal(values, nifti.ras_to_file_orientation(codes, source.affine))
    assert dice_iou_3d(values, raw_truth, 2)[0] == pytest.approx(dice)

    summary, rows = evaluate_volumes(model, dataset, EvalSettings(batch_size=4, workers=0, amp="none", image_size=48),
                                     Runtime(torch.device("cpu")), data.class_names)
    assert [r["volume"] for r in rows] == [v.name for v in dataset.volumes]
    assert rows[0]["dice_liver"] == pytest.approx(dice[0])
    assert summary["dice_mean"] == pytest.approx(np.mean([r["dice_mean"] for r in rows]))


# --- bad input ----------------------------------------------------------------------------------

TRAIN = ("train.py", "-image_size", "64", "-epochs", "1", "-dataset", "nifti")


def test_image_volume_without_label(run, volumes):
    (volumes / "labelsTr" / "case03.nii.gz").unlink()
    assert_one_line_error(run(*TRAIN, "-data_path", str(volumes)), "case03.nii.gz", "no label volume")


def test_label_and_image_shapes_differ(run, volumes):
    image, _ = make_case((40, 48, 12), 0)
    nib.save(nib.Nifti1Image(image, AFFINE), str(volumes / "imagesTr" / "case01.nii.gz"))
    assert_one_line_error(run(*TRAIN, "-data_path", str(volumes)), "case01.nii.gz", "40x48x12", "40x48x10")


def test_four_d_volume(run, volumes):
    image, _ = make_case(SHAPE, 0)
    nib.save(nib.Nifti1Image(np.stack([image, image], -1), AFFINE), str(volumes / "imagesTr" / "case02.nii.gz"))
    assert_one_line_error(run(*TRAIN, "-data_path", str(volumes)), "case02.nii.gz", "4D")


def test_label_volume_without_foreground(run, volumes):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE), str(volumes / "labelsTr" / "case04.nii.gz"))
    assert_one_line_error(run(*TRAIN, "-data_path", str(volumes)), "case04.nii.gz", "no foreground")


def test_too_many_labels_and_nifti_only_flags(run, volumes, tmp_path):
    assert_one_line_error(run(*TRAIN, "-data_path", str(volumes), "-labels", "1,2,3,4"), "-labels", "at most 3")
    assert_one_line_error(run("train.py", "-window", "40,400"), "-window", "-dataset nifti")
    assert_one_line_error(run(*TRAIN, "-data_path", str(tmp_path)), "imagesTr")


def test_multipage_tiff_in_a_2d_folder(run, tmp_path):
    from PIL import Image

    from tests.test_cli_errors import write_pair

    for name in ("a", "b"):
        write_pair(tmp_path, name)
    pages = [Image.new("L", (40, 30), v) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "images" / "stack.tif", save_all=True, append_images=pages[1:])
    write_pair(tmp_path / "x", "stack")
    (tmp_path / "masks" / "stack.png").write_bytes((tmp_path / "x" / "masks" / "stack.png").read_bytes())
    line = assert_one_line_error(run("train.py", "-image_size", "64", "-epochs", "1", "-dataset", "folder",
                                     "-data_path", str(tmp_path)), "stack.tif", "multi-page TIFF")
    assert "-dataset nifti" in line


# --- end to end ---------------------------------------------------------------------------------

def test_train_then_val_per_volume_dice_and_prediction_volumes(run, volumes, tmp_path, capsys, one_thread):
    from common.cli import run_cli
    import train
    import val

    ck = tmp_path / "ck"
    args = ["-net", "mobile_sam", "-mod", "sam_decoder", "-dataset", "nifti", "-data_path", str(volumes),
            "-image_size", "64", "-epochs", "1", "-b", "4", "-prompt", "box", "-window", "40,400", "-vis", "0",
            "-exp_name", "ct", "-ckpt_root", str(ck), "-figs_root", str(tmp_path / "figs")]
    run_cli(lambda: train.main(args))
    run_dir = ck / "ct"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["labels"] == [1, 2] and config["run"]["class_names"] == ["liver", "kidney"]
    capsys.readouterr()

    run_cli(lambda: val.main(["-weights", str(run_dir), "-json", str(tmp_path / "m.json"),
                              "-save_pred", str(tmp_path / "evalpred")]))
    out = capsys.readouterr().out
    assert "test split, 1 volumes" in out and "dice_liver" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    test_name = Path(json.loads((run_dir / "splits.json").read_text())["test"][0]).name
    assert metrics["volumes"][0]["volume"] == test_name.removesuffix(".nii.gz")
    assert (tmp_path / "evalpred" / test_name).is_file()

    run_cli(lambda: val.main(["-weights", str(run_dir), "-images", str(volumes / "imagesTr"), "-prompt", "box",
                              "-prompt_from", str(volumes / "labelsTr"), "-save_pred", str(tmp_path / "pred")]))
    written = sorted((tmp_path / "pred").iterdir())
    assert len(written) == 5
    for path in written:
        source = nib.load(str(volumes / "imagesTr" / path.name))
        predicted = nib.load(str(path))
        assert predicted.shape == source.shape and np.array_equal(predicted.affine, source.affine)

    assert_one_line_error(run("val.py", "-weights", str(run_dir), "-images", str(volumes / "imagesTr"),
                              "-prompt", "box", "-save_pred", str(tmp_path / "p2")), "-prompt_from")
