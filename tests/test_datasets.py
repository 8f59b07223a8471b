"""datasets/: layouts, splits, sample pipeline, prompts, bad input; engine/overlays and show_samples."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import missing
import torch
from torch.utils.data import default_collate

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from common.errors import UserError  # noqa: E402
from datasets import build_datasets, build_image_folder  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- fake layouts ---------------------------------------------------------------------------------

def split_folders(root: Path, fake, counts=(("train", 4), ("val", 2), ("test", 2)), ext=".png") -> Path:
    seed = 0
    for split, count in counts:
        for i in range(count):
            seed += 1
            fake.image(root / split / "images" / f"{split}{i}{ext}", seed=seed)
            fake.mask(root / split / "masks" / f"{split}{i}.png", fake.rect(box=(4 + i, 4, 18, 20 + i)))
    return root


def flat_folder(root: Path, fake, count=10, mask=None) -> Path:
    height, width = (24, 32) if mask is None else mask.shape
    for i in range(count):
        fake.image(root / "images" / f"img{i:02d}.jpg", height=height, width=width, seed=i)
        fake.mask(root / "masks" / f"img{i:02d}.png", fake.rect() if mask is None else mask)
    return root


def isbi2016(root: Path, fake, with_csv=True) -> Path:
    for part, count in (("Training", 6), ("Test", 3)):
        rows = ["index,image,mask"]
        for i in range(count):
            image = f"ISBI2016_ISIC_Part1_{part}_Data/ISIC_{part[:2]}{i:05d}.jpg"
            mask = f"ISBI2016_ISIC_Part1_{part}_GroundTruth/ISIC_{part[:2]}{i:05d}_Segmentation.png"
            fake.image(root / image, seed=i)
            fake.mask(root / mask, fake.rect())
            rows.append(f"{i},{image},{mask}")
        if with_csv:
            (root / f"ISBI2016_ISIC_Part1_{part}_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    return root


def isic2017(root: Path, fake) -> Path:
    for tag, count in (("Training", 4), ("Validation", 2), ("Test_v2", 3)):
        for i in range(count):
            name = f"ISIC_{tag[:2]}{i:05d}"
            fake.image(root / f"ISIC-2017_{tag}_Data" / f"{name}.jpg", seed=i)
            fake.mask(root / f"ISIC-2017_{tag}_Data" / f"{name}_superpixels.png", np.ones((24, 32)))
            fake.mask(root / f"ISIC-2017_{tag}_Part1_GroundTruth" / f"{name}_segmentation.png", fake.rect())
    return root


def isic2018(root: Path, fake) -> Path:
    for tag, count in (("Training", 5), ("Validation", 2)):
        (root / f"ISIC2018_Task1-2_{tag}_Input").mkdir(parents=True)
        (root / f"ISIC2018_Task1-2_{tag}_Input" / "LICENSE.txt").write_text("licence")
        for i in range(count):
            name = f"ISIC_{tag[:2]}{i:05d}"
            fake.image(root / f"ISIC2018_Task1-2_{tag}_Input" / f"{name}.jpg", seed=i)
            fake.mask(root / f"ISIC2018_Task1_{tag}_GroundTruth" / f"{name}_segmentation.png", fake.rect())
    return root


def refuge_challenge(root: Path, fake) -> Path:
    for group, prefix in (("Glaucoma", "g"), ("Non-Glaucoma", "n")):
        for i in range(3):
            fake.image(root / "Training400" / group / f"{prefix}{i:04d}.jpg", seed=i)
            fake.mask(root / "Annotation-Training400" / "Disc_Cup_Masks" / group / f"{prefix}{i:04d}.bmp",
                      fake.refuge())
    for i in range(2):
        fake.image(root / "Validation400" / f"V{i:04d}.jpg", seed=10 + i)
        fake.mask(root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"V{i:04d}.bmp", fake.refuge())
        fake.image(root / "Test400" / f"T{i:04d}.jpg", seed=20 + i)  # no test ground truth
    return root


def refuge_raters(root: Path, fake, raters=3) -> Path:
    """Rater r marks the disc over columns 6:(20+2r), the cup over columns 10:(14+2r) (rows 4:20)."""
    for folder, count in (("Training-400", 5), ("Test-400", 2)):
        for i in range(count):
            name = f"{'T' if folder.startswith('Test') else 'g'}{i:04d}"
            fake.image(root / folder / name / f"{name}.jpg", seed=i)
            for r in range(1, raters + 1):
                fake.mask(root / folder / name / f"{name}_seg_disc_{r}.png", fake.rect(box=(4, 6, 20, 20 + 2 * r)))
                fake.mask(root / folder / name / f"{name}_seg_cup_{r}.png", fake.rect(box=(4, 10, 20, 14 + 2 * r)))
    return root


def message(excinfo) -> str:
    """The one line the scripts show: the library names its arguments (`data_path`), never flags (-data_path);
    the CLI's in_flag_terms turns them into flags."""
    from cfg import Config, in_flag_terms

    text = str(excinfo.value)
    assert "\n" not in text
    flags = [f"-{f.name}" for f in dataclasses.fields(Config) if re.search(rf"(?<![\w/.-])-{f.name}\b", text)]
    assert not flags, f"library error names flags {flags}: {text}"
    return in_flag_terms(text)


