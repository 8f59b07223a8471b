"""benchmark.py measures each row in its own process and writes a consistent CSV and table."""
from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_python

from engine.benchmark import COLUMNS, merge_rounds

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_rows(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "benchmark.py", "-nets", "mobile_sam", "-mods", "sam_lora,sam_adpt",
                             "-grad_ckpt_options", "0,mlp", "-host_memory_options", "reuse,system", "-image_size", "64", "-b", "2", "-steps", "1", "-out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out.with_suffix(".csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["mod"] for row in rows] == ["plain_full"] + ["sam_lora"] * 4 + ["sam_adpt"] * 4
    assert list(rows[0]) == list(COLUMNS)
    assert [row["recompute_mlp"] for row in rows] == ["False"] + ["False", "False", "True", "True"] * 2
    reuse = "reuse" if platform.libc_ver()[0] == "glibc" else "system"  # the plain row: the C library's defaults
    assert [row["host_memory"] for row in rows] == ["system"] + [reuse, "system"] * 4
    plain, lora, _, lora_recomputed, _, adapter, *_ = rows
    assert lora_recomputed["trainable_params"] == lora["trainable_params"] and lora_recomputed["grad_ckpt"] == "False"
    assert int(plain["trainable_params"]) == int(plain["total_params"]) == int(lora["total_params"])
    assert plain["time_vs_plain"] == "" and float(lora["time_vs_plain"]) == pytest.approx(
        float(lora["sec_per_step"]) / float(plain["sec_per_step"]), abs=2e-3)
    assert float(lora["peak_vs_plain"]) > 0 and float(adapter["train_mem_vs_plain"]) > 0
    assert lora["decoder"] == "full" and lora["amp"] == "none"
    assert int(lora["trainable_params"]) == 4_177_124 and int(adapter["trainable_params"]) == 4_454_148
    assert float(lora["ckpt_mb"]) == pytest.approx(4_177_124 * 4 / 2 ** 20, rel=0.01)  # float32 tensors + header
    assert float(lora["sec_per_step"]) > 0 and float(lora["peak_mem_mb"]) > float(lora["train_mem_mb"]) > 0
    assert 0 < float(lora["matmul_fraction"]) and float(lora["infer_merged_ms"]) > 0
    for row in rows:  # each row against the matmul reference measured around its own process
        assert float(row["matmul_fraction"]) == pytest.approx(
            float(row["train_gflops_per_s"]) / float(row["matmul_reference"]), abs=1e-3)
    assert len({row["matmul_reference"] for row in rows}) > 1
    assert adapter["infer_merged_ms"] == ""  # Adapters cannot be merged
    assert "| mobile_sam |" in out.with_suffix(".md").read_text()


def test_a_row_of_several_rounds_reports_its_median_round_with_the_spread_and_the_highest_peak():
    rounds = [dict(sec_per_step=s, images_per_s=2 / s, train_gflops_per_s=10 / s, infer_base_ms=i,
                   peak_mem_mb=p, train_mem_mb=p - 800) for s, i, p in ((0.15, 7.0, 900.0), (0.10, 5.0, 910.0),
                                                                        (0.11, 6.0, 880.0), (0.30, 9.0, 905.0))]
    row = merge_rounds(rounds)
    # the lower median of four: the 0.11 s round, with its own throughput and inference time
    assert (row["sec_per_step"], row["infer_base_ms"], row["images_per_s"]) == (0.11, 6.0, 2 / 0.11)
    assert (row["rounds"], row["sec_per_step_min"], row["sec_per_step_max"]) == (4, 0.10, 0.30)
    assert (row["peak_mem_mb"], row["train_mem_mb"]) == (910.0, 110.0)
    assert merge_rounds(rounds[:1]) == {**rounds[0], "rounds": 1, "sec_per_step_min": 0.15, "sec_per_step_max": 0.15}


@pytest.mark.slow
def test_rounds_take_turns_and_each_row_reports_them(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "benchmark.py", "-nets", "efficient_sam:vit_t", "-mods", "sam_lora,sam_adpt",
                             "-no_plain", "-image_size", "64", "-b", "1", "-steps", "1", "-warmup", "0", "-rounds", "2",
                             "-out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = [line.split("mod=")[1].split()[0] for line in result.stdout.splitlines() if line.startswith("round ")]
    assert measured == ["sam_lora", "sam_adpt"] * 2  # the rows take turns
    with open(out.with_suffix(".csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["mod"] for row in rows] == ["sam_lora", "sam_adpt"]
    for row in rows:
        assert row["rounds"] == "2"
        assert float(row["sec_per_step_min"]) <= float(row["sec_per_step"]) <= float(row["sec_per_step_max"])
    assert "; 2 rounds, each row: its median round" in out.with_suffix(".md").read_text()


def test_a_training_step_imports_no_data_libraries_it_does_not_use():
    """monai (about 5 s and 100 MB) is not the loss's, albumentations is imported only by a set that
    augments, OpenCV (16 MB) only with the datasets and matplotlib (26 MB) only for a figure: the
    benchmark's child processes build neither, and their peak memory shows it."""
    script = ("import sys\n"
              "import engine.benchmark, engine.trainer, engine.validation\n"
              "loaded = sorted(m for m in ('monai', 'albumentations', 'cv2', 'matplotlib') if m in sys.modules)\n"
              "assert not loaded, loaded\n"
              "from datasets.transforms import build_augment\n"
              "assert build_augment('light') is not None and 'albumentations' in sys.modules\n"
              "import tempfile, pathlib\n"
              "from engine.logbook import plot_curves\n"
              "path = pathlib.Path(tempfile.mkdtemp()) / 'curves.png'\n"
              "plot_curves([{'epoch': 0, 'train_loss': 1.0}], path, 'title')\n"
              "assert path.is_file() and 'matplotlib' in sys.modules\n")
    run_python(script)


def test_a_training_step_imports_neither_torchs_compiler_stack_nor_torchvision():
    """torch.optim's optimizers and segment-anything's package __init__ (through torchvision) import
    torch._dynamo, and FlopCounterMode imports triton: about 150 MB of a small net's peak. A step of every
    kind of net goes without them (FusedAdamW, models/segment_anything_modeling.py); segment-anything's
    whole package is still there for code that asks for it, with the same classes."""
    script = ("import sys, torch\n"
              "from cfg import Config\n"
              "from engine.benchmark import synthetic_batch, training_step\n"
              "import engine.trainer, engine.validation, engine.predictor\n"
              "rows = [('mobile_sam', 'tiny_vit', 'sam_adalora'), ('efficient_sam', 'vit_t', 'sam_adpt'),\n"
              "        ('lite_medsam', 'tiny_vit', 'sam_full'), ('sam', 'vit_b', 'sam_lora')]\n"
              "for net, encoder, mod in rows:\n"
              "    config = Config(net=net, encoder=encoder, mod=mod, image_size=64, b=1, amp='none', sam_ckpt='random')\n"
              "    training_step(config, synthetic_batch(config, 1, torch.device('cpu')), 4)[3]()\n"
              "loaded = sorted(m for m in ('torch._dynamo', 'torchvision', 'triton') if m in sys.modules)\n"
              "assert not loaded, loaded\n"
              "import segment_anything\n"
              "from segment_anything import SamPredictor, sam_model_registry\n"
              "from models.segment_anything_modeling import MaskDecoder\n"
              "assert segment_anything.modeling.MaskDecoder is MaskDecoder and 'vit_b' in sam_model_registry\n"
              "assert 'torchvision' in sys.modules\n")
    run_python(script)
