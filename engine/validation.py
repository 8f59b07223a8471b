"""val.py's work as library calls: decide what is evaluated (a run folder, or the base net zero-shot),
build it with its weights, merge and export it, evaluate a split, and write predictions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import Dataset

from cfg import ZERO_SHOT, Config, val_flags
from common.errors import UserError
from common.packages import data_module
from models.merge import merge_adapters
from models.modes import get_mode
from models.segmenter import PromptableSegmenter

from . import checkpoints
from .evaluation import EvalSettings, evaluate
from .runtime import Runtime
from .session import build_model, check_base_identity, load_data

if TYPE_CHECKING:
    from datasets import DataBundle

NEEDS_A_RUN = ("merge", "export", "onnx")


@dataclass
class Target:
    """What val.py evaluates: the effective config, the run folder's saved config (None: the base net
    zero-shot), its run facts (classes, steps, base identity) and its recorded data splits."""

    config: Config
    saved: Optional[dict]
    run: dict
    splits: Optional[dict] = None
    data: Optional[DataBundle] = None  # when resolving needed it already

    @property
    def source(self) -> str:
        return f"{self.config.which} weights of {self.config.weights}" if self.saved else f"{self.config.net} zero-shot"


def resolve_target(args: Config, given: set[str]) -> Target:
    """A run folder's config with the flags val.py may change applied, or the base net as it is."""
    if args.weights is None:
        for name in NEEDS_A_RUN:
            if name in given:
                raise UserError(f"-{name} needs a trained run: add -weights checkpoint/<exp_name>")
        config = dataclasses.replace(args, mod=ZERO_SHOT)
        data = None if config.images else load_data(config)
        run = {"num_classes": data.num_classes if data else 1,
               "class_names": data.class_names if data else ["foreground"], "total_steps": 0}
        return Target(config, None, run, data=data)
    may_change, val_only = val_flags()
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
    return Target(config, saved, run, checkpoints.load_splits(args.weights) if same_data else None)


def load_target(target: Target, device: torch.device) -> PromptableSegmenter:
    """The net with the run's weights; merged and exported as -merge / -export ask."""
    config = target.config
    model, adaptation = build_model(config, target.run["num_classes"], target.run["total_steps"], device)
    saves_all = target.saved is not None and get_mode(config.mod).saves_all
    if target.saved is not None:
        weights = Path(config.weights) / f"{config.which}.safetensors"
        checkpoints.load_weights(weights, model, saves_all)
        print(f"loaded {weights}")
    if config.merge:
        try:
            merged = merge_adapters(adaptation)
        except ValueError as error:
            raise UserError(f"-merge: {error}") from None
        print("adapters merged into the base weights" if merged else
              f"-merge: nothing to merge, -mod {config.mod} has no adapters (its weights already are base tensors)")
    if config.export:
        if not config.merge and not saves_all:
            raise UserError(f"-export writes an official-format checkpoint: add -merge (-mod {config.mod} "
                            f"keeps adapters apart from the base weights)")
        from models.export import metadata_path, write_export
        metadata = write_export(Path(config.export), model, config.net, config.encoder, config.image_size,
                                target.run["class_names"])
        print(f"wrote {config.export} (official {config.net} format at {metadata['exported_image_size']} px, "
              f"loadable with -sam_ckpt and the official builder) and {metadata_path(Path(config.export))}: "
              f"{metadata['note']}")
    return model


def prediction_set(target: Target) -> tuple[Dataset, bool]:
    """-images: the folder to predict on, and whether it holds NIfTI volumes."""
    config = target.config
    if not config.save_pred:
        raise UserError("-images predicts without masks: add -save_pred DIR to write the predictions")
    volumes = volume_folder(config, target.run)
    if volumes is not None:
        return volumes, True
    build_image_folder = data_module().build_image_folder
    return build_image_folder(config.images, config.image_size, target.run["num_classes"], config.boxes), False


