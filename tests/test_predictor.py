"""The Python API (engine/predictor.py): prompts and masks in original image pixels, and the same masks as
the data-set path that val.py used before it went through the Predictor."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cfg import Config
from datasets import build_image_folder
from engine.predict import predict_folder, save_predictions
from engine.predictor import Predictor
from models import build_segmenter
from tests.test_lite_medsam import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def disc_image(height: int = 300, width: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc on a dark textured background, and its mask."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, (height, width, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - 170) ** 2 + (xx - 90) ** 2 < 45 ** 2
    image[mask] = 200
    return image, mask


def test_from_base_segments_a_boxed_disc_in_original_pixels():
    predictor = Predictor.from_base("lite_medsam", device="cpu")
    image, truth = disc_image()
    predictor.set_image(image)
    masks, scores = predictor.predict(box=[40, 120, 140, 220])
    assert masks.shape == (1, 300, 200) and masks.dtype == bool and scores.shape == (1,)
    dice = 2 * (masks[0] & truth).sum() / (masks[0].sum() + truth.sum())
    assert dice > 0.8, dice
    masks, _ = predictor.predict(points=[[90, 170]], labels=[1])  # a click works too
    assert masks.shape == (1, 300, 200)


def test_predict_needs_an_image_first():
    model = build_segmenter("lite_medsam", "default", 64, 1, **TINY)
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(model, 64, "cpu").predict()


def test_the_api_gives_the_masks_of_the_dataset_path(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("lite_medsam", "default", 64, 2, **TINY).eval()
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for name, (height, width) in {"tall": (90, 60), "wide": (50, 120)}.items():
        cv2.imwrite(str(folder / f"{name}.png"), disc_image(height, width)[0])
        rows.append(f"{name}.png,5,8,{width - 10},{height - 6}")
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    dataset = build_image_folder(str(folder), 64, 2, str(tmp_path / "boxes.csv"))
    config = Config(image_size=64, b=1, workers=0)
    save_predictions(model, dataset, config, torch.device("cpu"), tmp_path / "dataset", ["a", "b"])
    predict_folder(Predictor(model, 64, "cpu", ["a", "b"]), dataset, tmp_path / "api")
    for name in ("tall_a", "tall_b", "wide_a", "wide_b"):
        old = cv2.imread(str(tmp_path / "dataset" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        new = cv2.imread(str(tmp_path / "api" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert old.shape == new.shape and (old != new).mean() < 0.002, name
