"""Evaluate a run folder (or the base net zero-shot), write predicted masks, or predict on new images.

    python val.py -weights checkpoint/<exp_name>                         (test split, else val)
    python val.py -net lite_medsam -dataset isic -data_path DATA -prompt box   (the base, zero-shot)
    python val.py -weights checkpoint/<exp_name> -json m.json -save_pred preds/
    python val.py -weights checkpoint/<exp_name> -images DIR -prompt none -save_pred preds/
    python val.py -weights checkpoint/<exp_name> -merge -export merged.pth
    python val.py -weights checkpoint/<exp_name> -images CT/ -prompt box -prompt_from LABELS/ -save_pred preds/
                                                                          (NIfTI volumes in, .nii.gz labels out)
"""
from common.cli import run_cli


def main(argv=None) -> None:
    from pathlib import Path

    from cfg import parse_args

    args, given = parse_args("val", argv)  # before the heavy imports

    from engine import checkpoints
    from engine.runtime import start_runtime
    from engine.validation import (evaluate_split, export_and_check_onnx, load_target, prediction_set,
                                   resolve_target, write_predictions)

    target = resolve_target(args, given)
    config = target.config
    images = prediction_set(target) if config.images else None
    runtime = start_runtime(config.device, config.host_memory)
    model = load_target(target, runtime.device)
    if images:
        dataset, volumes = images
    else:
        dataset, record = evaluate_split(model, target, runtime)
        volumes = "volumes" in record
        if config.json:
            checkpoints.write_json(Path(config.json), record)
            print(f"metrics written to {config.json}")
    if config.onnx:
        export_and_check_onnx(model, dataset, config)
    if config.save_pred:
        write_predictions(model, dataset, target, runtime, volumes)


if __name__ == "__main__":
    run_cli(main)