# --- synthetic and the sample contract -----------------------------------------------------------

def test_synthetic_counts_keys_and_determinism(make_options):
    config = make_options(synthetic_size=8)
    first, second = build_datasets(config), build_datasets(config)
    assert (len(first.train), len(first.val), len(first.test)) == (8, 2, 2)
    assert first.num_classes == 1 and first.class_names == ["lesion"]
    assert first.splits == second.splits and set(first.splits) == {"train", "val", "test"}
    json.dumps(first.splits)
    sizes = {tuple(first.train.records[i].image.shape[:2]) for i in range(8)}
    assert len(sizes) > 3 and all(96 <= h <= 192 and 96 <= w <= 192 for h, w in sizes)
    assert any(h != w for h, w in sizes)
    np.testing.assert_array_equal(first.val.records[0].image, second.val.records[0].image)
    assert not np.array_equal(first.train.records[0].image, first.val.records[0].image)
    sample = first.train[0]
    assert set(sample) == {"image", "mask", "valid_hw", "original_hw", "name", "image_path", "points",
                           "point_labels"}
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (1, 32, 32) and sample["points"].shape == (1, 1, 2)
    assert sample["point_labels"].dtype == torch.int64 and sample["valid_hw"].dtype == torch.int64
    assert float(sample["image"].max()) > 1.5  # 0..255, not normalised
    batch = default_collate([first.train[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["name"]) == 4


def test_synthetic_two_nested_classes_and_prompt_keys(make_options):
    data = build_datasets(make_options(synthetic_classes=2, prompt="box", image_size=64))
    assert data.num_classes == 2
    for i in range(len(data.train)):
        sample = data.train[i]
        mask = sample["mask"]
        assert mask[1].sum() > 0 and bool((mask[1] <= mask[0]).all())
        assert sample["boxes"].shape == (2, 4) and "points" not in sample
    none = build_datasets(make_options(prompt="none")).train[0]
    assert not {"points", "point_labels", "boxes"} & set(none)


def test_padding_and_valid_hw(tmp_path, make_options, fake):
    root = tmp_path / "data"
    fake.image(root / "images" / "tall.png", height=40, width=20, seed=1)
    fake.mask(root / "masks" / "tall.png", fake.rect(40, 20, box=(0, 0, 40, 20)))
    fake.image(root / "images" / "wide.png", height=20, width=40, seed=2)
    fake.mask(root / "masks" / "wide.png", fake.rect(20, 40, box=(0, 0, 20, 40)))
    data = build_datasets(make_options(dataset="folder", data_path=root, val_frac=0.5))
    for sample in (data.train[0], data.val[0]):
        h, w = sample["valid_hw"].tolist()
        assert sorted((h, w)) == [16, 32]
        assert sample["original_hw"].tolist() == ([40, 20] if sample["name"] == "tall" else [20, 40])
        assert float(sample["image"][:, h:, :].abs().sum()) == 0 and float(sample["image"][:, :, w:].abs().sum()) == 0
        assert float(sample["mask"][:, :h, :w].min()) == 1 and float(sample["mask"].sum()) == h * w


def test_click_stays_inside_object_after_augmentation(make_options):
    data = build_datasets(make_options(aug="strong", n_points=3, n_neg_points=2, synthetic_size=4, image_size=48))
    for seed in range(40):
        data.train.set_epoch(seed)
        sample = data.train[seed % len(data.train)]
        mask, (h, w) = sample["mask"][0], sample["valid_hw"].tolist()
        for (x, y), label in zip(sample["points"][0].tolist(), sample["point_labels"][0].tolist()):
            assert 0 <= x < w and 0 <= y < h
            assert mask[int(y), int(x)] == (1 if label == 1 else 0)


def test_boxes_follow_flips_and_resize(tmp_path, make_options, fake):
    root = tmp_path / "data"
    for i in range(2):  # 40 x 20 image, object rows 10:20, columns 4:12 -> x 2..5.5, y 5..9.5 at scale 0.5
        fake.image(root / "images" / f"a{i}.png", height=20, width=40, seed=i)
        fake.mask(root / "masks" / f"a{i}.png", fake.rect(20, 40, box=(10, 4, 20, 12)))
    config = make_options(dataset="folder", data_path=root, prompt="box", image_size=40, aug="light", val_frac=0.5)
    data = build_datasets(config)
    assert data.val[0]["boxes"].tolist() == [[4.0, 10.0, 11.0, 19.0]]  # exact, inclusive
    small = build_datasets(make_options(dataset="folder", data_path=root, prompt="box", image_size=20, val_frac=0.5))
    assert np.allclose(small.val[0]["boxes"].numpy(), [[2, 5, 5, 9]], atol=1)
    flips = {(4, 10, 11, 19), (28, 10, 35, 19), (4, 0, 11, 9), (28, 0, 35, 9)}
    seen = set()
    for seed in range(30):
        data.train.set_epoch(seed)
        sample = data.train[0]
        rows, cols = np.nonzero(sample["mask"][0].numpy())
        tight = (cols.min(), rows.min(), cols.max(), rows.max())
        assert tight in flips
        seen.add(tight)
        box = sample["boxes"][0].numpy()
        assert np.all(np.abs(box - np.array(tight)) <= np.array([0.8, 1.0, 0.8, 1.0]) + 1e-4)  # 10% jitter
    assert len(seen) >= 3


def test_evaluation_prompts_identical_across_builds(make_options):
    config = make_options(n_points=3, n_neg_points=2)
    first, second = build_datasets(config), build_datasets(config)
    for i in range(len(first.val)):
        a, b = first.val[i], second.val[i]
        assert torch.equal(a["points"], b["points"]) and torch.equal(a["point_labels"], b["point_labels"])
        # the first click is an interior point: its 3x3 neighbourhood is foreground
        x, y = (int(v) for v in a["points"][0, 0])
        assert bool(a["mask"][0, y - 1:y + 2, x - 1:x + 2].all())
    # evaluation boxes are each class's tight box, computed here by hand from the resized mask
    boxed = build_datasets(make_options(prompt="box"))
    checked = 0
    for split in (boxed.val, boxed.test):
        for i in range(len(split)):
            sample = split[i]
            for c, mask in enumerate(sample["mask"].numpy()):
                rows, cols = np.nonzero(mask)
                if rows.size == 0:
                    continue
                tight = [cols.min(), rows.min(), cols.max(), rows.max()]
                assert sample["boxes"][c].tolist() == [float(v) for v in tight], (sample["name"], c)
                checked += 1
    assert checked > 0


def test_empty_class_gets_padding_click_and_whole_box(tmp_path, make_options, fake):
    root = tmp_path / "data"
    fake.image(root / "images" / "a.png", seed=1)
    fake.mask(root / "masks" / "a.png", fake.refuge())
    fake.image(root / "images" / "b.png", seed=2)
    fake.mask(root / "masks" / "b.png", np.where(fake.refuge() == 0, 128, fake.refuge()))  # no cup
    config = make_options(dataset="refuge", data_path=root, val_frac=0.5, image_size=32)
    data = build_datasets(config, splits={"train": ["images/a.png"], "val": ["images/b.png"]})
    sample = data.val[0]
    assert sample["point_labels"][1].tolist() == [-1] and sample["point_labels"][0].tolist() == [1]
    boxed = build_datasets(make_options(dataset="refuge", data_path=root, prompt="box"),
                           splits=data.splits)
    assert boxed.val[0]["boxes"][1].tolist() == [0, 0, 31, 23]


# --- layouts -------------------------------------------------------------------------------------

def test_folder_split_layout(tmp_path, make_options, fake):
    root = split_folders(tmp_path / "data", fake)
    data = build_datasets(make_options(dataset="folder", data_path=root))
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)
    assert "split folders train/val/test" in data.layout
    assert data.splits["val"] == ["val/images/val0.png", "val/images/val1.png"]


def test_flat_holdout_reproducible_and_reused(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "data", fake, count=10)
    a = build_datasets(make_options(dataset="folder", data_path=root, seed=0))
    b = build_datasets(make_options(dataset="folder", data_path=root, seed=0))
    c = build_datasets(make_options(dataset="folder", data_path=root, seed=5))
    assert a.test is None and "test" not in a.splits and "held out" in a.layout
    assert len(a.val) == 2 and len(a.train) == 8 and a.splits == b.splits
    assert c.splits["val"] != a.splits["val"]
    reused = build_datasets(make_options(dataset="folder", data_path=root, seed=5),
                            splits=json.loads(json.dumps(a.splits)))
    assert reused.val.names == a.val.names and reused.train.names == a.train.names
    limited = build_datasets(make_options(dataset="folder", data_path=root, max_train=3, max_eval=1))
    assert (len(limited.train), len(limited.val)) == (3, 1)


def test_folder_label_masks_and_mask_suffix(tmp_path, make_options, fake):
    root = tmp_path / "data"
    labels = np.zeros((24, 32), np.uint8)
    labels[2:10, 2:10], labels[12:20, 12:30] = 1, 2
    for i in range(3):
        fake.image(root / "train" / "images" / f"s{i}.jpg", seed=i)
        fake.mask(root / "train" / "masks" / f"s{i}_mask.png", labels)
    data = build_datasets(make_options(dataset="folder", data_path=root, image_size=32))
    assert data.num_classes == 2 and data.class_names == ["class1", "class2"]
    mask = data.val[0]["mask"]
    assert float((mask[0] * mask[1]).sum()) == 0 and mask[0].sum() > 0 and mask[1].sum() > mask[0].sum()


@pytest.mark.parametrize("with_csv", [True, False])
def test_isic_isbi2016(tmp_path, make_options, fake, with_csv):
    root = isbi2016(tmp_path / "data", fake, with_csv=with_csv)
    data = build_datasets(make_options(dataset="isic", data_path=root, val_frac=0.34))
    assert "ISBI 2016" in data.layout and "held out" in data.layout
    assert ("GroundTruth.csv" in data.layout) == with_csv
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 3)
    assert data.class_names == ["lesion"] and data.train[0]["mask"].max() == 1


