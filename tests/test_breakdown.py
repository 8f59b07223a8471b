"""Per-image scores by the object's share of the image (engine/breakdown.py, scripts/by_size.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cfg import Config
from common.errors import UserError
from engine.breakdown import by_foreground, foreground_fractions
from engine.session import load_data
from scripts.by_size import main as by_size_main


def rows(scores: dict[str, float]) -> list[dict]:
    return [{"image": name, "dice_lesion": dice, "iou_lesion": dice / 2} for name, dice in scores.items()]


FRACTIONS = {"a": 0.01, "b": 0.02, "c": 0.30, "d": 0.50, "e": 0.05, "f": 0.90}


def test_images_are_grouped_by_foreground_fraction_smallest_first():
    small_fails = rows({"a": 0.2, "b": 0.4, "e": 0.6, "c": 0.9, "d": 0.9, "f": 0.8})
    even = rows({name: 0.7 for name in FRACTIONS})
    result = by_foreground({"small_fails": small_fails, "even": even}, FRACTIONS, groups=3)
    assert result["ranges"] == [(0.01, 0.02), (0.05, 0.30), (0.50, 0.90)]
    assert result["sizes"] == [2, 2, 2]
    assert result["means"]["small_fails"] == pytest.approx([0.3, 0.75, 0.85])
    assert result["means"]["even"] == pytest.approx([0.7, 0.7, 0.7])
    assert result["overall"]["small_fails"] == pytest.approx(3.8 / 6)
    assert result["below_half"] == {"small_fails": 2, "even": 0}
    iou = by_foreground({"even": even}, FRACTIONS, groups=1, metric="iou")
    assert iou["means"]["even"] == pytest.approx([0.35]) and iou["sizes"] == [6]


def test_mismatched_images_missing_masks_and_bad_group_counts_are_refused():
    full = rows({name: 0.5 for name in FRACTIONS})
    with pytest.raises(UserError, match="other images than the first"):
        by_foreground({"x": full, "y": full[:-1]}, FRACTIONS)
    with pytest.raises(UserError, match="image g is not in the evaluated split"):
        by_foreground({"x": full + rows({"g": 0.1})}, FRACTIONS)
    with pytest.raises(UserError, match="-groups 7: use 1 to 6"):
        by_foreground({"x": full}, FRACTIONS, groups=7)


def test_script_reads_the_masks_of_the_evaluated_dataset(tmp_path, capsys):
    config = Config(dataset="synthetic", synthetic_size=12)
    dataset = load_data(config, verbose=False).test
    fractions = foreground_fractions(dataset)
    for index, name in enumerate(dataset.names):  # each against its own mask, read directly
        mask = dataset.bank.channels(index)
        assert fractions[name] == pytest.approx(float((mask > 0.5).any(axis=0).mean()))
    assert len(set(fractions.values())) > 1
    scores = {name: 0.1 + 0.8 * i / len(fractions) for i, name in enumerate(sorted(fractions, key=fractions.get))}
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"config": config.to_json(), "per_image": rows(scores)}))
    result = by_size_main([str(evaluation), "-groups", "2"])
    ordered = [scores[name] for name in sorted(fractions, key=lambda name: (fractions[name], name))]
    first = result["sizes"][0]
    assert result["means"][str(evaluation)] == pytest.approx([np.mean(ordered[:first]), np.mean(ordered[first:])])
    assert result["overall"][str(evaluation)] == pytest.approx(np.mean(ordered))
    assert "below 0.5" in capsys.readouterr().out
