"""Compare adaptation modes: train each (or read finished runs), then one table and two figures."""
from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cfg import VAL, ZERO_SHOT, Config  # noqa: E402
from models.modes import get_mode, mode_options  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.tables import markdown_table  # noqa: E402

from .checkpoints import CONFIG, LAST_STATE  # noqa: E402

FINAL = "final_metrics.json"
REPO = Path(__file__).resolve().parents[1]


def applies_to(flag_name: str, mode: str) -> bool:
    """Whether a mode-specific flag means anything for `mode` (compare passes it only there)."""
    spec = get_mode(mode)
    if flag_name in mode_options():
        return flag_name in spec.options
    if flag_name in ("grad_ckpt", "cache_embeddings"):
        return spec.trains_encoder == (flag_name == "grad_ckpt")
    return True


def train_argv(given: dict, mode: str, seed: int, exp_name: str) -> list[str]:
    """train.py flags for one mode/seed: the user's flags that apply to it, plus -mod, -seed, -exp_name."""
    argv = _flag_argv({name: value for name, value in given.items() if applies_to(name, mode)})
    return argv + ["-mod", mode, "-seed", str(seed), "-exp_name", exp_name]


def _flag_argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv += [f"-{name}"] if value else []
        else:
            argv += [f"-{name}", str(value)]
    return argv


def zero_shot_run(given: dict, name: str, ckpt_root: str) -> Path:
    """Evaluate the base net as it is (val.py without -weights) on the same data, split and prompts as the
    trained rows; its metrics go to <ckpt_root>/<name>_zero_shot/final_metrics.json."""
    run_dir = Path(ckpt_root) / f"{name}_{ZERO_SHOT}"
    if run_is_finished(run_dir):
        print(f"[compare] {run_dir.name}: evaluated earlier, not evaluated again", flush=True)
        return run_dir
    val_flags = {f.name for f in dataclasses.fields(Config) if VAL in f.metadata["scripts"]}
    command = [sys.executable, str(REPO / "val.py"), *_flag_argv({k: v for k, v in given.items() if k in val_flags}),
               "-json", str(run_dir / FINAL)]
    print(f"[compare] {' '.join(command[1:])}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"the zero-shot evaluation {run_dir.name} failed (see its output above)")
    return run_dir


def run_is_finished(run_dir: Path) -> bool:
    return (run_dir / FINAL).is_file()


def train_runs(given: dict, modes: list[str], seeds: list[int], name: str, ckpt_root: str) -> list[Path]:
    """Train every mode x seed in its own process; finished runs are kept, killed ones resumed."""
    folders = []
    for mode in modes:
        for seed in seeds:
            exp_name = f"{name}_{mode}_seed{seed}"
            run_dir = Path(ckpt_root) / exp_name
            folders.append(run_dir)
            if run_is_finished(run_dir):
                print(f"[compare] {exp_name}: finished earlier, not trained again", flush=True)
                continue
            if (run_dir / LAST_STATE).is_file():
                command = [sys.executable, str(REPO / "train.py"), "-resume", str(run_dir)]
            else:
                command = [sys.executable, str(REPO / "train.py"), *train_argv(given, mode, seed, exp_name)]
            print(f"[compare] {' '.join(command[1:])}", flush=True)
            if subprocess.run(command).returncode != 0:
                raise UserError(f"training {exp_name} failed (see its output above); rerun compare to resume")
    return folders


def read_run(run_dir: Path) -> dict:
    """Everything the table needs from one finished run folder (or a zero-shot evaluation)."""
    if not run_is_finished(run_dir):
        raise UserError(f"{run_dir} has no {FINAL}: it is not a finished train.py run")
    final = json.loads((run_dir / FINAL).read_text())
    if not (run_dir / CONFIG).is_file():  # val.py's zero-shot evaluation: nothing trained
        return {"mode": ZERO_SHOT, "seed": final["config"]["seed"], "config": final["config"], "final": final,
                "history": [], "ckpt_mb": 0.0}
    config = json.loads((run_dir / CONFIG).read_text())
    with open(run_dir / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    return {"mode": config["mod"], "seed": config["seed"], "config": config, "final": final, "history": history,
            "ckpt_mb": (run_dir / "best.safetensors").stat().st_size / 2 ** 20}


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict]) -> list[dict]:
    """One row per mode; metrics as mean (and std over seeds)."""
    rows = []
    for mode in dict.fromkeys(run["mode"] for run in runs):
        group = [run for run in runs if run["mode"] == mode]
        metrics = group[0]["final"]["metrics"]
        row = {"mode": mode, "seeds": len(group), "split": group[0]["final"]["split"]}
        for key in [k for k in metrics if k.startswith(("dice_", "iou_")) or k == "vcdr_mae"]:
            row[key], row[f"{key}_std"] = _mean_std([run["final"]["metrics"][key] for run in group])
        history = group[0]["history"]
        total = group[0]["final"]["total_params"]
        if not history:  # zero-shot: no training
            row.update({"trainable_params": 0, "trainable_share_pct": 0.0, "ckpt_mb": 0.0, "sec_per_step": None,
                        "images_per_s": None, "peak_mem_mb": None, "wall_min": None})
            rows.append(row)
            continue
        trainable = int(history[-1]["trainable_params"])
        row.update({
            "trainable_params": trainable, "trainable_share_pct": 100 * trainable / total,
            "ckpt_mb": group[0]["ckpt_mb"],
            "sec_per_step": statistics.fmean(float(r["sec_per_step"]) for run in group for r in run["history"]),
            "images_per_s": statistics.fmean(float(r["images_per_s"]) for run in group for r in run["history"]),
            "peak_mem_mb": max(float(r["peak_mem_mb"]) for run in group for r in run["history"]),
            "wall_min": statistics.fmean(run["final"]["wall_seconds"] for run in group) / 60,
        })
        rows.append(row)
    return rows