def test_isic_2017_and_2018(tmp_path, make_options, fake):
    data = build_datasets(make_options(dataset="isic", data_path=isic2017(tmp_path / "a", fake)))
    assert "ISIC 2017" in data.layout and (len(data.train), len(data.val), len(data.test)) == (4, 2, 3)
    assert not any("superpixels" in key for keys in data.splits.values() for key in keys)
    data = build_datasets(make_options(dataset="isic", data_path=isic2018(tmp_path / "b", fake)))
    assert "ISIC 2018" in data.layout and (len(data.train), len(data.val), data.test) == (5, 2, None)


def test_isic_split_csv_layout(tmp_path, make_options, fake):
    root = split_folders(tmp_path / "data", fake, counts=(("train", 3), ("val", 2)), ext=".jpg")
    for split, count in (("train", 3), ("val", 2)):
        rows = ["image,mask"] + [f"{split}/images/{split}{i}.jpg,{split}/masks/{split}{i}.png" for i in range(count)]
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    data = build_datasets(make_options(dataset="isic", data_path=root))
    assert "train.csv/val.csv" in data.layout and (len(data.train), len(data.val), data.test) == (3, 2, None)


def test_refuge_challenge_layout(tmp_path, make_options, fake):
    root = refuge_challenge(tmp_path / "data", fake)
    data = build_datasets(make_options(dataset="refuge", data_path=root))
    assert "REFUGE challenge" in data.layout and "Test400/ has no ground truth" in data.layout
    assert (len(data.train), len(data.val), data.test) == (6, 2, None)
    assert data.class_names == ["disc", "cup"]
    mask = data.val[0]["mask"]  # 24 x 32 -> 24 x 32 frame at S=32: disc 16x20 (rim + cup), cup 8x8
    assert mask[0].sum() == 16 * 20 and mask[1].sum() == 8 * 8 and bool((mask[1] <= mask[0]).all())


