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
    import dataclasses
    from pathlib import Path

    from cfg import ZERO_SHOT, Config, parse_args, val_flags

    args, given = parse_args("val", argv)  # before the heavy imports

    import torch

    from common.errors import UserError
    from common.packages import data_module
    build_image_folder = data_module().build_image_folder
    from engine import checkpoints
    from engine.predict import save_predictions
    from engine.runtime import start_runtime
    from engine.evaluation import EvalSettings, evaluate
    from engine.session import build_model, check_base_identity, load_data
    from models.merge import merge_adapters
    from models.modes import get_mode

    if args.weights is None:  # the base net as it is
        for name in ("merge", "export", "onnx"):
            if name in given:
                raise UserError(f"-{name} needs a trained run: add -weights checkpoint/<exp_name>")
        config = dataclasses.replace(args, mod=ZERO_SHOT)
        saved, splits = None, None
        data = None if config.images else load_data(config)
        run = {"num_classes": data.num_classes if data else 1,
               "class_names": data.class_names if data else ["foreground"], "total_steps": 0}
        weights = "the base net, zero-shot"
    else:
        may_change, val_only = val_flags()  # run flags val.py may change; val.py's own flags
        fixed = sorted(set(given) - set(may_change) - set(val_only))
        if fixed:
            raise UserError(f"-{fixed[0]} is fixed by the run's config.json and cannot change in val.py; drop it")
        saved = checkpoints.read_run_config(args.weights)
        run = saved.get("run", {})
        changes = {name: getattr(args, name) for name in val_only + tuple(n for n in may_change if n in given)}
        config = dataclasses.replace(Config.from_json(saved), **changes)
        if run.get("base") and "sam_ckpt" not in given:  # the recorded absolute path: works from any folder
            config = dataclasses.replace(config, sam_ckpt=run["base"]["path"])
        check_base_identity(run.get("base"), config)
        same_data = (config.dataset, config.data_path) == (saved["dataset"], saved["data_path"])
        splits = checkpoints.load_splits(args.weights) if same_data else None
        data = None
    runtime = start_runtime(config.device)
    model, adaptation = build_model(config, run["num_classes"], run["total_steps"], runtime.device)
    spec = None if saved is None else get_mode(config.mod)
    if spec is not None:
        weights = Path(args.weights) / f"{config.which}.safetensors"
        checkpoints.load_weights(weights, model, spec.saves_all)
        print(f"loaded {weights}")
    if config.merge:
        try:
            merged = merge_adapters(adaptation)
        except ValueError as error:
            raise UserError(f"-merge: {error}") from None
        print("adapters merged into the base weights" if merged else
              f"-merge: nothing to merge, -mod {config.mod} has no adapters (its weights already are base tensors)")
    if config.export:
        if not config.merge and not spec.saves_all:
            raise UserError(f"-export writes an official-format checkpoint: add -merge (-mod {config.mod} "
                            f"keeps adapters apart from the base weights)")
        from models.export import metadata_path, write_export
        metadata = write_export(Path(config.export), model, config.net, config.encoder, config.image_size,
                                run["class_names"])
        print(f"wrote {config.export} (official {config.net} format at {metadata['exported_image_size']} px, "
              f"loadable with -sam_ckpt and the official builder) and {metadata_path(Path(config.export))}: "
              f"{metadata['note']}")

    class_names = run["class_names"]
    volumes = False
    if config.images:
        if not config.save_pred:
            raise UserError("-images predicts without masks: add -save_pred DIR to write the predictions")
        dataset = volume_folder(config, run)
        volumes = dataset is not None
        if not volumes:
            dataset = build_image_folder(config.images, config.image_size, run["num_classes"], config.boxes)
    else:
        data = data or load_data(config, splits)
        if data.num_classes != run["num_classes"]:
            raise UserError(f"-dataset {config.dataset} has {data.num_classes} classes but the run in {args.weights} "
                            f"predicts {run['num_classes']}: evaluate it on data with the same classes")
        dataset = data.test if config.split == "test" and data.test is not None else data.val
        split = "test" if dataset is data.test else "val"
        volumes = getattr(dataset, "is_volumes", False)
        source = f"{config.which} weights of {args.weights}" if saved is not None else f"{config.net} zero-shot"
        if volumes:  # per-volume 3D Dice/IoU; -save_pred writes the predicted label volumes
            from engine.volumes import evaluate_volumes, format_volume_table
            summary, rows = evaluate_volumes(model, dataset, EvalSettings.of(config), runtime, class_names, split,
                                           config.save_pred)
            print(f"{split} split, {len(rows)} volumes, 3D Dice/IoU per volume, {source}:\n"
                  f"{format_volume_table(rows, summary)}")
        else:
            summary = evaluate(model, dataset, EvalSettings.of(config), runtime, class_names, split, original=True)
            print(f"{split} split, {int(summary['images'])} images at their original resolution, {config.prompt} "
                  f"prompts, {source}:")
            for key, value in summary.items():
                if key != "images":
                    print(f"  {key:<16}{value:.4f}")
        if config.json:
            extra = {"volumes": rows} if volumes else {}
            checkpoints.write_json(Path(config.json), {
                "split": split, "weights": str(weights), "metrics": summary, "config": config.to_json(),
                "total_params": sum(p.numel() for p in model.parameters()), **extra})
            print(f"metrics written to {config.json}")
    if config.onnx:
        export_and_check_onnx(model, dataset, config)
    if config.save_pred and volumes:
        if config.images:
            from engine.volumes import predict_volumes
            written = predict_volumes(model, dataset, config, runtime.device, Path(config.save_pred))
        else:
            written = dataset.volumes  # written during the evaluation
        print(f"{len(written)} predicted label volumes (.nii.gz) written to {config.save_pred}")
    elif config.save_pred and config.images:  # through the Python API: the CLI and Predictor cannot drift
        from engine.predict import predict_folder
        from engine.predictor import Predictor
        predictor = Predictor(model, config.image_size, runtime.device, class_names, config.amp)
        count = predict_folder(predictor, dataset, Path(config.save_pred))
        print(f"{count} predictions written to {config.save_pred}")
    elif config.save_pred:
        count = save_predictions(model, dataset, config, runtime.device, Path(config.save_pred), class_names)
        print(f"{count} predictions written to {config.save_pred}")