def evaluate_split(model: PromptableSegmenter, target: Target, runtime: Runtime) -> tuple[Dataset, dict]:
    """Evaluate the test split (else val) at the original resolution and print the metrics; returns the
    dataset and what -json records. Volumes give per-volume 3D Dice/IoU, and -save_pred
    writes their predicted label volumes during the evaluation."""
    config, class_names = target.config, target.run["class_names"]
    data = target.data or load_data(config, target.splits)
    if data.num_classes != target.run["num_classes"]:
        raise UserError(f"-dataset {config.dataset} has {data.num_classes} classes but the run in {config.weights} "
                        f"predicts {target.run['num_classes']}: evaluate it on data with the same classes")
    dataset = data.test if config.split == "test" and data.test is not None else data.val
    split = "test" if dataset is data.test else "val"
    weights = Path(config.weights) / f"{config.which}.safetensors" if target.saved else "the base net, zero-shot"
    record: dict = {"split": split, "weights": str(weights)}
    if getattr(dataset, "is_volumes", False):
        from engine.volumes import evaluate_volumes, format_volume_table
        summary, rows = evaluate_volumes(model, dataset, EvalSettings.of(config), runtime, class_names, split,
                                         config.save_pred)
        print(f"{split} split, {len(rows)} volumes, 3D Dice/IoU per volume, {target.source}:\n"
              f"{format_volume_table(rows, summary)}")
        record["volumes"] = rows
    else:
        record["per_image"] = []
        summary = evaluate(model, dataset, EvalSettings.of(config), runtime, class_names, split, original=True,
                           per_image=record["per_image"])
        print(f"{split} split, {int(summary['images'])} images at their original resolution, {config.prompt} "
              f"prompts, {target.source}:")
        for key, value in summary.items():
            if key != "images":
                print(f"  {key:<16}{value:.4f}")
    record.update(metrics=summary, config=config.to_json(), total_params=sum(p.numel() for p in model.parameters()))
    return dataset, record


def write_predictions(model: PromptableSegmenter, dataset: Dataset, target: Target, runtime: Runtime,
                      volumes: bool) -> None:
    """-save_pred: masks (or label volumes) for an evaluated split or for -images."""
    config, out = target.config, Path(target.config.save_pred)
    if volumes:
        if config.images:
            from engine.volumes import predict_volumes
            written = predict_volumes(model, dataset, config, runtime.device, out)
        else:
            written = dataset.volumes  # written during the evaluation
        print(f"{len(written)} predicted label volumes (.nii.gz) written to {out}")
    elif config.images:  # through the Python API: the CLI and Predictor cannot drift
        from engine.predict import predict_folder
        from engine.predictor import Predictor
        predictor = Predictor(model, config.image_size, runtime.device, target.run["class_names"], config.amp)
        print(f"{predict_folder(predictor, dataset, out)} predictions written to {out}")
    else:
        from engine.predict import save_predictions
        count = save_predictions(model, dataset, config, runtime.device, out, target.run["class_names"])
        print(f"{count} predictions written to {out}")


def volume_folder(config: Config, run: dict) -> Optional[Dataset]:
    """-images DIR holding NIfTI volumes -> their slice dataset (prompts from -prompt_from); else None."""
    nifti = data_module("nifti")
    folder = Path(config.images)
    if not folder.is_dir() or not nifti.list_volumes(folder):
        if config.prompt_from:
            raise UserError(f"-prompt_from needs -images to be a folder of NIfTI volumes; {folder} holds none")
        return None
    if config.boxes:
        raise UserError("-boxes gives 2D boxes per image file: for NIfTI volumes give -prompt_from DIR of label volumes")
    labels = run.get("labels") or list(range(1, run["num_classes"] + 1))
    return nifti.build_prediction_volumes(folder, Path(config.prompt_from) if config.prompt_from else None,
                                          config.slice_axis, labels, run["class_names"], image_size=config.image_size,
                                          prompt=config.prompt, n_points=config.n_points,
                                          n_neg_points=config.n_neg_points, seed=config.seed,
                                          window=nifti.parse_window(config.window))


def export_and_check_onnx(model: PromptableSegmenter, dataset: Dataset, config: Config) -> None:
    """Export the merged net to ONNX and compare onnxruntime with PyTorch on two samples."""
    from torch.utils.data import default_collate

    from models.onnx_export import check_onnx, export_onnx

    model.eval()
    paths = export_onnx(model, Path(config.onnx), config.prompt, num_points=config.n_points + config.n_neg_points)
    batch = default_collate([dataset[i] for i in range(min(2, len(dataset)))])
    inputs = {"images": batch["image"], **{k: batch[k] for k in ("points", "point_labels", "boxes") if k in batch}}
    differences = check_onnx(model.cpu(), paths, inputs)
    print(f"wrote {paths['image_encoder']} and {paths['mask_decoder']}; max |onnxruntime - torch|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))