def test_refuge_roi_crop(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "data", fake, count=4, mask=np.pad(fake.refuge(), ((40, 40), (40, 40)),
                                                                       constant_values=255))
    data = build_datasets(make_options(dataset="refuge", data_path=root, roi_crop=True, image_size=32))
    whole = build_datasets(make_options(dataset="refuge", data_path=root, roi_crop=False, image_size=32))
    for cropped, full in ((data.val[0], whole.val[0]), (data.train[0], whole.train[0])):
        # the disc fills more of the crop, in training AND in validation (evaluated the way the run trained)
        assert cropped["mask"][0].mean() > 3 * full["mask"][0].mean()
        assert full["original_hw"].tolist() == [104, 112]
        assert cropped["original_hw"].tolist() != [104, 112]  # the evaluated frame is the crop


@pytest.mark.parametrize("policy,disc_cols,soft", [("majority", 24, False), ("1", 22, False), ("3", 26, False),
                                                   ("mean", 26, True)])
def test_refuge_multi_rater(tmp_path, make_options, fake, policy, disc_cols, soft):
    root = refuge_raters(tmp_path / "data", fake)
    data = build_datasets(make_options(dataset="refuge", data_path=root, rater_policy=policy, val_frac=0.4))
    assert "multi-rater" in data.layout and (len(data.train), len(data.val), len(data.test)) == (3, 2, 2)
    mask = data.test[0]["mask"]
    assert bool((mask[1] <= mask[0]).all())
    row = mask[0, 10].numpy()
    assert int(np.count_nonzero(row)) == disc_cols - 6
    if soft:
        assert np.allclose(row[[6, 21, 23, 25]], [1, 1, 2 / 3, 1 / 3])
    else:
        assert set(np.unique(mask.numpy())) <= {0.0, 1.0}


