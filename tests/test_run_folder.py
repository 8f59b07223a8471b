"""A run folder keeps its promises when used later: it names its base weights file (absolute path and
sha256) so that val.py and -resume work from any folder and refuse a changed base; val.py -merge only
says it merged when something merged. One tiny MobileSAM run (64 px, decoder only) serves every test."""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common.cli import run_cli


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys, monkeypatch):
    def invoke(script: str, *args: str, cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        module = importlib.import_module(script.removesuffix(".py"))
        code = 0
        try:
            run_cli(lambda: module.main(list(args)))
        except SystemExit as exited:
            code = exited.code
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return invoke


def base_file(path: Path, seed: int) -> Path:
    from models import build_segmenter
    from models.merge import official_state

    torch.manual_seed(seed)
    model = build_segmenter("mobile_sam", "tiny_vit", 64, 1)
    torch.save(official_state(model, "mobile_sam", "tiny_vit"), path)
    return path


def error_line(result: Result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.fixture
def trained(tmp_path, run):
    """A run trained in folder `a` from a base file given by a RELATIVE -sam_ckpt."""
    here, elsewhere = tmp_path / "a", tmp_path / "b"
    here.mkdir()
    elsewhere.mkdir()
    base_file(here / "base.pt", seed=0)
    roots = ["-ckpt_root", str(tmp_path / "ck"), "-figs_root", str(tmp_path / "figs")]
    result = run("train.py", "-net", "mobile_sam", "-mod", "sam_decoder", "-sam_ckpt", "base.pt", "-image_size", "64",
                 "-synthetic_size", "4", "-epochs", "1", "-b", "2", "-vis", "0", "-exp_name", "r", *roots, cwd=here)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(run_dir=tmp_path / "ck" / "r", base=here / "base.pt", elsewhere=elsewhere, roots=roots)


def test_base_file_is_identified_by_absolute_path_and_sha256(trained, run):
    run_dir, base, elsewhere, roots = trained["run_dir"], trained["base"], trained["elsewhere"], trained["roots"]
    recorded = json.loads((run_dir / "config.json").read_text())["run"]["base"]
    assert recorded["path"] == str(base.resolve()) and len(recorded["sha256"]) == 64

    # from another working directory, the relative -sam_ckpt of the run still finds its file
    assert run("val.py", "-weights", str(run_dir), "-max_eval", "1", cwd=elsewhere).returncode == 0
    resumed = run("train.py", "-resume", str(run_dir), *roots, cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # the same file name now holds another net's weights of the same shapes: refused, saying what changed
    base_file(base, seed=1)
    line = error_line(run("val.py", "-weights", str(run_dir), "-max_eval", "1", cwd=elsewhere))
    assert "sha256" in line and str(base.resolve()) in line, line
    line = error_line(run("train.py", "-resume", str(run_dir), *roots, cwd=elsewhere))
    assert "sha256" in line and str(base.resolve()) in line, line


def test_merge_says_merged_only_when_something_merges(trained, run):
    result = run("val.py", "-weights", str(trained["run_dir"]), "-merge", "-max_eval", "1", cwd=trained["elsewhere"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapters merged" not in result.stdout
    assert "nothing to merge" in result.stdout


@pytest.mark.parametrize("mode", ["sam_full", "sam_decoder", "sam_lora"])
def test_merge_adapters_reports_whether_anything_merged(mode):
    from models import build_segmenter
    from models.merge import merge_adapters
    from models.modes import apply_mode, get_mode

    torch.manual_seed(0)
    model = build_segmenter("sam", "vit_b", 64, 1, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
    adaptation = apply_mode(model, mode, 10, **({"mid_dim": 2, "lora_alpha": None, "lora_dropout": 0.0,
                                                 "lora_conv": False, "decoder": "full"} if mode == "sam_lora" else {}))
    assert merge_adapters(adaptation) is bool(get_mode(mode).adapter_prefix)
