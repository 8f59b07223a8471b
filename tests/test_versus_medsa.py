"""scripts/versus_medsa.py: the rounds' summary, its errors, and a Med-SA-shaped checkout driven end to end."""
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import UserError
from engine.versus_medsa import Row, check_checkout, summarise, versus_table

REPO = Path(__file__).resolve().parents[1]


def _measurement(row, toolkit, seconds, peak, added):
    return {"row": row, "toolkit": toolkit, "sec_per_step": seconds, "peak_mb": peak, "added_mb": added}


def test_summary_takes_each_toolkits_median_round_highest_memory_and_ratios():
    row = "efficient_sam:vit_t:sam_lora:1"
    rounds = {"medsa": ((0.15, 920, 150), (0.17, 930, 160), (0.16, 925, 155)),
              "ours": ((0.11, 840, 100), (0.10, 850, 120), (0.15, 845, 110))}
    measurements = [_measurement(row, toolkit, *values) for toolkit, found in rounds.items() for values in found]
    (line,) = summarise(measurements)
    assert line["rounds"] == 3
    assert (line["medsa_s"], line["medsa_s_min"], line["medsa_s_max"]) == (0.16, 0.15, 0.17)
    assert (line["ours_s"], line["ours_s_min"], line["ours_s_max"]) == (0.11, 0.10, 0.15)
    assert (line["medsa_peak_mb"], line["ours_peak_mb"]) == (930, 850)
    assert (line["medsa_added_mb"], line["ours_added_mb"]) == (160, 120)
    assert line["speed"] == pytest.approx(0.16 / 0.11)
    assert line["peak_ratio"] == pytest.approx(850 / 930) and line["added_ratio"] == pytest.approx(0.75)
    table_row = "| efficient_sam:vit_t:sam_lora:1 | 0.160 (0.150-0.170) | 0.110 (0.100-0.150) | 1.45x |"
    assert table_row in versus_table([line])


def test_summary_refuses_a_row_measured_by_one_toolkit_only():
    with pytest.raises(ValueError, match="both toolkits"):
        summarise([_measurement("sam:vit_b:sam_lora:2", "ours", 1.0, 2000, 300)])


@pytest.mark.parametrize("spec", ["mobile_sam:tiny_vit:sam_lora", "unet:x:sam_lora:1", "sam:vit_b:sam_lora:two"])
def test_a_bad_row_names_the_flag_and_the_form(spec):
    with pytest.raises(UserError, match="-rows: .*net:encoder:mod:batch"):
        Row.parse(spec)


def test_a_folder_that_is_not_a_medsa_checkout_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"-medsa: {tmp_path} is not a Medical-SAM-Adapter checkout"):
        check_checkout(tmp_path)


def test_timed_step_reports_the_memory_the_steps_add():
    # a fresh process: in this one, memory freed by earlier tests may be refilled without the RSS growing
    code = ("import json, torch; from engine.versus_medsa import timed_step; kept = []; "
            "print(json.dumps(timed_step(lambda: kept.append(torch.ones(25 * 2**20)), steps=3, warmup=1)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])  # four steps of 100 MB each
    assert measured["sec_per_step"] > 0
    assert 350 <= measured["added_mb"] <= measured["peak_mb"]


# A stand-in with Med-SA's layout and calling conventions (cfg.parse_args reading argv, a namespace models/
# folder, sam_model_registry[encoder](args, checkpoint), loralib): a two-layer encoder, the step's calls recorded
FAKE_FILES = {
    "cfg.py": """
        import argparse
        def parse_args():
            parser = argparse.ArgumentParser()
            for flag in ("-net", "-encoder", "-mod"):
                parser.add_argument(flag, type=str)
            for flag in ("-image_size", "-out_size", "-b"):
                parser.add_argument(flag, type=int)
            return parser.parse_args()
        """,
    "models/sam/__init__.py": "from .build_sam import sam_model_registry\n",
    "models/MobileSAMv2/mobilesamv2/__init__.py": """
        from models.sam.build_sam import build
        sam_model_registry = {"tiny_vit": build}
        """,
    "models/common/loralib.py": """
        def mark_only_lora_as_trainable(module):
            for name, parameter in module.named_parameters():
                parameter.requires_grad = "lora_" in name
        """,
    "models/sam/build_sam.py": """
        import json, os
        import torch
        from torch import nn
        RECORD = os.path.join(os.path.dirname(__file__), "record.json")

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 16, stride=16)
                self.Adapter = nn.Conv2d(8, 8, 1)
            def forward(self, x):
                features = self.conv(x)
                return features + self.Adapter(features)

        class Prompts(nn.Module):
            def forward(self, points, boxes, masks):
                coords, labels = points
                sparse = torch.cat([coords, labels[..., None].float()], -1).repeat(1, 1, 3)[..., :8]
                return sparse, torch.zeros(coords.shape[0], 8, 16, 16)
            def get_dense_pe(self):
                return torch.zeros(1, 8, 16, 16)

        class Decoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Conv2d(8, 1, 1)
            def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                        multimask_output):
                record = json.load(open(RECORD))
                encoder = NET.image_encoder.named_parameters()
                record["trainable_encoder"] = sorted(n for n, p in encoder if p.requires_grad)
                record["prompt_shape"] = list(sparse_prompt_embeddings.shape)
                record["decoder_calls"] = record.get("decoder_calls", 0) + 1
                json.dump(record, open(RECORD, "w"))
                return self.head(image_embeddings + dense_prompt_embeddings + image_pe), None

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.image_encoder, self.prompt_encoder, self.mask_decoder = Encoder(), Prompts(), Decoder()

        def build(args, checkpoint=None):
            global NET
            json.dump({"mod": args.mod, "b": args.b, "image_size": args.image_size,
                       "checkpoint": checkpoint and torch.load(checkpoint)}, open(RECORD, "w"))
            NET = Net()
            return NET

        sam_model_registry = {"vit_b": build}
        """,
}


@pytest.fixture
def fake_checkout(tmp_path):
    for name, text in FAKE_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def _versus(checkout, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "versus_medsa.py"), "-medsa", str(checkout), *flags],
                          capture_output=True, text=True, cwd=REPO)