def test_empty_training_masks_warn_and_skip(tmp_path, make_options, fake, capsys):
    root = flat_folder(tmp_path / "data", fake, count=4)
    for i in (0, 1, 2):
        fake.mask(root / "masks" / f"img{i:02d}.png", np.zeros((24, 32)))
    splits = {"train": [f"images/img{i:02d}.jpg" for i in range(3)] + ["images/img03.jpg"],
              "val": ["images/img03.jpg"]}
    data = build_datasets(make_options(dataset="folder", data_path=root), splits=splits)
    assert len(data.train) == 1 and "skipped 3 of 4 training images with empty masks" in capsys.readouterr().out
    kept = build_datasets(make_options(dataset="folder", data_path=root, prompt="none"), splits=splits)
    assert len(kept.train) == 4


def test_image_folder_with_boxes(tmp_path, make_options, fake):
    fake.image(tmp_path / "imgs" / "a.png", height=20, width=40)
    fake.image(tmp_path / "imgs" / "b.jpg", height=40, width=40)
    (tmp_path / "boxes.csv").write_text("image,x0,y0,x1,y1\na.png,4,2,20,10\nb,0,0,39,39\n")
    dataset = build_image_folder(str(tmp_path / "imgs"), 20, num_classes=2, boxes=str(tmp_path / "boxes.csv"))
    sample = dataset[0]
    assert set(sample) == {"image", "valid_hw", "original_hw", "name", "image_path", "boxes"}
    assert sample["boxes"].tolist() == [[2, 1, 10, 5]] * 2 and sample["valid_hw"].tolist() == [10, 20]
    assert dataset[1]["boxes"].tolist() == [[0, 0, 19, 19]] * 2
    plain = build_image_folder(str(tmp_path / "imgs"), 32, 1)
    assert "boxes" not in plain[0] and len(plain) == 2


def test_overlay_grid_and_show_samples(tmp_path, make_options):
    from engine.overlays import save_overlay_grid
    from scripts.show_samples import main

    data = build_datasets(make_options(synthetic_classes=2, n_neg_points=1))
    samples = [data.val[i] for i in range(2)]
    path = save_overlay_grid(samples, tmp_path / "grid.png", predictions=[s["mask"] > 0.5 for s in samples],
                             title="t")
    assert path.stat().st_size > 1000
    save_overlay_grid(default_collate(samples), tmp_path / "batch.png")
    out = main(["-synthetic_size", "8", "-image_size", "32", "-prompt", "box", "-figs_root", str(tmp_path / "figs")])
    assert out == tmp_path / "figs" / "samples_synthetic.png" and out.stat().st_size > 1000


# --- bad input: one UserError line naming the file or flag ----------------------------------------

