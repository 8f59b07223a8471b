"""Train every adaptation mode with identical settings and compare them in one table and two figures.

    python compare.py -net mobile_sam -dataset isic -data_path DATA -mods sam_adpt,sam_lora,sam_adalora \
        -epochs 3 -exp_name isic_modes
    python compare.py -runs checkpoint/a,checkpoint/b -exp_name mine     (tabulate finished runs)

Writes figs/compare_<exp_name>/{table.md,table.csv,curves.png,tradeoff.png}; the first row is always the
base net evaluated zero-shot on the same split and prompts; finished modes are not trained again, killed
ones resume.
"""
from common.cli import run_cli


def main(argv=None) -> None:
    from pathlib import Path

    from cfg import parse_args, parse_modes

    config, given = parse_args("compare", argv)  # before the heavy imports

    from engine.compare import read_run, train_runs, write_outputs, zero_shot_run

    name = config.exp_name or f"{config.net}_{config.dataset}"
    if config.runs:
        folders = [Path(folder) for folder in config.runs.split(",")]
    else:
        modes = parse_modes(config.mods)
        seeds = [int(seed) for seed in config.seeds.split(",")]
        passed = {key: getattr(config, key) for key in given
                  if key not in ("mods", "seeds", "runs", "exp_name", "mod", "seed")}
        folders = [zero_shot_run(passed, name, config.ckpt_root)] + train_runs(passed, modes, seeds, name,
                                                                                config.ckpt_root)
    table = write_outputs([read_run(folder) for folder in folders], Path(config.figs_root) / f"compare_{name}")
    print(table)
    print(f"wrote {Path(config.figs_root) / f'compare_{name}'}/table.md, table.csv, curves.png, tradeoff.png")


if __name__ == "__main__":
    run_cli(main)
