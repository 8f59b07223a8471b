"""End-to-end runs of the scripts on the synthetic set (small MobileSAM at 64 px): training improves
Dice, val.py reproduces it in a fresh process, a killed run resumes exactly, and two data-parallel
processes follow the one-process trajectory."""
from __future__ import annotations

import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

BASE = ["-net", "mobile_sam", "-mod", "sam_lora", "-dataset", "synthetic", "-image_size", "64",
        "-synthetic_size", "16", "-lr", "1e-3", "-vis", "0", "-workers", "0"]


def run_script(script: str, *args: str, tmp: Path, timeout: int = 600, check: bool = True,
               launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*(launcher or (sys.executable,)), script, *args, "-ckpt_root", str(tmp / "ck"),
               "-figs_root", str(tmp / "figs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def dice_of_untrained_model(tmp: Path) -> float:
    """Val Dice of the same seeded base + mode before any training step."""
    from cfg import parse_args
    from engine.runtime import Runtime
    from engine.session import build_model, load_data
    from engine.evaluation import EvalSettings, evaluate

    config, _ = parse_args("train", BASE)
    data = load_data(config, verbose=False)
    model, _ = build_model(config, data.num_classes, 100, torch.device("cpu"), verbose=False)
    return evaluate(model, data.val, EvalSettings.of(config), Runtime(torch.device("cpu")), data.class_names)["dice_mean"]


def test_training_improves_dice_and_val_reproduces_it(tmp_path):
    result = run_script("train.py", *BASE, "-epochs", "4", "-b", "4", "-exp_name", "e2e", tmp=tmp_path)
    if platform.libc_ver()[0] == "glibc":  # train.py started itself again with glibc's thread cache off
        assert "host memory: freed blocks kept for reuse (glibc malloc: heap only, never trimmed, no per-thread" \
            in result.stdout
    run_dir = tmp_path / "ck" / "e2e"
    history = read_metrics(run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2, 3, 4]
    before, after = dice_of_untrained_model(tmp_path), float(history[-1]["val_dice_mean"])
    assert after > before + 0.1, (before, after)
    for column in ("train_loss", "val_dice_lesion", "val_iou_mean", "peak_mem_mb", "images_per_s",
                   "trainable_params"):
        assert float(history[-1][column]) >= 0
    assert {"config.json", "splits.json", "best.safetensors", "last.safetensors", "last.pt",
            "final_metrics.json"} <= {p.name for p in run_dir.iterdir()}
    assert (tmp_path / "figs" / "e2e" / "curves.png").stat().st_size > 0
    # adapter-only checkpoint: the LoRA tensors and the decoder, not the 10M-parameter base
    assert (run_dir / "last.safetensors").stat().st_size < 0.5 * 4 * 10_130_092

    # a fresh process rebuilds the model from config.json and reproduces the final test evaluation exactly
    # (best weights, metrics at the original resolution); per-epoch validation is at the model's resolution
    out = tmp_path / "val.json"
    result = run_script("val.py", "-weights", str(run_dir), "-which", "best", "-split", "test", "-json", str(out),
                        "-save_pred", str(tmp_path / "pred"), tmp=tmp_path)
    assert "dice_mean" in result.stdout and "original resolution" in result.stdout
    assert "host memory: " in result.stdout  # the -host_memory policy in force, said once
    final = json.loads((run_dir / "final_metrics.json").read_text())["metrics"]
    assert json.loads(out.read_text())["metrics"]["dice_mean"] == pytest.approx(final["dice_mean"], abs=1e-6)
    predictions = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert len(predictions) == 2 * 4 and any(name.endswith("_overlay.png") for name in predictions)
    # the Python API rebuilds the same run; a PEFT run also wrote its adapters in peft's format
    from engine.predictor import Predictor
    predictor = Predictor.from_run(run_dir, which="last", device="cpu")
    predictor.set_image(np.zeros((40, 50, 3), np.uint8))
    masks, scores = predictor.predict(box=[5, 5, 30, 30])
    assert masks.shape == (1, 40, 50) and scores.shape == (1,)
    assert {"adapter_config.json", "adapter_model.safetensors", "mask_decoder.safetensors"} <= \
        {p.name for p in (run_dir / "peft").iterdir()}


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    args = [*BASE, "-epochs", "3", "-b", "2", "-ckpt_steps", "2"]
    run_script("train.py", *args, "-exp_name", "whole", tmp=tmp_path)

    command = [sys.executable, "train.py", *args, "-exp_name", "killed", "-ckpt_root", str(tmp_path / "ck"),
               "-figs_root", str(tmp_path / "figs")]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "ck" / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a mid-epoch checkpoint of epoch 2, then SIGKILL
        if last.exists():
            state = torch.load(last, weights_only=False)["train_state"]
            if state["epoch"] == 2 and state["step_in_epoch"] > 0:
                break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert len(read_metrics(tmp_path / "ck" / "killed")) == 1  # killed inside epoch 2

    result = run_script("train.py", "-resume", str(tmp_path / "ck" / "killed"), tmp=tmp_path)
    assert "resumed" in result.stdout
    whole, resumed = read_metrics(tmp_path / "ck" / "whole"), read_metrics(tmp_path / "ck" / "killed")
    assert len(resumed) == 3
    for a, b in zip(whole, resumed):
        for key in ("train_loss", "val_dice_mean", "val_iou_mean"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key


@pytest.mark.parametrize(("decoder", "port"), [("full", "29533"), ("lora", "29534")])
def test_two_processes_follow_one_process(tmp_path, decoder, port):
    """-decoder full: DDP searches for unused parameters (the IoU head); lora: every trainable one gets a
    gradient, so DDP runs without the search."""
    args = [*BASE, "-epochs", "2", "-aug", "light", "-decoder", decoder, "-amp", "none"]  # bf16 rounding differs by batch shape
    run_script("train.py", *args, "-b", "4", "-exp_name", "single", tmp=tmp_path)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port)
    run_script("train.py", *args, "-b", "2", "-exp_name", "ddp", tmp=tmp_path, launcher=torchrun)
    single, ddp = read_metrics(tmp_path / "ck" / "single"), read_metrics(tmp_path / "ck" / "ddp")
    assert [row["world_size"] for row in ddp] == ["2", "2"]
    for a, b in zip(single, ddp):
        for key in ("train_loss", "val_dice_mean", "val_iou_mean"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-5), key


SLOW_WRITER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from engine import checkpoints
write = checkpoints.save_weights

def slow_write(*args, **kwargs):  # rank 0 takes its time writing weights: other ranks must wait for it
    time.sleep(3)
    write(*args, **kwargs)

checkpoints.save_weights = slow_write
import train
from common.cli import run_cli
run_cli(train.main)
"""


def test_data_parallel_ranks_wait_for_the_checkpoint_writer(tmp_path):
    """Rank 1 evaluates best.safetensors at the end: it must not read it before rank 0 wrote it."""
    script = tmp_path / "slow_writer_train.py"
    script.write_text(SLOW_WRITER.format(repo=str(REPO)))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    args = ["-net", "mobile_sam", "-mod", "sam_decoder", "-dataset", "synthetic", "-image_size", "64",
            "-synthetic_size", "8", "-b", "2", "-epochs", "1", "-vis", "0", "-exp_name", "race"]
    result = run_script(str(script), *args, tmp=tmp_path, launcher=torchrun, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 0, errors or result.stderr[-1500:]
    assert (tmp_path / "ck" / "race" / "final_metrics.json").is_file()
