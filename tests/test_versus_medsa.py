"""scripts/versus_medsa.py: the paired steps' summary, the serving protocol, its errors, and a Med-SA-shaped
checkout driven end to end."""
import csv
import importlib.util
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import UserError
from engine.versus_medsa import Row, check_checkout, serve_steps, summarise, versus_table

REPO = Path(__file__).resolve().parents[1]


def test_summary_takes_the_median_pair_ratio_its_quartiles_each_median_step_and_the_memory_ratios():
    measured = {"row": "efficient_sam:vit_t:sam_lora:1", "medsa_s": [0.15, 0.30, 0.16, 0.12, 0.20],
                "ours_s": [0.10, 0.20, 0.10, 0.12, 0.10],  # ratios 1.5, 1.5, 1.6, 1.0, 2.0
                "medsa_peak_mb": 930, "medsa_added_mb": 160, "ours_peak_mb": 850, "ours_added_mb": 120}
    line = summarise(measured)
    assert (line["pairs"], line["medsa_s"], line["ours_s"]) == (5, 0.16, 0.10)
    # the median of the pairs' ratios (1.5), not the ratio of the medians (1.6)
    assert line["speed"] == pytest.approx(1.5)
    assert (line["speed_q1"], line["speed_q3"]) == pytest.approx((1.5, 1.6))
    assert line["peak_ratio"] == pytest.approx(850 / 930) and line["added_ratio"] == pytest.approx(0.75)
    table_row = "| efficient_sam:vit_t:sam_lora:1 | 0.160 | 0.100 | 1.50x (1.50-1.60) | 930 | 850 | 0.91x |"
    assert table_row in versus_table([line])


def test_summary_refuses_unpaired_steps():
    measured = {"row": "sam:vit_b:sam_lora:2", "medsa_s": [1.0, 1.1], "ours_s": [0.9],
                "medsa_peak_mb": 1, "medsa_added_mb": 1, "ours_peak_mb": 1, "ours_added_mb": 1}
    with pytest.raises(ValueError, match="as many steps of each toolkit"):
        summarise(measured)


@pytest.mark.parametrize("spec", ["mobile_sam:tiny_vit:sam_lora", "unet:x:sam_lora:1", "sam:vit_b:sam_lora:two"])
def test_a_bad_row_names_the_flag_and_the_form(spec):
    with pytest.raises(UserError, match="-rows: .*net:encoder:mod:batch"):
        Row.parse(spec)


def test_a_folder_that_is_not_a_medsa_checkout_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"-medsa: {tmp_path} is not a Medical-SAM-Adapter checkout"):
        check_checkout(tmp_path)


def test_a_served_step_answers_warm_step_and_memory_with_the_memory_the_steps_add():
    # a fresh process: in this one, memory freed by earlier tests may be refilled without the RSS growing
    code = ("import io, sys, torch; from engine.versus_medsa import serve_steps; kept = []; "
            "serve_steps(lambda: kept.append(torch.ones(25 * 2**20)), sys.stdin, sys.stdout)")
    done = subprocess.run([sys.executable, "-c", code], input="warm 2\nstep\nstep\nmemory\n",
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    warm, first, second, memory = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert warm == {"warm": 2} and first["seconds"] > 0 and second["seconds"] > 0
    assert 350 <= memory["added_mb"] <= memory["peak_mb"]  # four steps of 100 MB each


def test_a_served_step_refuses_an_unknown_command():
    with pytest.raises(ValueError, match="unknown command 'steps 3': warm N, step or memory"):
        serve_steps(lambda: None, io.StringIO("steps 3\n"), io.StringIO())


def test_a_row_takes_single_steps_in_turn_after_warming_both_and_reads_each_processs_memory(monkeypatch):
    script = _script_module()
    asked = []

    class FakeServer:
        def __init__(self, toolkit, spec, checkout):
            self.toolkit, self.seconds = toolkit, iter([0.3, 0.2] if toolkit == "medsa" else [0.1, 0.2])

        def ask(self, command):
            asked.append(f"{self.toolkit} {command}")
            if command == "step":
                return {"seconds": next(self.seconds)}
            return {"peak_mb": 900.0, "added_mb": 100.0} if command == "memory" else {}

        def close(self):
            asked.append(f"{self.toolkit} closed")

    monkeypatch.setattr(script, "Server", FakeServer)
    measured = script.measure_row("mobile_sam:tiny_vit:sam_adpt:1", Path("checkout"), pairs=2, warmup=3)
    assert asked == ["medsa warm 3", "ours warm 3", "medsa step", "ours step", "ours step", "medsa step",
                     "medsa memory", "ours memory", "medsa closed", "ours closed"]
    assert (measured["medsa_s"], measured["ours_s"]) == ([0.3, 0.2], [0.1, 0.2])
    assert summarise(measured)["speed"] == pytest.approx(2.0)  # the median of 3.0 and 1.0


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


def _versus(checkout, *flags: str, input: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "versus_medsa.py"), "-medsa", str(checkout), *flags],
                          input=input, capture_output=True, text=True, cwd=REPO)