def markdown(rows: list[dict], class_keys: list[str]) -> str:
    def metric(row, key):
        std = row.get(f"{key}_std")
        return f"{row[key]:.4f}" + (f" ± {std:.4f}" if std is not None else "")

    headers = ["mode", *class_keys, "trainable", "share %", "ckpt MB", "s/step", "img/s", "peak MB", "wall min"]
    def shown(row, key, spec):
        return "-" if row[key] is None else format(row[key], spec)  # zero-shot: nothing trained

    return markdown_table(headers, ([row["mode"], *[metric(row, key) for key in class_keys],
                                     f"{row['trainable_params']:,}", f"{row['trainable_share_pct']:.2f}",
                                     f"{row['ckpt_mb']:.2f}", shown(row, "sec_per_step", ".3f"),
                                     shown(row, "images_per_s", ".2f"), shown(row, "peak_mem_mb", ".0f"),
                                     shown(row, "wall_min", ".1f")] for row in rows))


def write_outputs(runs: list[dict], out_dir: Path) -> str:
    rows = summarise(runs)
    class_keys = [k for k in rows[0] if k.startswith(("dice_", "iou_")) and not k.endswith("_std")]
    class_keys += ["vcdr_mae"] if "vcdr_mae" in rows[0] else []
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, class_keys)
    (out_dir / "table.md").write_text(table + "\n")
    with open(out_dir / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(runs, out_dir / "curves.png")
    plot_tradeoff(rows, out_dir / "tradeoff.png")
    return table


def plot_curves(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in dict.fromkeys(run["mode"] for run in runs):
        by_epoch: dict[int, list[float]] = {}
        for run in (r for r in runs if r["mode"] == mode):
            for row in run["history"]:
                if row.get("val_dice_mean"):
                    by_epoch.setdefault(int(row["epoch"]), []).append(float(row["val_dice_mean"]))
        epochs = sorted(by_epoch)
        if not epochs:  # zero-shot: nothing trained
            continue
        ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", label=mode)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val mean Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "trainable_params", "trainable parameters (log)"),
                           (axes[1], "peak_mem_mb", "peak memory (MB)")):
        for row in rows:
            if row["mode"] == ZERO_SHOT:  # no parameters trained, no training memory: a reference line
                ax.axhline(row["dice_mean"], color="grey", linestyle="--", label="zero-shot base")
                continue
            ax.scatter(row[key], row["dice_mean"], s=60)
            ax.annotate(row["mode"], (row[key], row["dice_mean"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{rows[0]['split']} mean Dice")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