def _child(checkout, toolkit: str, row: str, steps: int) -> dict:
    """One child measurement (-warmup 1) as the script's parent reads it."""
    done = _versus(checkout, "-steps", str(steps), "-warmup", "1", "-child", toolkit, row)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert (measured["row"], measured["toolkit"]) == (row, toolkit)
    assert measured["sec_per_step"] > 0 and 0 < measured["peak_mb"]
    return measured


def test_the_medsa_step_runs_a_checkout_with_its_own_arguments_freezing_and_prompts(fake_checkout):
    _child(fake_checkout, "medsa", "sam:vit_b:sam_adpt:2", steps=2)
    record = json.loads((fake_checkout / "models" / "sam" / "record.json").read_text())
    # its cfg saw the row, its SAM builder an empty state dict (random weights), and each step froze all
    # but the Adapter and gave every image one click
    assert (record["mod"], record["b"], record["image_size"], record["checkpoint"]) == ("sam_adpt", 2, 256, {})
    assert record["trainable_encoder"] == ["Adapter.bias", "Adapter.weight"]
    assert record["prompt_shape"] == [2, 1, 8] and record["decoder_calls"] == 3


def test_a_package_the_checkout_needs_is_named_in_one_line(fake_checkout):
    (fake_checkout / "models" / "sam" / "__init__.py").write_text("import einops_not_installed_here\n")
    done = _versus(fake_checkout, "-rows", "sam:vit_b:sam_lora:1", "-rounds", "1", "-steps", "1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: medsa sam:vit_b:sam_lora:1 failed: -medsa: Medical-SAM-Adapter's sam needs the package "
        "einops_not_installed_here; install it with pip install einops_not_installed_here")


def test_our_side_is_the_benchmark_step_of_the_row(fake_checkout):
    measured = _child(fake_checkout, "ours", "efficient_sam:vit_t:sam_lora:1", steps=1)
    assert 0 < measured["added_mb"] < measured["peak_mb"]


@pytest.mark.slow
def test_a_sitting_alternates_the_toolkits_and_writes_its_table_with_what_it_depends_on(fake_checkout, tmp_path):
    out = tmp_path / "sitting" / "versus"
    done = _versus(fake_checkout, "-rows", "mobile_sam:tiny_vit:sam_adpt:1", "-rounds", "2", "-steps", "1",
                   "-warmup", "0", "-out", str(out))
    assert done.returncode == 0, done.stderr
    progress = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("round ")]
    assert progress == ["medsa", "ours", "ours", "medsa"]
    header, _, table = out.with_suffix(".md").read_text().partition("\n\n")
    assert header.startswith("Medical-SAM-Adapter unknown (not a git checkout) against the toolkit; torch ")
    assert "2 rounds of 1 timed steps after 0 warm-up steps" in header
    assert table.splitlines()[2].startswith("| mobile_sam:tiny_vit:sam_adpt:1 | ")
    with open(out.with_suffix(".csv")) as handle:
        (line,) = list(csv.DictReader(handle))
    assert line["row"] == "mobile_sam:tiny_vit:sam_adpt:1" and line["rounds"] == "2"
    assert float(line["speed"]) == pytest.approx(float(line["medsa_s"]) / float(line["ours_s"]))
