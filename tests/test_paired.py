"""Paired per-image comparison of two evaluations (engine/paired.py, scripts/paired.py)."""
from __future__ import annotations

import json

import pytest

from common.errors import UserError
from engine.paired import paired_difference, read_per_image
from scripts.paired import main as paired_main


def rows(scores: dict[str, float]) -> list[dict]:
    return [{"image": name, "dice_disc": dice, "dice_cup": dice - 0.2, "iou_disc": dice / 2, "iou_cup": 0.0}
            for name, dice in scores.items()]


def test_difference_is_image_by_image_with_a_bootstrap_interval_around_it():
    a = rows({"x": 0.9, "y": 0.8, "z": 0.7, "w": 0.6})
    b = rows({"w": 0.6, "z": 0.5, "y": 0.8, "x": 0.7})  # same images, another order
    result = paired_difference(a, b, resamples=2000)
    assert result["images"] == 4
    assert result["mean_a"] == pytest.approx(0.65)  # class mean per image: dice - 0.1
    assert result["difference"] == pytest.approx(0.1)
    assert 0 <= result["ci_low"] <= 0.1 <= result["ci_high"] <= 0.2
    assert (result["a_better"], result["b_better"]) == (2, 0)
    same = paired_difference(a, a, metric="iou", resamples=100)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0


def test_evaluations_of_different_images_are_refused_naming_one():
    with pytest.raises(UserError, match=r"different images \(2 and 2; y only in A\)"):
        paired_difference(rows({"x": 0.9, "y": 0.8}), rows({"x": 0.9, "q": 0.8}))


def test_run_folders_and_json_files_are_read_and_old_ones_without_rows_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_metrics.json").write_text(json.dumps({"metrics": {}, "per_image": rows({"x": 0.9, "y": 0.5})}))
    (tmp_path / "b.json").write_text(json.dumps({"metrics": {}, "per_image": rows({"x": 0.8, "y": 0.5})}))
    assert [row["image"] for row in read_per_image(run)] == ["x", "y"]
    result = paired_main([str(run), str(tmp_path / "b.json"), "-resamples", "500"])
    assert result["difference"] == pytest.approx(0.05)
    assert "A - B +0.0500" in capsys.readouterr().out
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(UserError, match="no per-image scores.*val.py -weights"):
        read_per_image(tmp_path / "old.json")
    with pytest.raises(UserError, match="neither a run folder"):
        read_per_image(tmp_path / "missing")