def test_error_data_path_missing(tmp_path, make_options):
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=tmp_path / "nope"))
    assert "-data_path" in message(err) and "nope" in message(err)


@pytest.mark.parametrize("dataset,expect", [("isic", "ISIC 2017"), ("refuge", "REFUGE challenge"),
                                            ("folder", "images")])
def test_error_no_layout_lists_tried(tmp_path, make_options, dataset, expect):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset=dataset, data_path=tmp_path / "empty"))
    assert "tried" in message(err) and expect in message(err)


def test_error_no_images_in_folder(tmp_path, make_options):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=tmp_path / "d"))
    assert "holds no images" in message(err)


def test_error_image_without_mask(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    fake.image(root / "images" / "lonely.jpg")
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root))
    assert "lonely.jpg has no mask" in message(err)


def test_error_mask_without_image(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    fake.mask(root / "masks" / "orphan.png", fake.rect())
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root))
    assert "orphan.png has no image" in message(err)


def test_error_unreadable_image(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    (root / "images" / "img01.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root))
    assert "img01.jpg" in message(err) and "cannot read image" in message(err)


def test_error_truncated_image_on_load(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    data = (root / "images" / "img00.jpg").read_bytes()
    (root / "images" / "img00.jpg").write_bytes(data[: int(len(data) * 0.8)])
    built = build_datasets(make_options(dataset="folder", data_path=root, prompt="none"),
                           splits={"train": ["images/img00.jpg"], "val": ["images/img01.jpg"]})
    with pytest.raises(UserError) as err:
        built.train[0]
    assert "img00.jpg" in message(err) and "truncated" in message(err)


def test_error_size_mismatch(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    fake.mask(root / "masks" / "img02.png", fake.rect(30, 30))
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root))
    assert "img02.jpg is 32x24 but its mask" in message(err)


@pytest.mark.parametrize("dataset,values", [("folder", [0, 7, 100, 200]), ("refuge", [0, 1, 2]),
                                            ("isic", [0, 40])])
def test_error_mask_values(tmp_path, make_options, fake, dataset, values):
    root = tmp_path / "d"
    bad = np.resize(np.array(values, np.uint8), (24, 32))
    for i in range(3):
        fake.image(root / "train" / "images" / f"s{i}.jpg", seed=i)
        fake.mask(root / "train" / "masks" / f"s{i}.png", bad if i == 1 else fake.rect())
    if dataset == "isic":
        (root / "train.csv").write_text("image,mask\n" + "".join(
            f"train/images/s{i}.jpg,train/masks/s{i}.png\n" for i in range(3)))
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset=dataset, data_path=root))
    assert "s1.png" in message(err) and "fit no" in message(err)


def test_error_mixed_mask_encodings(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    fake.mask(root / "masks" / "img01.png", fake.rect(fg=2))
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root))
    assert "img01.png" in message(err) and "one encoding" in message(err)


def test_error_all_training_masks_empty(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3, mask=np.zeros((24, 32)))
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root))
    assert "-prompt none" in message(err)


def test_error_flag_combinations(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root, roi_crop=True))
    assert "-roi_crop" in message(err)
    refuge = flat_folder(tmp_path / "r", fake, count=3, mask=fake.refuge())
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="refuge", data_path=refuge, rater_policy="mean"))
    assert "-rater_policy mean" in message(err)
    raters = refuge_raters(tmp_path / "m", fake, raters=2)
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="refuge", data_path=raters, rater_policy="5"))
    assert "-rater_policy 5" in message(err)


def test_error_splits_name_missing_files(tmp_path, make_options, fake):
    root = flat_folder(tmp_path / "d", fake, count=3)
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="folder", data_path=root),
                       splits={"train": ["images/img00.jpg", "images/gone.jpg"], "val": ["images/img01.jpg"]})
    assert "images/gone.jpg" in message(err) and "-data_path" in message(err)


def test_error_csv_lists_missing_file(tmp_path, make_options, fake):
    root = split_folders(tmp_path / "d", fake, counts=(("train", 2),))
    (root / "train.csv").write_text("image,mask\ntrain/images/train0.png,train/masks/train0.png\n"
                                    "train/images/ghost.png,train/masks/ghost.png\n")
    with pytest.raises(UserError) as err:
        build_datasets(make_options(dataset="isic", data_path=root))
    assert "train.csv line 3" in message(err) and "ghost.png" in message(err)


