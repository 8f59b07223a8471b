"""Flags -> Config: defaults, help, validation of nonsense combinations, config.json round trip."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cfg import Config, parse_args, validate
from common.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def flags_of(script: str) -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if script in f.metadata["scripts"]]


def help_text(script: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(script, ["-h"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- defaults and help


def test_defaults_parse():
    config, given = parse_args("train", [])
    assert config == Config() and given == set()
    assert config.mod == "sam_lora" and config.net == "lite_medsam" and config.image_size == 256
    config, given = parse_args("val", ["-weights", "checkpoint/run"])
    assert config == Config(weights="checkpoint/run") and given == {"weights"}


def test_flags_are_typed():
    config, given = parse_args("train", ["-lr", "0.01", "-b", "3", "-mid_dim", "8", "-lora_conv",
                                         "-sched", "step", "-lora_alpha", "16"])
    assert (config.lr, config.b, config.mid_dim, config.lora_conv, config.sched, config.lora_alpha) == \
        (0.01, 3, 8, True, "step", 16.0)
    assert isinstance(config.b, int) and isinstance(config.lr, float) and isinstance(config.lora_alpha, float)
    assert given == {"lr", "b", "mid_dim", "lora_conv", "sched", "lora_alpha"}


@pytest.mark.parametrize("script", ["train", "val"])
def test_help_lists_every_flag_of_the_script(script, capsys):
    out = help_text(script, capsys)
    names = flags_of(script)
    assert len(names) > 20
    for name in names:
        assert re.search(rf"(?<![\w-])-{name}\b", out), f"-{name} missing from {script} -h"
    assert f"usage: {script}.py" in out


def test_help_shows_only_the_script_flags(capsys):
    train_help = help_text("train", capsys)
    val_help = help_text("val", capsys)
    for flag in ("-lora_alpha", "-adalora_init_r", "-epochs", "-resume", "-sched"):
        assert flag in train_help and flag not in val_help
    for flag in ("-weights", "-save_pred", "-which"):
        assert flag in val_help and flag not in train_help
    assert "-merge" in val_help and "-merge" in train_help  # train.py: its final test evaluation
    for flag in ("-net", "-image_size", "-dataset", "-prompt", "-seed"):
        assert flag in train_help and flag in val_help


# ----------------------------------------------------------------------------- argparse errors


@pytest.mark.parametrize("script,argv", [
    ("train", ["-no_such_flag", "1"]),
    ("train", ["-mod", "sam_magic"]),
    ("train", ["-sched", "linear"]),
    ("train", ["-b", "two"]),
    ("train", ["-weights", "checkpoint/run"]),  # a val.py flag
    ("val", ["-weights", "w", "-lr", "0.1"]),  # a train.py flag
    ("val", ["-weights", "w", "-which", "middle"]),
])
def test_argparse_rejects_unknown_flags_and_bad_choices(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(script, argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validate()


REJECTED = [
    # non-positive sizes and counts
    ("train", ["-image_size", "0"], "-image_size"),
    ("train", ["-b", "0"], "-b "),
    ("train", ["-b", "-2"], "-b "),
    ("train", ["-epochs", "0"], "-epochs"),
    ("train", ["-val_freq", "-1"], "-val_freq"),
    ("train", ["-n_points", "0"], "-n_points"),
    ("train", ["-synthetic_size", "0"], "-synthetic_size"),
    ("train", ["-mod", "sam_adalora", "-adalora_init_r", "0"], "-adalora_init_r"),
    ("train", ["-mod", "sam_adalora", "-adalora_target_r", "0"], "-adalora_target_r"),
    ("train", ["-mod", "sam_adalora", "-adalora_delta_t", "0"], "-adalora_delta_t"),
    ("train", ["-mid_dim", "0"], "-mid_dim"),
    ("train", ["-out_size", "-64"], "-out_size"),
    ("train", ["-max_train", "0"], "-max_train"),
    ("val", ["-weights", "w", "-max_eval", "0"], "-max_eval"),
    ("train", ["-lr", "0"], "-lr"),
    ("train", ["-lr", "-0.1"], "-lr"),
    ("train", ["-val_frac", "0"], "-val_frac"),
    ("train", ["-val_frac", "1"], "-val_frac"),
    ("train", ["-synthetic_classes", "3"], "-synthetic_classes"),
    # data
    ("train", ["-rater_policy", "best"], "-rater_policy"),
    ("train", ["-rater_policy", "0"], "-rater_policy"),
    ("train", ["-rater_policy", "8"], "-rater_policy"),
    # LoRA-only flags outside LoRA modes
    ("train", ["-mod", "sam_adpt", "-lora_alpha", "2"], "-lora_alpha"),
    ("train", ["-mod", "sam_full", "-lora_dropout", "0.1"], "-lora_dropout"),
    ("train", ["-mod", "sam_decoder", "-lora_conv"], "-lora_conv"),
    # -mid_dim without meaning
    ("train", ["-mod", "sam_full", "-mid_dim", "8"], "-mid_dim"),
    ("train", ["-mod", "sam_decoder", "-mid_dim", "8"], "-mid_dim"),
    # AdaLoRA
    ("train", ["-mod", "sam_lora", "-adalora_tinit", "0.2"], "-adalora_tinit"),
    ("train", ["-adalora_orth_reg", "0.1"], "-adalora_orth_reg"),
    ("train", ["-mod", "sam_adalora", "-adalora_init_r", "4", "-adalora_target_r", "8"], "-adalora_target_r"),
    ("train", ["-mod", "sam_adalora", "-adalora_tinit", "0.5", "-adalora_tfinal", "0.5"], "-adalora_tinit"),
    ("train", ["-mod", "sam_adalora", "-adalora_tinit", "0.7", "-adalora_tfinal", "0.4"], "-adalora_tfinal"),
    ("train", ["-mod", "sam_adalora", "-adalora_e_lr_ratio", "0"], "-adalora_e_lr_ratio"),
    ("train", ["-mod", "sam_lora", "-adalora_e_lr_ratio", "4"], "-adalora_e_lr_ratio"),
    # embeddings cache, activation checkpointing, conv LoRA
    ("train", ["-cache_embeddings", "-aug", "none"], "-cache_embeddings"),
    ("train", ["-cache_embeddings", "-mod", "sam_decoder"], "-cache_embeddings"),  # -aug light
    ("train", ["-grad_ckpt", "-mod", "sam_decoder"], "-grad_ckpt"),
    ("train", ["-recompute_mlp", "-mod", "sam_decoder"], "-recompute_mlp"),
    ("train", ["-recompute_mlp", "-grad_ckpt"], "-grad_ckpt"),
    ("train", ["-recompute_mlp", "-net", "sam"], "-recompute_mlp"),
    ("train", ["-lora_conv", "-net", "sam"], "-lora_conv"),
    ("train", ["-lora_conv", "-net", "efficient_sam", "-mod", "sam_dora"], "-lora_conv"),
    ("train", ["-mod", "sam_adpt", "-merge"], "-merge"),  # Adapters do not fold into the base linears
    # resume takes the run's own config
    ("train", ["-resume", "checkpoint/run", "-lr", "0.1"], "-lr"),
    ("train", ["-resume", "checkpoint/run", "-epochs", "20", "-device", "cpu"], "-epochs"),
    # benchmark.py
    ("benchmark", ["-rounds", "0"], "-rounds"),
    ("benchmark", ["-steps", "0"], "-steps"),
    # val.py
    ("val", ["-weights", "w", "-boxes", "b.csv"], "-boxes"),
    ("val", ["-weights", "w", "-images", "imgs"], "-images"),  # default -prompt click
    ("val", ["-weights", "w", "-images", "imgs", "-prompt", "click"], "-prompt"),
    ("val", ["-weights", "w", "-images", "imgs", "-prompt", "box"], "-boxes"),
]


@pytest.mark.parametrize("script,argv,names", REJECTED, ids=[" ".join([s] + a) for s, a, _ in REJECTED])
def test_validate_rejects_nonsense_naming_the_flag(script, argv, names):
    with pytest.raises(UserError) as error:
        parse_args(script, argv)
    message = str(error.value)
    assert names in message + " ", message
    assert "\n" not in message


ACCEPTED = [
    ("train", ["-mod", "sam_lora", "-lora_alpha", "8", "-lora_dropout", "0.1", "-lora_conv", "-mid_dim", "8"]),
    ("train", ["-mod", "sam_dora", "-lora_alpha", "8"]),
    ("train", ["-mod", "sam_adpt", "-mid_dim", "16"]),
    ("train", ["-mod", "sam_adalora", "-adalora_init_r", "8", "-adalora_target_r", "8",
               "-adalora_tinit", "0.3", "-adalora_tfinal", "0.6", "-adalora_e_lr_ratio", "4"]),
    ("train", ["-mod", "sam_decoder", "-aug", "none", "-cache_embeddings"]),
    ("train", ["-mod", "sam_full", "-grad_ckpt"]),
    ("train", ["-mod", "sam_dora", "-merge"]),
    ("train", ["-mod", "sam_lora", "-recompute_mlp", "-net", "mobile_sam"]),
    ("train", ["-rater_policy", "7"]),
    ("train", ["-rater_policy", "mean"]),
    ("train", ["-dataset", "isic", "-data_path", "data/isic"]),
    ("train", ["-resume", "checkpoint/run", "-device", "cpu", "-workers", "2", "-host_memory", "system"]),
    ("val", ["-weights", "w", "-dataset", "isic"]),  # the dataset comes from the run folder
    ("val", ["-weights", "w", "-images", "imgs", "-prompt", "none"]),
    ("val", ["-weights", "w", "-images", "imgs", "-prompt", "box", "-boxes", "b.csv"]),
]


@pytest.mark.parametrize("script,argv", ACCEPTED, ids=[" ".join([s] + a) for s, a in ACCEPTED])
def test_validate_accepts_sensible_combinations(script, argv):
    config, given = parse_args(script, argv)
    assert given == {a[1:] for a in argv if a.startswith("-") and a[1:] in {f.name for f in
                                                                            dataclasses.fields(Config)}}


def test_validate_direct_call():
    validate(Config(), set(), "train")
    with pytest.raises(UserError, match="-lora_alpha"):
        validate(Config(mod="sam_full", lora_alpha=2.0), {"mod", "lora_alpha"}, "train")
    # a value that is only a default (not given) is not blamed on the user
    validate(Config(mod="sam_full"), {"mod"}, "train")


# ----------------------------------------------------------------------------- config.json


def test_config_json_round_trip_ignores_unknown_keys():
    config = Config(mod="sam_adalora", lr=3e-4, mid_dim=8, lora_conv=True, exp_name="x", adalora_tinit=0.25)
    data = json.loads(json.dumps(config.to_json()))
    assert data["mod"] == "sam_adalora" and data["lr"] == 3e-4 and data["json"] is None
    assert Config.from_json(data) == config
    data["flag_from_a_future_version"] = 1
    assert Config.from_json(data) == config
    # keys missing from an older config.json take today's defaults
    assert Config.from_json({"mod": "sam_full"}) == Config(mod="sam_full")


# ----------------------------------------------------------------------------- the script


def test_train_script_reports_a_flag_error_on_one_line():
    result = subprocess.run([sys.executable, "train.py", "-mod", "sam_adpt", "-lora_alpha", "2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "-lora_alpha" in lines[0]


def test_every_flag_has_a_help_section_and_help_ends_with_examples(capsys):
    import dataclasses

    from cfg import FLAG_GROUP, HELP_GROUPS, _parser

    for f in dataclasses.fields(Config):
        assert (f.metadata.get("group") or FLAG_GROUP.get(f.name)) in HELP_GROUPS, f.name
    text = _parser("train").format_help()
    assert text.index("model flags:") < text.index("adaptation flags:") < text.index("training flags:")
    assert text.rstrip().splitlines()[-1].strip().startswith("python train.py")
