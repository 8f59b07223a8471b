"""compare.py: trains each mode with the same flags, tabulates them, and does not retrain finished modes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfg import ZERO_SHOT, parse_args
from common.errors import UserError
from engine.compare import (Variant, _reuse_or_clear, applies_to, config_differences, expand_runs, label_offsets,
                            labels_without_a_shared_lr, plot_curves, set_apart, train_argv, variant_of, variants)

REPO = Path(__file__).resolve().parents[1]


def test_mode_specific_flags_go_only_to_their_modes():
    given = {"mid_dim": 8, "lora_alpha": 16.0, "adalora_init_r": 6, "grad_ckpt": True, "image_size": 64}
    assert train_argv(given, Variant("sam_full"), 1, "x") == ["-grad_ckpt", "-image_size", "64", "-mod", "sam_full",
                                                              "-seed", "1", "-exp_name", "x"]
    assert "-lora_alpha" in train_argv(given, Variant("sam_lora"), 0, "x")
    assert "-adalora_init_r" not in train_argv(given, Variant("sam_lora"), 0, "x")
    assert not applies_to("grad_ckpt", "sam_decoder") and applies_to("mid_dim", "sam_adpt")
    assert applies_to("merge", "sam_dora") and not applies_to("merge", "sam_adpt")


def test_sweeps_expand_only_where_they_apply():
    rows = variants(["sam_decoder", "sam_adpt", "sam_lora", "sam_adalora"], ["full", "lora"], [2, 8], [16])
    labels = [row.label() for row in rows]
    assert labels == ["sam_decoder n16", "sam_adpt dec-full n16", "sam_adpt dec-lora n16",
                      "sam_lora dec-full r2 n16", "sam_lora dec-full r8 n16", "sam_lora dec-lora r2 n16",
                      "sam_lora dec-lora r8 n16", "sam_adalora dec-full r2 n16", "sam_adalora dec-full r8 n16",
                      "sam_adalora dec-lora r2 n16", "sam_adalora dec-lora r8 n16"]
    assert Variant("sam_lora", "lora", 8, 16).flags() == {"decoder": "lora", "mid_dim": 8, "max_train": 16}
    assert Variant("sam_adalora", None, 2).flags() == {"adalora_target_r": 2, "adalora_init_r": 6}
    # a saved run config maps back to the variant that made it
    config, _ = parse_args("train", train_argv({}, Variant("sam_adalora", "lora", 2, 16, 2e-3), 0, "x"))
    assert variant_of(config.to_json()) == Variant("sam_adalora", "lora", 2, 16, 2e-3)
    # without -mid_dim (-lr) the row carries the rank (learning rate) in effect, so it joins a sweep's curve
    config, _ = parse_args("train", train_argv({}, Variant("sam_lora", "lora"), 0, "x"))
    assert variant_of(config.to_json()) == Variant("sam_lora", "lora", 4, None, config.lr)


def test_a_learning_rate_sweep_runs_every_mode_at_each_rate_and_labels_show_it_only_when_it_differs():
    rows = variants(["sam_decoder", "sam_lora"], ["lora"], [None], [None], [1e-4, 2.5e-3])
    assert [row.label() for row in rows] == ["sam_decoder lr1e-4", "sam_decoder lr2.5e-3",
                                             "sam_lora dec-lora lr1e-4", "sam_lora dec-lora lr2.5e-3"]
    assert rows[-1].flags() == {"decoder": "lora", "lr": 2.5e-3}
    runs = [{"variant": Variant(ZERO_SHOT)}, {"variant": Variant("sam_lora", "lora", 4, None, 5e-4)},
            {"variant": Variant("sam_full", None, None, None, 5e-4)}]
    assert [run["variant"].label() for run in labels_without_a_shared_lr(runs)] == [
        "zero_shot", "sam_lora dec-lora r4", "sam_full"]
    runs[2] = {"variant": Variant("sam_full", None, None, None, 1e-4)}
    assert [run["variant"].label() for run in labels_without_a_shared_lr(runs)] == [
        "zero_shot", "sam_lora dec-lora r4 lr5e-4", "sam_full lr1e-4"]


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved, _ = parse_args("train", ["-mod", "sam_lora", "-lr", "1e-4", "-vis", "0"])
    same, _ = parse_args("train", ["-mod", "sam_lora", "-lr", "1e-4", "-workers", "2"])  # -workers: same results
    assert config_differences(saved.to_json(), same) == []
    other, _ = parse_args("train", ["-mod", "sam_lora", "-lr", "5e-4", "-epochs", "3"])
    assert config_differences(saved.to_json(), other) == ["-epochs 10 -> 3", "-lr 0.0001 -> 0.0005"]
    adalora, _ = parse_args("train", ["-mod", "sam_adalora"])
    older = {k: v for k, v in adalora.to_json().items() if k != "adalora_init"}  # a run from before the flag
    assert config_differences(older, adalora) == []
    orthogonal, _ = parse_args("train", ["-mod", "sam_adalora", "-adalora_init", "orthogonal"])
    assert config_differences(older, orthogonal) == ["-adalora_init gaussian -> orthogonal"]
    with pytest.raises(UserError, match=r"run was made with other settings \(-epochs 10 -> 3; -lr .*-overwrite"):
        _reuse_or_clear(run_dir, saved.to_json(), other, overwrite=False)
    assert run_dir.is_dir()  # refused: nothing deleted
    assert not _reuse_or_clear(run_dir, saved.to_json(), other, overwrite=True) and not run_dir.exists()


@pytest.mark.slow
def test_compare_trains_tabulates_and_resumes(tmp_path):
    command = [sys.executable, "compare.py", "-image_size", "64", "-synthetic_size", "8", "-epochs", "1", "-b", "4",
               "-vis", "0", "-mods", "sam_decoder,sam_lora", "-exp_name", "t", "-ckpt_root", str(tmp_path / "ck"),
               "-figs_root", str(tmp_path / "figs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "figs" / "compare_t"
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == ["zero_shot", "sam_decoder", "sam_lora dec-full r4"]
    assert int(rows[0]["trainable_params"]) == 0 < int(rows[1]["trainable_params"]) < int(rows[2]["trainable_params"])
    assert all(float(row["ckpt_mb"]) > 0 for row in rows[1:])
    # each trained row's Dice is the one its run folder's final_metrics.json reports (one seed: no averaging)
    for row in rows[1:]:
        (run_dir,) = (tmp_path / "ck").glob(f"t_{row['mode']}_seed*")  # one variant per mode here
        final = json.loads((run_dir / "final_metrics.json").read_text())
        assert float(row["dice_mean"]) == pytest.approx(final["metrics"]["dice_mean"], abs=1e-12)
        assert int(row["images"]) == final["metrics"]["images"]
    assert rows[1]["dice_mean"] != rows[2]["dice_mean"]  # two runs, two results: not one row copied
    # the zero-shot row is the pretrained base (default lite_medsam) on the same test split: val.py agrees
    zero_shot = tmp_path / "zs.json"
    evaluated = subprocess.run([sys.executable, "val.py", "-image_size", "64", "-synthetic_size", "8", "-json",
                                str(zero_shot)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert float(rows[0]["dice_mean"]) == pytest.approx(json.loads(zero_shot.read_text())["metrics"]["dice_mean"])
    assert {"table.md", "table.csv", "curves.png", "tradeoff.png"} <= {p.name for p in out.iterdir()}
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0 and second.stdout.count("not trained again") == 2
    assert second.stdout.count("not evaluated again") == 1
    changed = subprocess.run(command + ["-lr", "0.01"], cwd=REPO, capture_output=True, text=True, timeout=600,
                             env=env)
    assert changed.returncode == 2 and "-lr 0.0001 -> 0.01" in changed.stderr and "-overwrite" in changed.stderr
    # -runs with -max_eval: the finished runs (zero-shot included) re-evaluated on that many images by val.py,
    # kept in the run folder and reused
    again = [sys.executable, "compare.py", "-runs", str(tmp_path / "ck" / "t_*"), "-max_eval", "1", "-exp_name", "t1",
             "-figs_root", str(tmp_path / "figs")]
    first_images = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert first_images.returncode == 0, first_images.stderr[-3000:]
    with open(tmp_path / "figs" / "compare_t1" / "table.csv") as handle:
        one = {row["label"]: row for row in csv.DictReader(handle)}
    assert set(one) == {row["label"] for row in rows} and {row["images"] for row in one.values()} == {"1"}
    assert int(rows[0]["images"]) > 1, "the runs' own evaluation must differ for this to test re-evaluation"
    for row in rows[1:]:
        (run_dir,) = (tmp_path / "ck").glob(f"t_{row['mode']}_seed*")
        alone = tmp_path / f"{row['mode']}_1.json"
        check = subprocess.run([sys.executable, "val.py", "-weights", str(run_dir), "-max_eval", "1", "-json",
                                str(alone)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert check.returncode == 0, check.stderr[-3000:]
        dice = json.loads(alone.read_text())["metrics"]["dice_mean"]
        assert float(one[row["label"]]["dice_mean"]) == pytest.approx(dice, abs=1e-12)
        assert one[row["label"]]["sec_per_step"] == row["sec_per_step"]  # the cost columns stay the run's own
    assert (tmp_path / "ck" / "t_zero_shot" / "test_1.json").is_file()
    reused = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert reused.returncode == 0 and reused.stdout.count("not evaluated again") == 3


@pytest.mark.slow
def test_merge_folds_the_final_evaluation_of_the_modes_that_merge(tmp_path):
    """compare -merge: LoRA's final test evaluation runs merged (val.py reproduces it from the run folder), the
    Adapter's unmerged, the zero-shot base as it is."""
    command = [sys.executable, "compare.py", "-net", "mobile_sam", "-image_size", "64", "-synthetic_size", "8",
               "-epochs", "1", "-b", "4", "-vis", "0", "-mods", "sam_adpt,sam_lora", "-merge", "-exp_name", "m",
               "-ckpt_root", str(tmp_path / "ck"), "-figs_root", str(tmp_path / "figs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    finals = {mode: json.loads((tmp_path / "ck" / f"m_{mode}_seed0" / "final_metrics.json").read_text())
              for mode in ("sam_adpt", "sam_lora")}
    assert finals["sam_lora"]["merged"] and not finals["sam_adpt"]["merged"]
    assert "best weights, merged" in result.stdout  # and the zero-shot row, which -merge cannot apply to, ran
    base = json.loads((tmp_path / "ck" / "m_zero_shot" / "final_metrics.json").read_text())["total_params"]
    assert finals["sam_lora"]["total_params"] > base  # the trainable share counts the adapters, merged or not
    out = tmp_path / "val.json"
    check = subprocess.run([sys.executable, "val.py", "-weights", str(tmp_path / "ck" / "m_sam_lora_seed0"),
                            "-json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert check.returncode == 0 and "adapters merged into the base weights" in check.stdout, check.stderr[-3000:]
    assert json.loads(out.read_text())["metrics"]["dice_mean"] == pytest.approx(
        finals["sam_lora"]["metrics"]["dice_mean"], abs=1e-6)


def test_compare_runs_from_any_working_directory(tmp_path):
    """compare.py starts train.py/val.py by absolute path, so it works outside the repository."""
    from engine.compare import REPO as SCRIPTS

    assert SCRIPTS.is_absolute() and (SCRIPTS / "train.py").is_file() and (SCRIPTS / "val.py").is_file()
    result = subprocess.run([sys.executable, str(REPO / "compare.py"), "-h"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "usage: compare.py" in result.stdout


def test_runs_patterns_expand_sorted_with_the_zero_shot_row_first(tmp_path):
    for name in ("sweep_sam_lora_r16", "sweep_sam_lora_r1", "sweep_zero_shot", "table_sam_lora"):
        (tmp_path / name).mkdir()
    (tmp_path / "sweep_notes.txt").write_text("not a run")
    assert expand_runs(f"{tmp_path}/sweep_*,{tmp_path}/table_sam_lora,{tmp_path}/sweep_zero_shot") == [
        tmp_path / "sweep_zero_shot", tmp_path / "sweep_sam_lora_r1", tmp_path / "sweep_sam_lora_r16",
        tmp_path / "table_sam_lora"]
    with pytest.raises(UserError, match="-runs: .*nothing_\\*"):
        expand_runs(f"{tmp_path}/nothing_*")


def test_runs_that_differ_in_more_than_the_seed_are_rows_of_their_own_not_seeds_of_one():
    def run(seed: int, *extra: str) -> dict:
        config = parse_args("train", ["-mod", "sam_adalora", "-seed", str(seed), "-exp_name", f"r{seed}{extra}",
                                      "-workers", str(seed), *extra])[0].to_json()
        return {"variant": variant_of(config), "seed": seed, "config": config}

    seeds = [run(0), run(1)]  # the seed, the run name and -workers (no effect on results) differ
    assert set_apart(seeds) == seeds
    # flags of the final test evaluation alone, which a table redoes for every run, do not split seeds either
    evaluated = [run(0, "-val_freq", "0", "-max_eval", "100"), run(1, "-val_freq", "0", "-max_eval", "600", "-merge")]
    assert set_apart(evaluated) == evaluated
    chosen = set_apart([run(0, "-max_eval", "100"), run(1, "-max_eval", "600")])  # validation chose the weights
    assert [r["variant"].label() for r in chosen] == [f"sam_adalora dec-full r4 lr1e-4 -max_eval {n}" for n in (100, 600)]
    apart = set_apart([run(0), run(1), run(0, "-adalora_init", "orthogonal")])
    labels = [r["variant"].label() for r in apart]
    assert labels[0] == labels[1] == "sam_adalora dec-full r4 lr1e-4 -adalora_init gaussian"
    assert labels[2] == "sam_adalora dec-full r4 lr1e-4 -adalora_init orthogonal"


def test_a_run_alone_with_a_mode_option_off_its_default_says_so_in_its_label():
    def run(*argv: str) -> dict:
        config = parse_args("train", [*argv, "-exp_name", "x"])[0].to_json()
        return {"variant": variant_of(config), "seed": 0, "config": config}

    faster = run("-mod", "sam_adalora", "-adalora_e_lr_ratio", "20", "-lr", "1e-3")
    lora, adapter = run("-mod", "sam_lora", "-mid_dim", "8"), run("-mod", "sam_adpt", "-mid_dim", "16")
    labels = [r["variant"].label() for r in set_apart([faster, lora, adapter, run("-mod", "sam_full")])]
    assert labels == ["sam_adalora dec-full r4 lr1e-3 -adalora_e_lr_ratio 20",
                      "sam_lora dec-full r8 lr1e-4",  # the rank is the variant's own: no flag repeats it
                      "sam_adpt dec-full lr1e-4 -mid_dim 16",  # an Adapter width is not a LoRA rank
                      "sam_full lr1e-4"]


def test_curves_of_runs_without_validation_are_drawn_without_warnings(tmp_path):
    import warnings

    runs = [{"variant": Variant("sam_lora"), "history": [{"epoch": 1, "train_loss": 0.5, "val_dice_mean": ""}]},
            {"variant": Variant("sam_full"), "history": [{"epoch": 1, "train_loss": 0.4}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no labelled lines
        plot_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_tradeoff_labels_of_rows_with_nearly_equal_dice_get_different_heights():
    rows = [{"label": name, "dice_mean": dice} for name, dice in
            (("decoder", 0.8973), ("dora", 0.8973), ("adalora", 0.8974), ("full", 0.8907))]
    offsets = label_offsets(rows)
    assert len({offsets[name] for name in ("decoder", "dora", "adalora")}) == 3
    assert offsets["adalora"] == (5, 5)  # the best row keeps the default place


def test_a_table_of_runs_with_other_prompts_or_data_is_refused():
    from engine.compare import Variant, check_shared_settings

    def run(mode: str, **changes) -> dict:
        config = {"dataset": "isic", "data_path": "D", "prompt": "box", "n_points": 1, "n_neg_points": 0,
                  "image_size": 256, **changes}
        return {"variant": Variant(mode), "config": config}

    check_shared_settings([run("zero_shot"), run("sam_lora", lr=0.1)])  # other training settings are fine
    with pytest.raises(UserError, match=r"sam_lora has -prompt click, zero_shot -prompt box"):
        check_shared_settings([run("zero_shot"), run("sam_lora", prompt="click")])
    with pytest.raises(UserError, match=r"-data_path E"):
        check_shared_settings([run("zero_shot"), run("sam_full", data_path="E")])


def test_seeds_evaluated_on_different_numbers_of_images_are_refused(tmp_path):
    from engine.compare import write_outputs

    def run(seed: int, images: int, dice: float = 0.5) -> dict:
        config = parse_args("train", ["-mod", "sam_lora", "-seed", str(seed), "-val_freq", "0", "-max_eval",
                                      str(images), "-exp_name", "x"])[0].to_json()
        history = [{"epoch": 1, "train_loss": 0.5, "trainable_params": 10, "sec_per_step": 1.0, "images_per_s": 4.0,
                    "peak_mem_mb": 100.0}]
        final = {"split": "test", "metrics": {"dice_mean": dice, "iou_mean": 0.4, "images": images},
                 "total_params": 100, "wall_seconds": 60.0}
        return {"variant": variant_of(config), "seed": seed, "config": config, "final": final, "history": history,
                "ckpt_mb": 0.1}

    with pytest.raises(UserError, match=r"sam_lora dec-full r4 \(seed 1\) was evaluated on a different number"):
        write_outputs([run(0, 100), run(1, 600)], tmp_path)  # one row of two seeds: its mean would mix them
    table = write_outputs([run(0, 600, 0.5), run(1, 600, 0.7)], tmp_path)  # the same count: one row of two seeds
    assert "| sam_lora dec-full r4 | 0.6000 ± 0.1414 |" in table
