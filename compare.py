"""Train every adaptation mode with identical settings and compare them in one table and two figures.

    python compare.py -net mobile_sam -dataset isic -data_path DATA -mods sam_adpt,sam_lora,sam_adalora \
        -epochs 3 -exp_name isic_modes
    python compare.py -net lite_medsam -dataset isic -data_path DATA -mods sam_lora,sam_adalora -decoders full,lora \
        -ranks 1,4,16 -train_sizes 16,64,256 -exp_name sweep            (decoder, rank and data-size sweeps)
    python compare.py -net lite_medsam -dataset isic -data_path DATA -mods sam_lora,sam_full -lrs 1e-4,5e-4,2e-3 \
        -exp_name lrs                                                   (a learning rate per mode)
    python compare.py -runs checkpoint/a,'checkpoint/sweep_*' -exp_name mine   (tabulate finished runs)
    python compare.py -runs 'checkpoint/sweep_*' -max_eval 600 -exp_name mine_600
                        (finished runs re-evaluated on the first 600 test images; kept as <run>/test_600.json)

Writes figs/compare_<exp_name>/{table.md,table.csv,curves.png,tradeoff.png}; the first row is always the
base net evaluated zero-shot on the same split and prompts; finished modes are not trained again, killed
ones resume.
"""
from common.cli import run_cli


def main(argv=None) -> None:
    from pathlib import Path

    from cfg import parse_args, parse_modes, parse_positive

    config, given = parse_args("compare", argv)  # before the heavy imports

    from common.errors import UserError
    from engine.compare import expand_runs, read_run, train_runs, variants, write_outputs, zero_shot_run

    name = config.exp_name or f"{config.net}_{config.dataset}"
    if config.runs:
        folders = expand_runs(config.runs)
    else:
        modes = parse_modes(config.mods)
        seeds = [int(seed) for seed in config.seeds.split(",")]
        decoders = config.decoders.split(",") if config.decoders else [None]
        unknown = [d for d in decoders if d not in (None, "full", "lora", "frozen")]
        if unknown:
            raise UserError(f"-decoders: unknown setting {unknown[0]}; choose from full, lora, frozen")
        ranks, sizes = parse_positive(config.ranks, "ranks"), parse_positive(config.train_sizes, "train_sizes")
        lrs = parse_positive(config.lrs, "lrs", float)
        if config.lrs and "lr" in given:
            raise UserError("-lr and -lrs both given: -lrs runs every mode at each of its learning rates; drop -lr")
        sweeps = ("mods", "seeds", "runs", "exp_name", "mod", "seed", "decoders", "ranks", "train_sizes", "lrs",
                  "overwrite")
        passed = {key: getattr(config, key) for key in given if key not in sweeps}
        rows = variants(modes, decoders, ranks, sizes, lrs)
        folders = [zero_shot_run(passed, name, config.ckpt_root, config.overwrite)] + \
            train_runs(passed, rows, seeds, name, config.ckpt_root, config.overwrite)
    images = config.max_eval if config.runs and "max_eval" in given else None  # -runs: re-evaluate
    table = write_outputs([read_run(folder, images) for folder in folders], Path(config.figs_root) / f"compare_{name}")
    print(table)
    print(f"wrote {Path(config.figs_root) / f'compare_{name}'}/table.md, table.csv, curves.png, tradeoff.png")


if __name__ == "__main__":
    run_cli(main)