def test_error_boxes_csv(tmp_path, fake):
    fake.image(tmp_path / "imgs" / "a.png")
    fake.image(tmp_path / "imgs" / "b.png")
    (tmp_path / "boxes.csv").write_text("a.png,1,2,3,4\n")
    with pytest.raises(UserError) as err:
        build_image_folder(str(tmp_path / "imgs"), 32, 1, boxes=str(tmp_path / "boxes.csv"))
    assert "-boxes" in message(err) and "b.png" in message(err)


# --- real data (skipped when /work/shared/data is missing) ----------------------------------------

def test_real_isic2017(make_options):
    if not (SHARED_DATA / "isic2017" / "train.csv").is_file():
        missing("shared isic2017 missing")
    data = build_datasets(make_options(dataset="isic", data_path=SHARED_DATA / "isic2017", image_size=64))
    assert (len(data.train), len(data.val), len(data.test)) == (2000, 150, 600)
    assert "train.csv/val.csv/test.csv" in data.layout and data.num_classes == 1
    sample = data.val[0]
    assert sample["valid_hw"].tolist() == [48, 64] and sample["original_hw"].tolist() == [192, 256]
    assert sample["name"] == "ISIC_0001769"


def test_real_refuge_sample(make_options):
    if not (SHARED_DATA / "refuge_sample" / "images").is_dir():
        missing("shared refuge_sample missing")
    data = build_datasets(make_options(dataset="refuge", data_path=SHARED_DATA / "refuge_sample", image_size=64))
    assert len(data.train) + len(data.val) == 8 and data.test is None
    assert data.num_classes == 2 and data.class_names == ["disc", "cup"] and "images/ + masks/" in data.layout
    for dataset in (data.train, data.val):
        for i in range(len(dataset)):
            mask = dataset.bank.channels(i)
            assert mask[1].sum() > 0 and bool((mask[1] <= mask[0]).all()) and mask[0].sum() > mask[1].sum()


def test_training_randomness_depends_only_on_seed_epoch_and_sample(make_options):
    """Same (seed, epoch) -> the same augmented sample in any process; another epoch -> another one."""
    data = build_datasets(make_options(aug="strong", synthetic_size=4, image_size=48))
    data.train.set_epoch(3)
    first = data.train[1]
    torch.manual_seed(123)  # the global RNG must not matter
    again = data.train[1]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["points"], again["points"])
    data.train.set_epoch(4)
    other = data.train[1]
    assert not (torch.equal(first["image"], other["image"]) and torch.equal(first["points"], other["points"]))


def test_image_cache_gives_the_same_samples(make_options):
    plain = build_datasets(make_options(aug="strong", synthetic_size=4, image_size=48))
    cached = build_datasets(make_options(aug="strong", synthetic_size=4, image_size=48, cache_images=True))
    for epoch in (1, 2):  # the second pass reads the cache; augmentation must not have altered it
        plain.train.set_epoch(epoch)
        cached.train.set_epoch(epoch)
        for index in range(len(plain.train)):
            a, b = plain.train[index], cached.train[index]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert len(cached.train.resized_cache) == len(cached.train) and not plain.train.resized_cache


def test_refuge_official_release_names_are_detected(tmp_path, make_options, fake):
    """The official release's REFUGE-Validation400/ + REFUGE-Validation400-GT/ and REFUGE-Test400/ (+ GT)."""
    root = tmp_path / "data"
    for i in range(3):
        fake.image(root / "Training400" / "Glaucoma" / f"g{i:04d}.jpg", seed=i)
        fake.mask(root / "Annotation-Training400" / "Disc_Cup_Masks" / "Glaucoma" / f"g{i:04d}.bmp", fake.refuge())
    for i in range(2):
        fake.image(root / "REFUGE-Validation400" / f"V{i:04d}.jpg", seed=10 + i)
        fake.mask(root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"V{i:04d}.bmp", fake.refuge())
        fake.image(root / "REFUGE-Test400" / f"T{i:04d}.jpg", seed=20 + i)
        fake.mask(root / "REFUGE-Test-GT" / "Disc_Cup_Masks" / f"T{i:04d}.bmp", fake.refuge())
    data = build_datasets(make_options(dataset="refuge", data_path=root))
    assert (len(data.train), len(data.val), len(data.test)) == (3, 2, 2)
    assert "REFUGE-Validation400/" in data.layout and "REFUGE-Test400/" in data.layout