def volume_folder(config, run: dict):
    """-images DIR holding NIfTI volumes -> their slice dataset (prompts from -prompt_from); else None."""
    from pathlib import Path

    from common.errors import UserError
    from common.packages import data_module
    nifti = data_module("nifti")
    build_prediction_volumes, list_volumes, parse_window = (nifti.build_prediction_volumes, nifti.list_volumes,
                                                            nifti.parse_window)

    folder = Path(config.images)
    if not folder.is_dir() or not list_volumes(folder):
        if config.prompt_from:
            raise UserError(f"-prompt_from needs -images to be a folder of NIfTI volumes; {folder} holds none")
        return None
    if config.boxes:
        raise UserError("-boxes gives 2D boxes per image file: for NIfTI volumes give -prompt_from DIR of label volumes")
    labels = run.get("labels") or list(range(1, run["num_classes"] + 1))
    return build_prediction_volumes(folder, Path(config.prompt_from) if config.prompt_from else None,
                                    config.slice_axis, labels, run["class_names"], image_size=config.image_size,
                                    prompt=config.prompt, n_points=config.n_points, n_neg_points=config.n_neg_points,
                                    seed=config.seed, window=parse_window(config.window))


def export_and_check_onnx(model, dataset, config) -> None:
    """Export the merged net to ONNX and compare onnxruntime with PyTorch on two samples."""
    from pathlib import Path

    from torch.utils.data import default_collate

    from models.onnx_export import check_onnx, export_onnx

    model.eval()
    paths = export_onnx(model, Path(config.onnx), config.prompt, num_points=config.n_points + config.n_neg_points)
    batch = default_collate([dataset[i] for i in range(min(2, len(dataset)))])
    inputs = {"images": batch["image"], **{k: batch[k] for k in ("points", "point_labels", "boxes") if k in batch}}
    differences = check_onnx(model.cpu(), paths, inputs)
    print(f"wrote {paths['image_encoder']} and {paths['mask_decoder']}; max |onnxruntime - torch|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))


if __name__ == "__main__":
    run_cli(main)
