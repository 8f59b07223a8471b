"""The project's own LoRA (models/modes/lora_layer.py) against peft's: the same starting tensors for one
seed, the same outputs, gradients and merge, and a LoRA training process that never imports peft."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from models.modes.lora_layer import LoraLinear, LoraTuner
from models.sam import SAM_VIT_TARGETS
from tests.test_benchmark import REPO
from tests.test_fused_lora import REORDERED_SUMS
from tests.test_modes import build

pytestmark = pytest.mark.usefixtures("one_thread")


def tuners(rank: int = 4, alpha: float = 8.0, dropout: float = 0.0) -> tuple[LoraTuner, LoraModel]:
    """The seed-0 sam-tiny encoder with the project's LoRA and with peft's, each injected after seeding 5."""
    ours, theirs = build("sam-tiny").image_encoder, build("sam-tiny").image_encoder
    torch.manual_seed(5)
    ours = LoraTuner(ours, SAM_VIT_TARGETS.linears, rank, alpha, dropout)
    torch.manual_seed(5)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=SAM_VIT_TARGETS.linears)
    return ours, LoraModel(theirs, config, "default")


def encoders(**options) -> tuple[nn.Module, nn.Module]:
    return tuple(tuner.model for tuner in tuners(**options))


def perturbed(*encoders: nn.Module) -> None:
    """The same noise on every encoder's B (zero at the start, which would make LoRA a no-op)."""
    for encoder in encoders:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in encoder.named_parameters():
                if "lora_B" in name:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_one_seed_gives_peft_s_keys_and_starting_values():
    ours, theirs = encoders()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert any(".lora_A.default.weight" in key for key in ours_state)
    for key, value in ours_state.items():
        assert torch.equal(value, theirs_state[key]), key
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("amp", [False, True])
def test_outputs_and_gradients_match_peft(amp):
    ours, theirs = encoders()
    perturbed(ours, theirs)
    x = torch.randn(2, 64, 64, 3)
    results = []
    for encoder in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = encoder(x.permute(0, 3, 1, 2))
        out.float().square().mean().backward()
        results.append([out.detach().float()] + [p.grad for p in encoder.parameters() if p.requires_grad])
    tolerance = dict(rtol=2e-2, atol=2e-2) if amp else REORDERED_SUMS
    assert len(results[0]) == 1 + 2 * 4 * 2  # output, A and B of 4 linears in 2 blocks
    for value, expected in zip(*results):
        torch.testing.assert_close(value, expected, **tolerance)


def test_dropout_on_the_branch_matches_peft():
    ours, theirs = encoders(dropout=0.3)
    perturbed(ours, theirs)
    x = torch.randn(1, 3, 64, 64)
    outputs = []
    for encoder in (ours, theirs):
        torch.manual_seed(11)  # the same dropout masks
        outputs.append(encoder.train()(x))
    torch.testing.assert_close(outputs[0], outputs[1], **REORDERED_SUMS)
    assert not torch.allclose(ours.eval()(x), outputs[0])  # dropout was active in training


def test_merging_gives_peft_s_merged_linears_and_removes_every_layer():
    ours, theirs = tuners()
    perturbed(ours.model, theirs.model)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged_ours.modules())
    assert merged_ours.state_dict().keys() == merged_theirs.state_dict().keys()
    for key, value in merged_ours.state_dict().items():
        torch.testing.assert_close(value, merged_theirs.state_dict()[key], **REORDERED_SUMS)
    assert ours.merge_and_unload() is merged_ours  # nothing left to merge


def test_bad_targets_are_refused():
    encoder = build("sam-tiny").image_encoder
    with pytest.raises(ValueError, match="no module matches"):
        LoraTuner(encoder, r"blocks\.\d+\.nothing", 4, 4, 0.0)
    with pytest.raises(ValueError, match="not a linear"):
        LoraTuner(encoder, r"patch_embed\.proj", 4, 4, 0.0)
    with pytest.raises(ValueError, match="rank must be positive"):
        LoraLinear(nn.Linear(4, 4), 0, 1.0, 0.0)


def test_a_lora_run_never_imports_peft():
    """peft imports transformers' model classes (about 100 MB and 3 s here): a LoRA step with LoRA on the
    decoder, the merge and the peft-format folder all go without it."""
    script = ("import sys, tempfile, torch\n"
              "from cfg import Config\n"
              "from engine.benchmark import synthetic_batch, training_step\n"
              "import engine.trainer, engine.validation\n"
              "from engine.peft_format import write_peft_folder\n"
              "from models.merge import merge_adapters\n"
              "config = Config(net='mobile_sam', mod='sam_lora', decoder='lora', image_size=64, b=1, amp='none',"
              " sam_ckpt='random')\n"
              "model, adaptation, params, step = training_step(config, synthetic_batch(config, 1, torch.device('cpu')), 4)\n"
              "step()\n"
              "write_peft_folder(tempfile.mkdtemp(), model, adaptation)\n"
              "assert merge_adapters(adaptation)\n"
              "loaded = sorted(m for m in ('peft', 'transformers') if m in sys.modules)\n"
              "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