def _script_module():
    spec = importlib.util.spec_from_file_location("versus_medsa_script", REPO / "scripts" / "versus_medsa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _served(checkout, toolkit: str, row: str, steps: int) -> dict:
    """One toolkit's step for `row` served as the script's parent drives it: one warm-up step, `steps` steps."""
    done = _versus(checkout, "-serve", toolkit, row, input="warm 1\n" + "step\n" * steps + "memory\n")
    assert done.returncode == 0, done.stderr
    ready, warm, *timed, memory = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert ready == {"ready": row} and warm == {"warm": 1}
    assert len(timed) == steps and all(found["seconds"] > 0 for found in timed)
    assert 0 < memory["added_mb"] < memory["peak_mb"]
    return memory


def test_the_medsa_step_runs_a_checkout_with_its_own_arguments_freezing_and_prompts(fake_checkout):
    _served(fake_checkout, "medsa", "sam:vit_b:sam_adpt:2", steps=2)
    record = json.loads((fake_checkout / "models" / "sam" / "record.json").read_text())
    # its cfg saw the row, its SAM builder an empty state dict (random weights), and each step froze all
    # but the Adapter and gave every image one click
    assert (record["mod"], record["b"], record["image_size"], record["checkpoint"]) == ("sam_adpt", 2, 256, {})
    assert record["trainable_encoder"] == ["Adapter.bias", "Adapter.weight"]
    assert record["prompt_shape"] == [2, 1, 8] and record["decoder_calls"] == 3


def test_a_package_the_checkout_needs_is_named_in_one_line(fake_checkout):
    (fake_checkout / "models" / "sam" / "__init__.py").write_text("import einops_not_installed_here\n")
    done = _versus(fake_checkout, "-rows", "sam:vit_b:sam_lora:1", "-pairs", "1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: medsa sam:vit_b:sam_lora:1 failed: -medsa: Medical-SAM-Adapter's sam needs the package "
        "einops_not_installed_here; install it with pip install einops_not_installed_here")


def test_our_side_is_the_benchmark_step_of_the_row(fake_checkout):
    _served(fake_checkout, "ours", "efficient_sam:vit_t:sam_lora:1", steps=1)


@pytest.mark.slow
def test_a_sitting_writes_its_table_with_what_it_depends_on(fake_checkout, tmp_path):
    out = tmp_path / "sitting" / "versus"
    done = _versus(fake_checkout, "-rows", "mobile_sam:tiny_vit:sam_adpt:1", "-pairs", "2", "-warmup", "0",
                   "-out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("mobile_sam:tiny_vit:sam_adpt:1       Med-SA ")
    header, _, table = out.with_suffix(".md").read_text().partition("\n\n")
    assert header.startswith("Medical-SAM-Adapter unknown (not a git checkout) against the toolkit; torch ")
    assert "0 warm-up steps each, then 2 pairs of steps taken in turn" in header
    assert table.splitlines()[2].startswith("| mobile_sam:tiny_vit:sam_adpt:1 | ")
    with open(out.with_suffix(".csv")) as handle:
        (line,) = list(csv.DictReader(handle))
    assert line["row"] == "mobile_sam:tiny_vit:sam_adpt:1" and line["pairs"] == "2"
    assert float(line["speed_q1"]) <= float(line["speed"]) <= float(line["speed_q3"])
