"""Compare adaptation modes: train each (or read finished runs), then one table and two figures."""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cfg import TRAIN, VAL, ZERO_SHOT, Config, parse_args  # noqa: E402
from models.modes import get_mode, mode_options  # noqa: E402
from models.modes.lora import DEFAULT_RANK  # noqa: E402
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
    if flag_name == "merge":
        return spec.mergeable
    if flag_name in ("grad_ckpt", "recompute_mlp", "cache_embeddings"):
        return spec.trains_encoder == (flag_name != "cache_embeddings")
    return True


def short_float(value: float) -> str:
    """0.0005 -> '5e-4', 0.00025 -> '2.5e-4': learning rates as people write them."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a mode, optionally with its decoder setting, LoRA rank, training-set size and
    learning rate; `others`: (flag, value) pairs of finished runs that set them apart from runs otherwise alike
    (`set_apart`)."""

    mode: str
    decoder: Optional[str] = None
    rank: Optional[int] = None
    train_size: Optional[int] = None
    lr: Optional[float] = None
    others: tuple[tuple[str, str], ...] = ()

    def label(self) -> str:
        parts = [self.mode]
        parts += [f"dec-{self.decoder}"] if self.decoder else []
        parts += [f"r{self.rank}"] if self.rank else []
        parts += [f"n{self.train_size}"] if self.train_size else []
        parts += [f"lr{short_float(self.lr)}"] if self.lr else []
        parts += [f"-{flag} {value}" for flag, value in self.others]
        return " ".join(parts)

    def flags(self) -> dict:
        """The train.py flags this variant sets (on top of the user's)."""
        flags = {}
        if self.decoder:
            flags["decoder"] = self.decoder
        if self.rank and "mid_dim" in get_mode(self.mode).options:
            flags["mid_dim"] = self.rank
        elif self.rank:  # AdaLoRA: the rank is the final average budget; it starts at three times that
            flags.update(adalora_target_r=self.rank, adalora_init_r=3 * self.rank)
        if self.train_size:
            flags["max_train"] = self.train_size
        if self.lr:
            flags["lr"] = self.lr
        return flags


def has_lora_rank(mode: str) -> bool:
    """LoRA-family modes, whose rank a rank sweep varies (LoRA, DoRA, AdaLoRA's target rank)."""
    return ".lora_" in get_mode(mode).adapter_prefix


def variants(modes: list[str], decoders: list[Optional[str]], ranks: list[Optional[int]],
             train_sizes: list[Optional[int]], lrs: Sequence[Optional[float]] = (None,)) -> list[Variant]:
    """Every mode x decoder setting (where the mode has one) x rank (LoRA family) x training-set size x
    learning rate."""
    rows = []
    for mode in modes:
        for decoder in decoders if "decoder" in get_mode(mode).options else [None]:
            for rank in ranks if has_lora_rank(mode) else [None]:
                rows += [Variant(mode, decoder, rank, size, lr) for size in train_sizes for lr in lrs]
    return rows


def train_argv(given: dict, variant: Variant, seed: int, exp_name: str) -> list[str]:
    """train.py flags for one variant/seed: the user's flags that apply to its mode, the variant's own,
    plus -mod, -seed, -exp_name."""
    flags = {name: value for name, value in given.items() if applies_to(name, variant.mode)}
    argv = _flag_argv({**flags, **variant.flags()})
    return argv + ["-mod", variant.mode, "-seed", str(seed), "-exp_name", exp_name]


def _flag_argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv += [f"-{name}"] if value else []
        else:
            argv += [f"-{name}", str(value)]
    return argv


# flags that do not change a run's results: a finished run is reused whatever they were
NOT_RESULTS = {"device", "host_memory", "workers", "ckpt_root", "figs_root", "exp_name", "resume", "vis", "ckpt_steps",
               "cache_images", "json", "save_pred", "split", "which"}


def with_defaults(saved: dict) -> dict:
    """A run's saved config with every flag; a flag missing from it was added after the run, which then ran as
    its default does."""
    return {**Config().to_json(), **saved}


