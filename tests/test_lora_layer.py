"""The project's own LoRA and AdaLoRA layers (models/modes/lora_layer.py) against peft's: the same starting
tensors for one seed, the same outputs, gradients and merge, and training processes that never import peft."""
from __future__ import annotations

import pytest
import torch
from conftest import run_python
from peft import AdaLoraConfig, LoraConfig
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.lora import LoraModel
from torch import nn

from models.modes.lora_layer import AdaLoraLinear, AdaLoraSchedule, AdaLoraTuner, LoraLinear, LoraTuner
from models.sam import SAM_VIT_TARGETS
from tests.test_fused_lora import FEW_TOKENS, MANY_TOKENS, REORDERED_SUMS, full_width_elementwise, step
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


SCHEDULE = AdaLoraSchedule(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10)


def adalora_tuners() -> tuple[AdaLoraTuner, AdaLoraModel]:
    """The project's AdaLoRA and peft's on the seed-0 sam-tiny encoder, each injected after seeding 5, with
    the same random singular values (both start them at zero, which would hide B's gradient)."""
    ours, theirs = build("sam-tiny").image_encoder, build("sam-tiny").image_encoder
    torch.manual_seed(5)
    ours = AdaLoraTuner(ours, SAM_VIT_TARGETS.linears, 8.0, 0.0, SCHEDULE)
    torch.manual_seed(5)
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, lora_alpha=8,
                           target_modules=SAM_VIT_TARGETS.linears)
    theirs = AdaLoraModel(theirs, config, "default")
    assert list(ours.model.state_dict()) == list(theirs.model.state_dict())
    for key, value in ours.model.state_dict().items():
        assert torch.equal(value, theirs.model.state_dict()[key]), key
    for tuner in (ours, theirs):
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in tuner.model.named_parameters():
                if "lora_E" in name:
                    param.copy_(torch.randn(param.shape, generator=generator))
    return ours, theirs


def test_the_adalora_layer_starts_gives_and_merges_as_peft_s():
    ours, theirs = adalora_tuners()
    x = torch.randn(1, 3, 64, 64)
    results = step(ours.model, x), step(theirs.model, x)
    assert len(results[0]) == 2 + 3 * 4 * 2  # output, input gradient, A, B, E of 4 linears in 2 blocks
    for value, expected in zip(*results):
        torch.testing.assert_close(value, expected, **REORDERED_SUMS)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, AdaLoraLinear) for m in merged_ours.modules())
    for key, value in merged_ours.state_dict().items():
        torch.testing.assert_close(value, merged_theirs.state_dict()[key], **REORDERED_SUMS)


def test_the_adalora_layer_adds_its_branch_without_full_width_passes():
    torch.manual_seed(0)
    ours = AdaLoraTuner(nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12)), "0|2", 8.0, 0.0, SCHEDULE)
    torch.manual_seed(0)
    theirs = AdaLoraModel(nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12)),
                          AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules="0|2", total_step=10),
                          "default")
    for batch_tokens in (FEW_TOKENS, MANY_TOKENS):
        passes = full_width_elementwise(ours.model, batch_tokens)
        peft_passes = full_width_elementwise(theirs.model, batch_tokens)
        assert "aten::mul" not in passes and len(passes) < len(peft_passes), (passes, peft_passes)


@pytest.mark.filterwarnings("ignore:.*LoRA tensor.*have invalid shape")  # peft's, for the rank-0 layer
def test_the_adalora_peft_folder_matches_peft_s_own_export():
    """Pruned by one rank pattern (a layer at rank 0 included), our tensors and config are peft's."""
    from peft import get_peft_model_state_dict

    class AsPeftModel(nn.Module):  # what get_peft_model_state_dict reads of a PeftModel
        def __init__(self, tuner: AdaLoraModel):
            super().__init__()
            self.base_model, self.peft_config = tuner, tuner.peft_config
            self.resize_state_dict_by_rank_pattern = tuner.resize_state_dict_by_rank_pattern

    ours, theirs = adalora_tuners()
    names = sorted(n for n, _ in ours.model.named_parameters() if ".lora_E." in n)
    pattern = {name: [i % 2 == 0 or k == 0 for i in range(4)] for k, name in enumerate(names)}
    pattern[names[-1]] = [False] * 4
    ours.rank_pattern = pattern
    theirs.peft_config["default"].rank_pattern = dict(pattern)
    tensors, config = ours.peft_state()
    expected = get_peft_model_state_dict(AsPeftModel(theirs), adapter_name="default", save_embedding_layers=False)
    assert tensors.keys() == expected.keys()
    for key, value in tensors.items():
        assert torch.equal(value, expected[key]), key
    peft_config = theirs.peft_config["default"]
    for field in ("peft_type", "init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "lora_alpha",
                  "target_modules", "rank_pattern"):
        value = getattr(peft_config, field)
        assert config[field] == (value.value if field == "peft_type" else value), field


def test_bad_targets_are_refused():
    encoder = build("sam-tiny").image_encoder
    with pytest.raises(ValueError, match="no module matches"):
        LoraTuner(encoder, r"blocks\.\d+\.nothing", 4, 4, 0.0)
    with pytest.raises(ValueError, match="not a linear"):
        LoraTuner(encoder, r"patch_embed\.proj", 4, 4, 0.0)
    with pytest.raises(ValueError, match="rank must be positive"):
        LoraLinear(nn.Linear(4, 4), 0, 1.0, 0.0)


@pytest.mark.parametrize("mode", ["sam_lora", "sam_adalora"])
def test_a_lora_or_adalora_run_never_imports_peft(mode):
    """peft imports transformers' model classes (about 100 MB and 3 s here): a step with LoRA on the decoder,
    the merge and the peft-format folder all go without it."""
    script = ("import sys, tempfile, torch\n"
              "from cfg import Config\n"
              "from engine.benchmark import synthetic_batch, training_step\n"
              "import engine.trainer, engine.validation\n"
              "from engine.peft_format import write_peft_folder\n"
              "from models.merge import merge_adapters\n"
              f"config = Config(net='mobile_sam', mod='{mode}', decoder='lora', image_size=64, b=1, amp='none',"
              " sam_ckpt='random')\n"
              "model, adaptation, params, step = training_step(config, synthetic_batch(config, 1, torch.device('cpu')), 4)\n"
              "step()\n"
              "write_peft_folder(tempfile.mkdtemp(), model, adaptation)\n"
              "assert merge_adapters(adaptation)\n"
              "loaded = sorted(m for m in ('peft', 'transformers') if m in sys.modules)\n"
              "assert not loaded, loaded\n")
    run_python(script)
