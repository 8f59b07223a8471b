"""Command-line flags -> one typed Config. Nothing else in the toolkit reads argv.

Flags are single-dash and follow Medical-SAM-Adapter's names where it has one. Each field of
`Config` declares its flag help and the scripts that accept it; the parsers are generated from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from common.errors import UserError
from engine.host_memory import POLICIES as HOST_MEMORY_POLICIES
from models.modes.registry import get_mode, mode_names, mode_options

TRAIN, VAL, COMPARE, BENCH = "train", "val", "compare", "benchmark"
ALL = (TRAIN, VAL, COMPARE, BENCH)
RUN = (TRAIN, COMPARE)

MODES = tuple(mode_names())
ZERO_SHOT = "zero_shot"  # the base as it is: what val.py evaluates without -weights, compare's first row


def flag(default, help: str, scripts: Sequence[str] = RUN, choices: Optional[Sequence] = None,
         val_may_change: bool = False, group: Optional[str] = None):
    """A Config field: its flag help, the scripts that accept it, and (for flags of the run that val.py
    also takes) whether val.py may change it; any other run flag is fixed by the run's config.json.
    `group`: its section of -h (one of HELP_GROUPS; None: looked up in FLAG_GROUPS by name)."""
    return field(default=default, metadata=dict(help=help, scripts=tuple(scripts), choices=choices,
                                                val_may_change=val_may_change, group=group))


# -h sections, in order, and the section of each flag that does not name its own
HELP_GROUPS = ("model", "adaptation", "data", "training", "output", "evaluation and export", "compare and benchmark")
FLAG_GROUPS = {
    "model": "net encoder image_size out_size sam_ckpt",
    "adaptation": "mod mid_dim lora_alpha lora_dropout lora_conv decoder adalora_init_r adalora_target_r "
                  "adalora_tinit adalora_tfinal adalora_delta_t adalora_orth_reg adalora_init adalora_e_lr_ratio",
    "data": "dataset data_path prompt n_points n_neg_points aug val_frac roi_crop rater_policy synthetic_size "
            "synthetic_classes slice_axis window labels cache_images max_train max_eval",
    "training": "b lr weight_decay epochs sched seed amp grad_ckpt recompute_mlp compile cache_embeddings device host_memory "
                "workers val_freq resume ckpt_steps",
    "output": "vis exp_name ckpt_root figs_root",
    "evaluation and export": "weights which split json save_pred images boxes prompt_from merge export onnx",
    "compare and benchmark": "mods seeds runs decoders ranks train_sizes lrs overwrite nets amp_options grad_ckpt_options "
                             "host_memory_options no_plain steps warmup rounds out",
}
FLAG_GROUP = {name: group for group, names in FLAG_GROUPS.items() for name in names.split()}
EXAMPLES = {
    "train": ["python train.py -dataset isic -data_path DATA -mod sam_lora -epochs 20",
              "python train.py -net sam -sam_ckpt sam_vit_b_01ec64.pth -image_size 256 -mod sam_adpt -dataset refuge "
              "-data_path REFUGE",
              "python train.py -net mobile_sam -mod sam_lora -dataset synthetic -image_size 128 -epochs 4"],
    "val": ["python val.py -weights checkpoint/<exp_name> -json metrics.json",
            "python val.py -net lite_medsam -dataset isic -data_path DATA -prompt box   (zero-shot)",
            "python val.py -weights checkpoint/<exp_name> -images DIR -boxes boxes.csv -save_pred preds/",
            "python val.py -weights checkpoint/<exp_name> -merge -export merged.pth"],
    "compare": ["python compare.py -dataset isic -data_path DATA -epochs 10 -seeds 0,1,2"],
    "benchmark": ["python benchmark.py -nets mobile_sam:tiny_vit,sam:vit_b -steps 5"],
}


@dataclass
class Config:
    """Everything a run needs; saved as config.json in the run folder."""

    # model
    net: str = flag("lite_medsam", "net family: lite_medsam (pretrained weights packaged) | sam | mobile_sam | "
                    "efficient_sam", ALL)
    encoder: str = flag("default", "image encoder: sam vit_b|vit_l|vit_h; lite_medsam and mobile_sam tiny_vit; "
                        "efficient_sam vit_t|vit_s; default = the net's default", ALL)
    mod: str = flag("sam_lora", "adaptation mode", RUN, choices=MODES)
    mid_dim: Optional[int] = flag(None, "LoRA/DoRA rank (default 4) or Adapter bottleneck (default dim/4)")
    lora_alpha: Optional[float] = flag(None, "LoRA/DoRA/AdaLoRA scaling alpha (default = rank)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch")
    lora_conv: bool = flag(False, "LoRA also on the convolutions the net declares (MobileSAM's stem; LoRA modes)")
    decoder: str = flag("full", "PEFT modes: the mask decoder trains fully, through LoRA on its transformer's "
                        "attention and MLP linears (rank -mid_dim, AdaLoRA: -adalora_target_r, Adapter: 4), or not "
                        "at all", choices=("full", "lora", "frozen"))
    adalora_init_r: int = flag(12, "AdaLoRA initial rank per adapted linear")
    adalora_target_r: int = flag(4, "AdaLoRA average target rank per adapted linear")
    adalora_tinit: float = flag(0.1, "AdaLoRA warm-up without pruning, as a fraction of all steps")
    adalora_tfinal: float = flag(0.2, "AdaLoRA final fine-tuning with fixed ranks, as a fraction of all steps")
    adalora_delta_t: int = flag(1, "AdaLoRA: prune every this many steps during the budget schedule")
    adalora_orth_reg: float = flag(0.5, "AdaLoRA orthogonal-regulariser weight added to the loss")
    adalora_init: str = flag("gaussian", "AdaLoRA's singular vectors P, Q at the start: peft's N(0, 0.02) entries, or "
                             "orthonormal (what the orthogonal regulariser pulls them to); the singular values start "
                             "at zero either way", choices=("gaussian", "orthogonal"))
    adalora_e_lr_ratio: float = flag(1.0, "AdaLoRA: learning rate of the singular values (lora_E) as a multiple of "
                                     "-lr (1: peft's one rate for all)")
    image_size: int = flag(256, "model input size S (images are resized longest-side and padded to S x S)", ALL)
    out_size: Optional[int] = flag(None, "resolution of loss and metrics (default = image_size)", ALL, val_may_change=True)
    sam_ckpt: Optional[str] = flag(None, "official base weights file; without it lite_medsam loads its packaged "
                                   "weights and other nets start random; 'random' forces random weights", ALL,
                                   val_may_change=True)
    # data
    dataset: str = flag("synthetic", "synthetic | folder | isic | refuge | nifti", ALL, val_may_change=True)
    data_path: Optional[str] = flag(None, "dataset root folder (not needed for synthetic)", ALL, val_may_change=True)
    prompt: str = flag("click", "prompt derived from the mask", ALL, choices=("click", "box", "none"), val_may_change=True)
    n_points: int = flag(1, "positive clicks per class", ALL, val_may_change=True)
    n_neg_points: int = flag(0, "negative clicks per class", ALL, val_may_change=True)
    aug: str = flag("light", "training augmentation", RUN, choices=("none", "light", "strong"))
    val_frac: float = flag(0.2, "held-out validation fraction when the layout has no validation split", RUN)
    roi_crop: bool = flag(False, "refuge: train, validate and test on a crop around the ground-truth optic disc", RUN)
    rater_policy: str = flag("majority", "refuge multi-rater masks: majority | mean | rater number 1..7", ALL, val_may_change=True)
    synthetic_size: int = flag(64, "synthetic: number of training images (val/test get a quarter each)", ALL)
    synthetic_classes: int = flag(1, "synthetic: 1 (lesion) or 2 (nested disc+cup-like classes)", ALL)
    slice_axis: int = flag(2, "nifti: slice axis after reorientation to RAS: 0 sagittal, 1 coronal, 2 axial", RUN)
    window: Optional[str] = flag(None, "nifti: intensity window L,W (CT, e.g. 40,400); default: per-volume "
                                 "0.5-99.5 percentile clip", RUN)
    labels: Optional[str] = flag(None, "nifti: label values to segment, in class order (e.g. 1,2); default: every "
                                 "non-zero value (at most 3)", RUN)
    cache_images: bool = flag(False, "keep decoded, resized images in memory after their first use "
                              "(one copy per loader worker)", ALL)
    max_train: Optional[int] = flag(None, "use only the first N training samples (quick runs)", RUN)
    max_eval: Optional[int] = flag(None, "use only the first N validation/test samples (quick runs)", ALL, val_may_change=True)
    # optimisation
    b: int = flag(2, "batch size (per process)", ALL, val_may_change=True)
    lr: float = flag(1e-4, "learning rate (AdamW)")
    weight_decay: float = flag(1e-4, "AdamW weight decay")
    epochs: int = flag(10, "training epochs")
    sched: str = flag("cosine", "learning-rate schedule, stepped every iteration", choices=("cosine", "step", "none"))
    seed: int = flag(0, "random seed", ALL)
    amp: str = flag("auto", "autocast: auto (bf16 where the hardware runs it natively: CUDA with bf16, CPUs with "
                    "AVX512-BF16 or AMX; fp16 with a scaler on older CUDA; else fp32), none (fp32), bf16, or fp16 "
                    "with a gradient scaler (CUDA)", ALL, choices=("auto", "none", "bf16", "fp16"), val_may_change=True)
    grad_ckpt: bool = flag(False, "activation checkpointing of the image-encoder blocks")
    recompute_mlp: bool = flag(False, "TinyViT encoders: rerun each MLP's fc1 in backward instead of keeping its "
                               "4*dim output (less memory than the default, more time; -grad_ckpt saves more)")
    compile: bool = flag(False, "torch.compile the net for the training step (the first step compiles: minutes on "
                         "a CPU; benchmark.py reports the gain and compile_s)", (TRAIN, COMPARE, BENCH))
    cache_embeddings: bool = flag(False, "sam_decoder with -aug none: compute image embeddings once")
    # runtime and outputs
    device: str = flag("auto", "auto picks cuda when available", ALL, choices=("auto", "cpu", "cuda"), val_may_change=True)
    host_memory: str = flag("reuse", "CPU memory for tensors: reuse (glibc malloc keeps freed memory instead of "
                            "mapping every large tensor afresh: faster steps; its per-thread cache off, so freed "
                            "tensors merge and the peak stays down: train.py restarts itself once to set that) or system "
                            "(the C library's defaults)", ALL, choices=HOST_MEMORY_POLICIES, val_may_change=True)
    workers: int = flag(0, "data-loading worker processes", ALL, val_may_change=True)
    val_freq: int = flag(1, "validate every N epochs and keep the best weights; 0: never validate, the final "
                              "weights are tested")
    vis: int = flag(1, "write sample overlays every N epochs (0: never)")
    exp_name: Optional[str] = flag(None, "run name: checkpoint/<exp_name>, figs/<exp_name> (default: derived)")
    ckpt_root: str = flag("checkpoint", "folder of run folders", ALL, val_may_change=True)
    figs_root: str = flag("figs", "folder of figure folders", ALL, val_may_change=True)
    resume: Optional[str] = flag(None, "continue the run in this folder from its last.pt", (TRAIN,))
    ckpt_steps: int = flag(0, "also write last.pt every N training steps inside an epoch (0: at epoch ends)")
    # val.py
    weights: Optional[str] = flag(None, "run folder to evaluate (holds config.json); without it val.py evaluates "
                                  "the base net zero-shot (-net, -encoder, -image_size, -sam_ckpt)", (VAL,))
    which: str = flag("best", "which weights of the run folder", (VAL,), choices=("best", "last"))
    split: str = flag("test", "split to evaluate", (VAL,), choices=("val", "test"))
    json: Optional[str] = flag(None, "write metrics as JSON to this file", (VAL,))
    save_pred: Optional[str] = flag(None, "write predicted masks (PNG, original size) and overlays here", (VAL,))
    images: Optional[str] = flag(None, "predict on a folder of images without masks", (VAL,))
    boxes: Optional[str] = flag(None, "CSV of boxes (image,x0,y0,x1,y1) in original pixels for -images", (VAL,))
    prompt_from: Optional[str] = flag(None, "-images of NIfTI volumes: folder of label volumes (same names) giving "
                                      "the per-slice box/click prompts", (VAL,))
    merge: bool = flag(False, "fold LoRA/DoRA/AdaLoRA weights into the base linears before evaluating (train.py: "
                       "before its final test evaluation, 6x faster for DoRA; the checkpoint stays adapter-only)",
                       (TRAIN, VAL, COMPARE), val_may_change=True)
    export: Optional[str] = flag(None, "with -merge: write the merged net in its official checkpoint format", (VAL,))
    onnx: Optional[str] = flag(None, "with -merge: export image encoder and mask decoder to ONNX in this folder, "
                               "checked against onnxruntime", (VAL,))
    # compare.py
    mods: str = flag(",".join(m for m in MODES if get_mode(m).compared_by_default), "comma-separated modes",
                     (COMPARE, BENCH))
    seeds: str = flag("0", "comma-separated seeds", (COMPARE,))
    runs: Optional[str] = flag(None, "comma-separated finished run folders (or quoted shell patterns) to "
                               "tabulate instead of training", (COMPARE,))
    decoders: Optional[str] = flag(None, "comma-separated -decoder settings to run each PEFT mode with "
                                   "(e.g. full,lora; default: -decoder)", (COMPARE, BENCH))
    ranks: Optional[str] = flag(None, "comma-separated LoRA ranks to run the LoRA-family modes at (e.g. 1,2,4,8,16; "
                                "AdaLoRA: the target rank, starting at 3x)", (COMPARE,))
    train_sizes: Optional[str] = flag(None, "comma-separated training-set sizes: each run trains on the first N "
                                      "training images (e.g. 16,64,256; same test split for all)", (COMPARE,))
    lrs: Optional[str] = flag(None, "comma-separated learning rates to run every mode at (e.g. 1e-4,5e-4,2e-3; "
                              "in place of -lr), so each mode can be compared at its best one", (COMPARE,))
    overwrite: bool = flag(False, "redo finished runs whose saved settings differ from the requested ones "
                           "(without it compare refuses them)", (COMPARE,))

    # benchmark.py
    nets: str = flag("mobile_sam:tiny_vit,sam:vit_b,efficient_sam:vit_t,efficient_sam:vit_s",
                     "comma-separated net:encoder pairs", (BENCH,))
    amp_options: str = flag("none", "comma-separated -amp values to measure (auto records what it chose)", (BENCH,))
    grad_ckpt_options: str = flag("0", "comma-separated 0/1/mlp: without activation checkpointing, with it "
                                  "(-grad_ckpt), or only the TinyViT MLP recompute (-recompute_mlp)", (BENCH,))
    host_memory_options: str = flag("reuse", "comma-separated -host_memory values to measure the toolkit's rows "
                                    "with (the plain row always runs with the C library's defaults)", (BENCH,))
    no_plain: bool = flag(False, "skip the reference row (a plain PyTorch full fine-tuning step per net and -amp, "
                          "measured first) and the *_vs_plain ratios", (BENCH,))
    steps: int = flag(3, "timed training steps per row", (BENCH,))
    warmup: int = flag(1, "untimed training steps per row (one is always run)", (BENCH,))
    rounds: int = flag(1, "measure every row this many times, the rows taking turns (each in a fresh process); "
                       "a row reports its median round's timings, the fastest and slowest round's "
                       "seconds per step and its highest peak (for machines whose speed drifts)", (BENCH,))
    out: str = flag("figs/benchmark", "output prefix: writes <out>.csv and <out>.md", (BENCH,))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _parser(script: str) -> argparse.ArgumentParser:
    examples = "\n".join(f"  {line}" for line in EXAMPLES.get(script, ()))
    parser = argparse.ArgumentParser(prog=f"{script}.py", argument_default=argparse.SUPPRESS,
                                     description=f"{script}: SAM-family adaptation toolkit",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"examples:\n{examples}" if examples else None)
    sections = {name: parser.add_argument_group(f"{name} flags") for name in HELP_GROUPS}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if script not in meta["scripts"]:
            continue
        section = sections.get(meta.get("group") or FLAG_GROUP.get(f.name), parser)
        default = f.default
        help_text = f"{meta['help']} (default: {default})"
        if f.type == "bool":
            section.add_argument(f"-{f.name}", action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float}.get(f.type.replace("Optional[", "").rstrip("]"), str)
        section.add_argument(f"-{f.name}", type=kind, choices=meta["choices"], help=help_text,
                            metavar=None if meta["choices"] else f.name.upper())
    return parser


LIBRARY_NAME = re.compile(r"`(\w+)`")


def in_flag_terms(message: str) -> str:
    """Library errors (datasets/, engine/) name the arguments they were given in backticks, in library terms
    (`data_path`); the scripts show the flag that sets each one (-data_path). Other backticked words stay."""
    flags = {f.name for f in dataclasses.fields(Config)}
    return LIBRARY_NAME.sub(lambda m: f"-{m[1]}" if m[1] in flags else m[0], message)


def parse_args(script: str, argv: Optional[Sequence[str]] = None) -> tuple[Config, set[str]]:
    """Parse argv for one script -> (Config, names of the flags the user gave)."""
    given = vars(_parser(script).parse_args(argv))
    config = Config(**given)
    validate(config, set(given), script)
    return config, set(given)


def validate(config: Config, given: set[str], script: str) -> None:
    """Reject values and flag combinations that make no sense, with one line naming the flag."""
    positive = ("image_size", "b", "epochs", "n_points", "synthetic_size", "adalora_init_r",
                "adalora_target_r", "adalora_delta_t", "adalora_e_lr_ratio")
    for name in positive:
        if getattr(config, name) <= 0:
            raise UserError(f"-{name} must be positive, got {getattr(config, name)}")
    for name in ("n_neg_points", "val_freq", "workers", "vis", "ckpt_steps", "weight_decay", "adalora_tinit",
                 "adalora_tfinal", "lora_dropout", "adalora_orth_reg"):
        if getattr(config, name) < 0:
            raise UserError(f"-{name} must not be negative, got {getattr(config, name)}")
    if config.lora_dropout >= 1:
        raise UserError(f"-lora_dropout must be below 1, got {config.lora_dropout}")
    bad_amp = [v for v in config.amp_options.split(",") if v not in ("auto", "none", "bf16", "fp16")]
    if script == BENCH and bad_amp:
        raise UserError(f"-amp_options takes auto, none, bf16 or fp16, got {','.join(bad_amp)}")
    bad_host = [v for v in config.host_memory_options.split(",") if v not in HOST_MEMORY_POLICIES]
    if script == BENCH and bad_host:
        raise UserError(f"-host_memory_options takes reuse or system, got {','.join(bad_host)}")
    if script == BENCH and (config.steps <= 0 or config.warmup < 0 or config.rounds <= 0):
        raise UserError("-steps and -rounds must be positive and -warmup not negative")
    for name in ("mid_dim", "out_size", "max_train", "max_eval"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UserError(f"-{name} must be positive, got {value}")
    if config.lr <= 0:
        raise UserError(f"-lr must be positive, got {config.lr}")
    if not 0 < config.val_frac < 1:
        raise UserError(f"-val_frac must be between 0 and 1, got {config.val_frac}")
    if config.synthetic_classes not in (1, 2):
        raise UserError(f"-synthetic_classes must be 1 or 2, got {config.synthetic_classes}")
    # -data_path itself is checked where the data are found (datasets.build_datasets, before any model is
    # built): val.py may take it from the run's config.json, and one check cannot drift from the other
    if config.rater_policy not in ("majority", "mean") and not (config.rater_policy.isdigit()
                                                                 and 1 <= int(config.rater_policy) <= 7):
        raise UserError(f"-rater_policy must be majority, mean or a rater number 1..7, got {config.rater_policy}")
    _check_mode_flags(config, given)
    if script == TRAIN and config.merge and not get_mode(config.mod).mergeable:
        raise UserError(f"-merge: -mod {config.mod}'s adapters cannot be folded into the base weights (a nonlinearity "
                        f"sits between their projections); drop -merge")
    if config.cache_embeddings and (get_mode(config.mod).trains_encoder or config.aug != "none"):
        frozen = [m for m in MODES if not get_mode(m).trains_encoder]
        raise UserError(f"-cache_embeddings needs -mod {' or '.join(frozen)} and -aug none (the encoder must be "
                        f"frozen and the images unchanged between epochs)")
    for recompute in ("grad_ckpt", "recompute_mlp"):
        if getattr(config, recompute) and not get_mode(config.mod).trains_encoder:
            raise UserError(f"-{recompute} has nothing to save with -mod {config.mod} (the encoder runs without "
                            f"gradients)")
    if config.recompute_mlp:
        _check_recompute_mlp(config)
    if config.lora_conv:
        _check_net_declares_convs(config)
    resume_may_change = {"resume", "device", "host_memory", "workers", "ckpt_root", "figs_root"}
    if "resume" in given and script == TRAIN and set(given) - resume_may_change:
        extra = sorted(set(given) - resume_may_change)
        raise UserError(f"-resume takes the run's own config.json; drop -{' -'.join(extra)}")
    if script == VAL and config.onnx and not config.merge:
        raise UserError("-onnx exports the merged net: add -merge")
    if config.boxes is not None and config.images is None:
        raise UserError("-boxes goes with -images DIR")
    if config.prompt_from is not None and config.images is None:
        raise UserError("-prompt_from goes with -images DIR (a folder of NIfTI volumes)")
    if config.prompt_from is not None and config.boxes is not None:
        raise UserError("-prompt_from and -boxes both give prompts: keep one")
    if config.images is not None and config.prompt == "click" and config.prompt_from is None:
        raise UserError("-images has no masks to derive clicks from: use -prompt none, -prompt box with -boxes, "
                        "or (volumes) -prompt_from DIR of label volumes")
    if config.images is not None and config.prompt == "box" and config.boxes is None and config.prompt_from is None:
        raise UserError("-images with -prompt box needs -boxes FILE.csv (or -prompt_from DIR for NIfTI volumes)")
    if config.slice_axis not in (0, 1, 2):
        raise UserError(f"-slice_axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {config.slice_axis}")
    nifti_only = sorted(n for n in ("slice_axis", "window", "labels") if n in given)
    if nifti_only and script in RUN and config.dataset != "nifti":
        raise UserError(f"-{nifti_only[0]} only applies to -dataset nifti, not -dataset {config.dataset}")


def _check_mode_flags(config: Config, given: set[str]) -> None:
    """A mode-specific flag is accepted only by the modes that declare it (models/modes/registry.py)."""
    spec = get_mode(config.mod)
    refused = sorted((given & mode_options()) - spec.options)
    if refused:
        takers = [m for m in MODES if refused[0] in get_mode(m).options]
        raise UserError(f"-{' -'.join(refused)} does not apply to -mod {config.mod}; "
                        f"-{refused[0]} goes with -mod {', '.join(takers)}")
    if {"adalora_init_r", "adalora_target_r"} <= spec.options and config.adalora_target_r > config.adalora_init_r:
        raise UserError("-adalora_target_r must not exceed -adalora_init_r")
    if {"adalora_tinit", "adalora_tfinal"} <= spec.options and config.adalora_tinit + config.adalora_tfinal >= 1:
        raise UserError("-adalora_tinit + -adalora_tfinal must be below 1 (no steps left to prune)")


def _check_net_declares_convs(config: Config) -> None:
    """-lora_conv needs convolutions declared by the net (its AdaptTargets); this imports the nets (torch),
    which only happens when the flag is given."""
    from models.registry import net_entry

    targets = net_entry(config.net, config.encoder).adapt_targets
    if targets is None or not targets.convs:
        raise UserError(f"-lora_conv needs convolutions to adapt: -net {config.net} declares none "
                        f"(nets that do: {', '.join(_nets_with_convs())})")


def _check_recompute_mlp(config: Config) -> None:
    from models.registry import resolve_encoder

    if config.grad_ckpt:
        raise UserError("-recompute_mlp and -grad_ckpt: -grad_ckpt already recomputes whole blocks; keep one")
    if resolve_encoder(config.net, config.encoder) != "tiny_vit":
        raise UserError(f"-recompute_mlp needs a TinyViT encoder (-net lite_medsam or mobile_sam), not -net "
                        f"{config.net}; use -grad_ckpt to save memory with it")


def _nets_with_convs() -> list[str]:
    from models.registry import encoder_names, net_entry, net_names

    entries = [net_entry(net, encoder) for net in net_names() for encoder in encoder_names(net)]
    return sorted({entry.net for entry in entries if entry.adapt_targets and entry.adapt_targets.convs})


def parse_positive(text: Optional[str], flag_name: str, kind: type = int) -> list:
    """A comma-separated list of positive `kind`s (int or float); [None] when the flag is absent."""
    if text is None:
        return [None]
    noun = "integers" if kind is int else "numbers"
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"-{flag_name} takes comma-separated {noun}, got {text}") from None
    if any(not value > 0 for value in values):
        raise UserError(f"-{flag_name} takes positive {noun}, got {text}")
    return values


def parse_modes(text: str, flag_name: str = "mods") -> list[str]:
    """A comma-separated list of -mod values; an unknown one is a UserError naming the flag."""
    modes = text.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"-{flag_name}: unknown mode {unknown[0]}; choose from {', '.join(MODES)}")
    return modes


def val_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(flags of the run that val.py may change, flags that only val.py has)."""
    fields = [f for f in dataclasses.fields(Config) if VAL in f.metadata["scripts"]]
    return (tuple(f.name for f in fields if f.metadata["val_may_change"]),
            tuple(f.name for f in fields if f.metadata["scripts"] == (VAL,)))


def experiment_name(config: Config) -> str:
    """A readable default run name: net_encoder_mod_dataset_sSIZE_seedN."""
    return f"{config.net}_{config.encoder}_{config.mod}_{config.dataset}_s{config.image_size}_seed{config.seed}"

