"""Bad input reaches the user as one line naming the flag or file, with exit status 2 and no traceback.

The scripts' main() runs in-process behind the same run_cli wrapper as on the command line (a
subprocess check of the real command line is in test_cfg.py).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.cli import run_cli


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def run(capsys):
    def invoke(script: str, *args: str) -> Result:
        module = importlib.import_module(script.removesuffix(".py"))
        with pytest.raises(SystemExit) as exited:
            run_cli(lambda: module.main(list(args)))
        return Result(exited.value.code, capsys.readouterr().err)
    return invoke


def assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_pair(folder: Path, name: str, image_size=(40, 30), mask_size=(40, 30)) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", image_size, (120, 80, 60)).save(folder / "images" / f"{name}.png")
    mask = Image.new("L", mask_size, 0)
    mask.paste(255, (5, 5, 20, 20))
    mask.save(folder / "masks" / f"{name}.png")


TRAIN = ("train.py", "-image_size", "64", "-epochs", "1")


def test_missing_data_path(run, tmp_path):
    assert_one_line_error(run(*TRAIN, "-dataset", "folder", "-data_path", str(tmp_path / "nope")),
                          "-data_path", "nope")


def test_dataset_without_data_path_names_both_flags(run):
    """Checked once, where the data are found (datasets), and shown by the CLI in flag terms."""
    line = assert_one_line_error(run(*TRAIN, "-dataset", "isic"), "-dataset isic", "-data_path DIR")
    assert "`" not in line


def test_library_errors_speak_of_arguments_and_the_cli_of_flags(tmp_path, make_options):
    """datasets names what it was given (`data_path`); only the CLI layer turns that into -data_path."""
    from cfg import in_flag_terms
    from common.errors import UserError
    from datasets import build_datasets

    options = make_options(dataset="folder", data_path=tmp_path / "nope")
    with pytest.raises(UserError) as error:
        build_datasets(options)
    assert str(error.value).startswith("`data_path` ") and "-data_path" not in str(error.value)
    assert in_flag_terms(str(error.value)).startswith("-data_path ")
    assert in_flag_terms("`not_a_flag` and `seed`") == "`not_a_flag` and -seed"


def test_empty_folder_names_the_layouts_tried(run, tmp_path):
    assert_one_line_error(run(*TRAIN, "-dataset", "folder", "-data_path", str(tmp_path)), str(tmp_path), "tried")


def test_image_without_mask(run, tmp_path):
    for name in ("a", "b", "c"):
        write_pair(tmp_path, name)
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "lonely.png")
    assert_one_line_error(run(*TRAIN, "-dataset", "folder", "-data_path", str(tmp_path)), "lonely.png")


def test_image_and_mask_sizes_differ(run, tmp_path):
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b", mask_size=(30, 30))
    assert_one_line_error(run(*TRAIN, "-dataset", "folder", "-data_path", str(tmp_path)), "b.png")


def test_unreadable_image(run, tmp_path):
    for name in ("a", "b"):
        write_pair(tmp_path, name)
    (tmp_path / "images" / "b.png").write_bytes(b"not an image")
    assert_one_line_error(run(*TRAIN, "-dataset", "folder", "-data_path", str(tmp_path)), "b.png")


def test_mask_values_fit_no_encoding(run, tmp_path):
    for name in ("a", "b"):
        write_pair(tmp_path, name)
    Image.new("L", (40, 30), 77).save(tmp_path / "masks" / "b.png")
    assert_one_line_error(run(*TRAIN, "-dataset", "folder", "-data_path", str(tmp_path)), "b.png")


def test_sam_ckpt_missing_not_a_checkpoint_or_for_another_net(run, tmp_path):
    assert_one_line_error(run(*TRAIN, "-sam_ckpt", str(tmp_path / "none.pt")), "none.pt", "-sam_ckpt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    assert_one_line_error(run(*TRAIN, "-sam_ckpt", str(junk)), "junk.pt")
    other = tmp_path / "vit_b_tiny.pt"
    from models import build_segmenter
    tiny_sam = build_segmenter("sam", "vit_b", 64, 1, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
    torch.save(tiny_sam.state_dict(), other)
    assert_one_line_error(run(*TRAIN, "-net", "mobile_sam", "-sam_ckpt", str(other)), "vit_b_tiny.pt", "mobile_sam")


def test_weights_folder_without_config(run, tmp_path):
    assert_one_line_error(run("val.py", "-weights", str(tmp_path)), "config.json")


def test_image_size_the_encoder_cannot_take(run):
    assert_one_line_error(run(*TRAIN, "-image_size", "100"), "-image_size 100", "multiple of 16")


def test_existing_run_is_never_overwritten(run, tmp_path):
    run_dir = tmp_path / "ck" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"a previous run")
    result = run(*TRAIN, "-exp_name", "taken", "-ckpt_root", str(tmp_path / "ck"))
    assert_one_line_error(result, "-resume", "-exp_name")
    assert (run_dir / "last.pt").read_bytes() == b"a previous run"


@pytest.mark.parametrize("flags, fragments", [
    (["-lr", "1e-3", "-lrs", "1e-4,2e-3"], ("-lr and -lrs", "drop -lr")),
    (["-lrs", "1e-4,fast"], ("-lrs", "numbers", "fast")),
    (["-ranks", "4,0"], ("-ranks", "positive integers")),
])
def test_compare_sweep_flags_that_make_no_sense(run, tmp_path, flags, fragments):
    result = run("compare.py", "-mods", "sam_lora", "-ckpt_root", str(tmp_path / "ck"), *flags)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "ck").exists()  # refused before anything ran