def config_differences(saved: dict, requested: Config) -> list[str]:
    """'-flag saved -> requested' for every result-changing flag where a finished run differs from a request."""
    wanted, saved = requested.to_json(), with_defaults(saved)
    return [f"-{name} {saved[name]} -> {wanted[name]}" for name in sorted(wanted)
            if name not in NOT_RESULTS and saved[name] != wanted[name]]


def _reuse_or_clear(run_dir: Path, saved: Optional[dict], requested: Config, overwrite: bool) -> bool:
    """True when a finished (or resumable) run in `run_dir` was made with the requested settings; clears it
    with `overwrite`, refuses a different one otherwise."""
    if saved is None:
        return False
    differences = config_differences(saved, requested)
    if not differences:
        return True
    if not overwrite:
        raise UserError(f"{run_dir} was made with other settings ({'; '.join(differences)}): add -overwrite to "
                        f"redo it, or choose another -exp_name")
    shutil.rmtree(run_dir)
    return False


def val_flag_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Config) if VAL in f.metadata["scripts"]}


def train_flag_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Config) if TRAIN in f.metadata["scripts"]}


def zero_shot_run(given: dict, name: str, ckpt_root: str, overwrite: bool = False) -> Path:
    """Evaluate the base net as it is (val.py without -weights) on the same data, split and prompts as the
    trained rows; its metrics go to <ckpt_root>/<name>_zero_shot/final_metrics.json."""
    run_dir = Path(ckpt_root) / f"{name}_{ZERO_SHOT}"
    argv = _flag_argv({k: v for k, v in given.items() if k in val_flag_names() and k not in ("max_train", "merge")})
    requested = dataclasses.replace(parse_args("val", argv)[0], mod=ZERO_SHOT)
    saved = json.loads((run_dir / FINAL).read_text())["config"] if run_is_finished(run_dir) else None
    if _reuse_or_clear(run_dir, saved, requested, overwrite):
        print(f"[compare] {run_dir.name}: evaluated earlier with the same settings, not evaluated again", flush=True)
        return run_dir
    command = [sys.executable, str(REPO / "val.py"), *argv, "-json", str(run_dir / FINAL)]
    print(f"[compare] {' '.join(command[1:])}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"the zero-shot evaluation {run_dir.name} failed (see its output above)")
    return run_dir


def expand_runs(spec: str) -> list[Path]:
    """-runs: comma-separated run folders or shell patterns (each pattern's matches sorted, zero-shot first)."""
    folders: list[Path] = []
    for item in spec.split(","):
        if not any(char in item for char in "*?["):
            folders.append(Path(item))
            continue
        matches = sorted(Path(path) for path in glob.glob(item) if Path(path).is_dir())
        if not matches:
            raise UserError(f"-runs: {item} matches no folder")
        folders += sorted(matches, key=lambda path: not path.name.endswith(ZERO_SHOT))
    return list(dict.fromkeys(folders))


def run_is_finished(run_dir: Path) -> bool:
    return (run_dir / FINAL).is_file()


def exp_name_of(name: str, variant: Variant, seed: int) -> str:
    return f"{name}_{variant.label().replace(' ', '_')}_seed{seed}"


def train_runs(given: dict, rows: list[Variant], seeds: list[int], name: str, ckpt_root: str,
               overwrite: bool = False) -> list[Path]:
    """Train every variant x seed in its own process; finished runs with the same settings are kept,
    killed ones resumed, and runs made with other settings refused (or redone with `overwrite`)."""
    folders = []
    for variant in rows:
        for seed in seeds:
            exp_name = exp_name_of(name, variant, seed)
            run_dir = Path(ckpt_root) / exp_name
            folders.append(run_dir)
            argv = train_argv(given, variant, seed, exp_name)
            saved = json.loads((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else None
            same = _reuse_or_clear(run_dir, saved, parse_args("train", argv)[0], overwrite)
            if same and run_is_finished(run_dir):
                print(f"[compare] {exp_name}: finished earlier with the same settings, not trained again", flush=True)
                continue
            if same and (run_dir / LAST_STATE).is_file():
                command = [sys.executable, str(REPO / "train.py"), "-resume", str(run_dir)]
            else:
                command = [sys.executable, str(REPO / "train.py"), *argv]
            print(f"[compare] {' '.join(command[1:])}", flush=True)
            if subprocess.run(command).returncode != 0:
                raise UserError(f"training {exp_name} failed (see its output above); rerun compare to resume")
    return folders


def evaluated_on(run_dir: Path, images: int) -> Path:
    """<run_dir>/test_<images>.json: the finished run (or zero-shot base) evaluated by val.py on the first
    `images` images of its evaluation split, made once and then reused."""
    path = run_dir / f"test_{images}.json"
    if path.is_file() and json.loads(path.read_text())["metrics"]["images"] == images:
        print(f"[compare] {run_dir.name}: evaluated on {images} images earlier, not evaluated again", flush=True)
        return path
    if (run_dir / CONFIG).is_file():
        argv = ["-weights", str(run_dir)]
    else:  # zero-shot: the base, with the settings it was evaluated with
        saved = json.loads((run_dir / FINAL).read_text())["config"]
        defaults = Config().to_json()
        keep = val_flag_names() - NOT_RESULTS - {"max_eval", "weights", "mod"}
        argv = _flag_argv({k: v for k, v in saved.items() if k in keep and v != defaults.get(k) and v is not None})
    command = [sys.executable, str(REPO / "val.py"), *argv, "-max_eval", str(images), "-json", str(path)]
    print(f"[compare] {' '.join(command[1:])}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"evaluating {run_dir} on {images} images failed (see its output above)")
    return path


def read_run(run_dir: Path, images: Optional[int] = None) -> dict:
    """Everything the table needs from one finished run folder (or a zero-shot evaluation); with `images`,
    its metrics on that many evaluation images (its own if it finished with that many, else `evaluated_on`)."""
    if not run_is_finished(run_dir):
        raise UserError(f"{run_dir} has no {FINAL}: it is not a finished train.py run")
    final = json.loads((run_dir / FINAL).read_text())
    if images is not None and final["metrics"]["images"] != images:
        record = json.loads(evaluated_on(run_dir, images).read_text())
        final = {**final, "metrics": record["metrics"], "split": record["split"]}
    if not (run_dir / CONFIG).is_file():  # val.py's zero-shot evaluation: nothing trained
        return {"variant": Variant(ZERO_SHOT), "seed": final["config"]["seed"], "config": final["config"],
                "final": final, "history": [], "ckpt_mb": 0.0}
    config = json.loads((run_dir / CONFIG).read_text())
    with open(run_dir / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    return {"variant": variant_of(config), "seed": config["seed"], "config": config, "final": final,
            "history": history, "ckpt_mb": (run_dir / "best.safetensors").stat().st_size / 2 ** 20}


def variant_of(config: dict) -> Variant:
    """The variant a saved run config describes (its decoder setting, rank in effect and training-set size)."""
    options = get_mode(config["mod"]).options
    rank = (config.get("mid_dim") or DEFAULT_RANK) if "mid_dim" in options else config.get("adalora_target_r")
    return Variant(config["mod"], config.get("decoder") if "decoder" in options else None,
                   rank if has_lora_rank(config["mod"]) else None, config.get("max_train"), config["lr"])


def trained_with(setting: dict) -> dict:
    """A run's settings less those that change only its own final test evaluation, which a table redoes on one
    image count for every run: -merge, and -max_eval when no validation chose the weights (-val_freq 0)."""
    evaluation_only = {"merge"} | (set() if setting["val_freq"] else {"max_eval"})
    return {name: value for name, value in setting.items() if name not in evaluation_only}


def set_apart(runs: list[dict]) -> list[dict]:
    """Runs of one variant that differ in a result-changing flag other than the seed (say -adalora_init) are
    different rows, not seeds of one: each gets the flags in which its variant's runs differ, and the options
    of its mode that it set away from their defaults (say -adalora_e_lr_ratio 20), which a run with no peer
    would otherwise hide behind the label of the mode's defaults."""
    flags = sorted(train_flag_names() - NOT_RESULTS - {"seed"})
    defaults = Config().to_json()
    settings = [trained_with(with_defaults(run["config"])) for run in runs]
    apart = []
    for run, setting in zip(runs, settings):
        variant = run["variant"]
        peers = [other for other, alike in zip(settings, runs) if alike["variant"] == variant]
        own = set() if variant.mode == ZERO_SHOT else get_mode(variant.mode).options - set(variant.flags())
        differing = [flag for flag in flags if any(peer.get(flag) != setting.get(flag) for peer in peers)
                     or (flag in own and setting[flag] != defaults[flag])]
        others = tuple((flag, flag_value(setting[flag])) for flag in differing)
        apart.append({**run, "variant": dataclasses.replace(variant, others=others)} if others else run)
    return apart


def flag_value(value) -> str:
    """A flag's value as a user would type it (20, not 20.0)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def labels_without_a_shared_lr(runs: list[dict]) -> list[dict]:
    """The runs, their learning rate left out of the labels when every trained run used the same one."""
    if len({run["variant"].lr for run in runs if run["variant"].mode != ZERO_SHOT}) > 1:
        return runs
    return [{**run, "variant": dataclasses.replace(run["variant"], lr=None)} for run in runs]


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict]) -> list[dict]:
    """One row per variant; metrics as mean (and std over seeds)."""
    rows = []
    for variant in dict.fromkeys(run["variant"] for run in runs):
        group = [run for run in runs if run["variant"] == variant]
        metrics = group[0]["final"]["metrics"]
        row = {"mode": variant.mode, "decoder": variant.decoder, "rank": variant.rank,
               "train_size": variant.train_size, "lr": variant.lr, "others": variant.others,
               "label": variant.label(), "seeds": len(group),
               "split": group[0]["final"]["split"], "images": int(metrics["images"])}
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

    headers = ["run", *class_keys, "trainable", "share %", "ckpt MB", "s/step", "img/s", "peak MB", "wall min"]
    def shown(row, key, spec):
        return "-" if row[key] is None else format(row[key], spec)  # zero-shot: nothing trained

    return markdown_table(headers, ([row["label"], *[metric(row, key) for key in class_keys],
                                     f"{row['trainable_params']:,}", f"{row['trainable_share_pct']:.2f}",
                                     f"{row['ckpt_mb']:.2f}", shown(row, "sec_per_step", ".3f"),
                                     shown(row, "images_per_s", ".2f"), shown(row, "peak_mem_mb", ".0f"),
                                     shown(row, "wall_min", ".1f")] for row in rows))


def table_header(runs: list[dict], rows: list[dict]) -> str:
    """What every row shares: the evaluated split and its size, prompts, resolution, and the data."""
    config, final = runs[0]["config"], runs[0]["final"]
    prompts = f"{config['n_points']} click(s)" if config["prompt"] == "click" else config["prompt"]
    return (f"{final['split']} split, {rows[0]['images']} images, {prompts} per class, metrics at the original "
            f"image resolution; -net {config['net']} at {config['image_size']} px, -dataset {config['dataset']}"
            + (f" {config['data_path']}" if config.get("data_path") else ""))


# what every row of one table must share: the evaluated data, its prompts and the model's input size
TABLE_SETTINGS = ("dataset", "data_path", "prompt", "n_points", "n_neg_points", "image_size")


def check_shared_settings(runs: list[dict]) -> None:
    """Refuse a table whose runs were evaluated on other data, with other prompts or at another size."""
    first = runs[0]
    for run in runs[1:]:
        differing = [key for key in TABLE_SETTINGS if run["config"].get(key) != first["config"].get(key)]
        if differing:
            key = differing[0]
            raise UserError(f"{run['variant'].label()} has -{key} {run['config'].get(key)}, "
                            f"{first['variant'].label()} -{key} {first['config'].get(key)}: every row of a table "
                            f"must be evaluated on the same data and prompts; tabulate them separately")


def write_outputs(runs: list[dict], out_dir: Path) -> str:
    check_shared_settings(runs)
    runs = labels_without_a_shared_lr(set_apart(runs))
    rows = summarise(runs)
    images = [run["final"]["metrics"]["images"] for run in runs]
    mismatched = [f"{run['variant'].label()} (seed {run['seed']})" for run, n in zip(runs, images) if n != images[0]]
    if mismatched:
        raise UserError(f"{mismatched[0]} was evaluated on a different number of images than "
                        f"{runs[0]['variant'].label()}: every run of a table must use the same split (same -max_eval, "
                        f"or tabulate with -runs ... -max_eval N)")
    class_keys = [k for k in rows[0] if k.startswith(("dice_", "iou_")) and not k.endswith("_std")]
    class_keys += ["vcdr_mae"] if "vcdr_mae" in rows[0] else []
    out_dir.mkdir(parents=True, exist_ok=True)
    table = table_header(runs, rows) + "\n\n" + markdown(rows, class_keys)
    (out_dir / "table.md").write_text(table + "\n")
    with open(out_dir / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "others": " ".join(f"-{flag} {value}" for flag, value in row["others"])}
                         for row in rows)
    plot_curves(runs, out_dir / "curves.png")
    plot_tradeoff(rows, out_dir / "tradeoff.png")
    for key, label in (("train_size", "training images"), ("rank", "LoRA rank"), ("lr", "learning rate")):
        if len({row[key] for row in rows if row[key] is not None}) > 1:
            plot_against(rows, key, label, out_dir / f"dice_vs_{key}.png")
    return table


def plot_against(rows: list[dict], key: str, label: str, path: Path) -> None:
    """Mean Dice against a swept setting (training-set size, rank or learning rate), one line per remaining
    setting."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines: dict[str, list[tuple]] = {}
    for row in rows:
        if row["mode"] == ZERO_SHOT:
            ax.axhline(row["dice_mean"], color="grey", linestyle="--", label="zero-shot base")
        elif row[key] is not None:
            rest = Variant(**{field.name: None if field.name == key else row[field.name]
                              for field in dataclasses.fields(Variant)}).label()
            lines.setdefault(rest, []).append((row[key], row["dice_mean"]))
    for name, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=10 if key == "lr" else 2)
    ax.set_xlabel(label + " (log)")
    ax.set_ylabel(f"{rows[0]['split']} mean Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: list[dict], path: Path) -> None:
    """Validation Dice per epoch, one line per variant (mean over its seeds); says so when no run validated."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant in dict.fromkeys(run["variant"] for run in runs):
        by_epoch: dict[int, list[float]] = {}
        for run in (r for r in runs if r["variant"] == variant):
            for row in run["history"]:
                if row.get("val_dice_mean"):
                    by_epoch.setdefault(int(row["epoch"]), []).append(float(row["val_dice_mean"]))
        epochs = sorted(by_epoch)
        if not epochs:  # zero-shot: nothing trained
            continue
        ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", label=variant.label())
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val mean Dice (model resolution)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation during training (-val_freq 0)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_offsets(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Label offsets (points) that cycle through three heights in Dice order, so rows with nearly equal
    Dice, which often sit at nearly equal cost too, do not print their labels on top of each other."""
    ordered = sorted(rows, key=lambda row: row["dice_mean"], reverse=True)
    return {row["label"]: (5, 5 - 11 * (rank % 3)) for rank, row in enumerate(ordered)}


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Dice against trainable parameters and against peak memory. Each trained row is a numbered point, its
    label in a key under the plots: rows of nearly equal Dice and cost would print labels over each other."""
    trained = [row for row in rows if row["mode"] != ZERO_SHOT]
    key_lines = (len(trained) + 2) // 2  # two columns, the zero-shot line included
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.17 * key_lines))
    offsets = label_offsets(trained)
    for ax, key, label in ((axes[0], "trainable_params", "trainable parameters (log)"),
                           (axes[1], "peak_mem_mb", "peak memory (MB)")):
        for row in rows:
            if row["mode"] == ZERO_SHOT:  # no parameters trained, no training memory: a reference line
                ax.axhline(row["dice_mean"], color="grey", linestyle="--", label="zero-shot base")
        for number, row in enumerate(trained, 1):
            ax.scatter(row[key], row["dice_mean"], s=60, label=f"{number}  {row['label']}")
            ax.annotate(str(number), (row[key], row["dice_mean"]), textcoords="offset points",
                        xytext=offsets[row["label"]], fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{rows[0]['split']} mean Dice")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.17 * key_lines / fig.get_figheight() + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
