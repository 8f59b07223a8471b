"""Fine-tune a SAM-family net with a parameter-efficient mode.

    python train.py -net mobile_sam -mod sam_lora -dataset isic -data_path DATA
    torchrun --nproc_per_node 2 train.py ...      (data parallel)
    python train.py -resume checkpoint/<exp_name>  (continue a killed run)
"""
from common.cli import restart_for_host_memory, run_cli


def main(argv=None) -> None:
    import dataclasses
    import time
    from pathlib import Path

    from cfg import Config, parse_args

    config, given = parse_args("train", argv)  # before the heavy imports: -h and flag errors come at once

    from common.errors import UserError
    from engine import checkpoints
    from engine.runtime import start_runtime, stop_runtime
    from engine.sampler import steps_per_epoch
    from engine.session import build_model, check_base_identity, format_parameter_table, load_data, run_folders, write_run_config
    from engine.evaluation import EvalSettings, evaluate
    from engine.logbook import format_number
    from engine.trainer import Trainer
    from models.merge import merge_adapters
    from models.modes import get_mode

    splits = None
    if config.resume:
        saved = checkpoints.read_run_config(config.resume)
        overrides = {name: getattr(config, name) for name in given if name != "resume"}
        config = dataclasses.replace(Config.from_json(saved), resume=config.resume, **overrides)
        base = saved.get("run", {}).get("base")
        if base:  # the recorded absolute path (works from any folder), and it must still be the same file
            config = dataclasses.replace(config, sam_ckpt=base["path"])
        check_base_identity(base, config)
        splits = checkpoints.load_splits(config.resume)
    if argv is None:  # a script run: once more, with what -host_memory needs from a process's start
        restart_for_host_memory(config.host_memory)
    runtime = start_runtime(config.device, config.host_memory)
    run_dir, figs_dir = (Path(config.resume), Path(config.figs_root) / Path(config.resume).name) if config.resume \
        else run_folders(config)
    if not config.resume and (run_dir / checkpoints.LAST_STATE).exists():
        raise UserError(f"{run_dir} already holds a run; continue it with -resume {run_dir} "
                        f"or choose another -exp_name")
    data = load_data(config, splits, verbose=runtime.is_main)
    total_steps = steps_per_epoch(len(data.train), config.b * runtime.world_size) * config.epochs
    model, adaptation = build_model(config, data.num_classes, total_steps, runtime.device, verbose=runtime.is_main)
    if runtime.is_main:
        print(format_parameter_table(model, config.mod))
        write_run_config(run_dir, config, data, total_steps)
    trainer = Trainer(config, runtime, model, adaptation, data.train, data.val, data.class_names, run_dir, figs_dir,
                      checkpoint_every=config.ckpt_steps)
    if config.resume:
        trainer.resume()
        print(f"resumed {run_dir} at epoch {trainer.state.epoch}, step {trainer.state.step_in_epoch}")
    started = time.time()
    trainer.fit()
    best = run_dir / "best.safetensors"
    checkpoints.load_weights(best, model, get_mode(config.mod).saves_all)
    total_params = sum(p.numel() for p in model.parameters())  # adapters included: counted before any merge
    if config.merge:  # the checkpoints are written: fold the adapters for a faster final evaluation
        merge_adapters(adaptation)
    split, dataset = ("test", data.test) if data.test is not None else ("val", data.val)
    per_image: list = []
    summary = evaluate(model, dataset, EvalSettings.of(config), runtime, data.class_names, split, original=True,
                       per_image=per_image)
    if runtime.is_main:
        weights = "best weights, merged" if config.merge else "best weights"
        print(f"{split} ({weights}, original resolution): " + " ".join(f"{k}={format_number(v)}" for k, v in summary.items()))
        checkpoints.write_json(run_dir / "final_metrics.json", {
            "split": split, "weights": "best", "merged": config.merge, "metrics": summary,
            "wall_seconds": time.time() - started,
            "total_params": total_params, "per_image": per_image})
        print(f"run folder: {run_dir}   figures: {figs_dir}")
    stop_runtime(runtime)


if __name__ == "__main__":
    run_cli(main)
