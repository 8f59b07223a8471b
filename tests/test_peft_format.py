"""A run's encoder adapters written in peft's format load into peft with no missing and no unexpected keys."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DECODER_WEIGHTS, write_peft_folder
from tests.test_modes import LORA_FAMILY, adapted, build

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model):
    """Make every trainable tensor non-trivial (LoRA's B starts at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def peft_key_report(folder, encoder):
    """(missing adapter keys, unexpected keys) of set_peft_model_state_dict on a fresh peft-wrapped encoder."""
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(folder))
    peft_model = get_peft_model(encoder, config)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(folder)))
    prefix = peft_model.base_model.prefix
    missing = [k for k in result.missing_keys if prefix in k]
    return missing, list(result.unexpected_keys)


@pytest.mark.parametrize("mode", LORA_FAMILY)
def test_peft_loads_the_adapters_with_no_missing_or_unexpected_keys(mode, tmp_path):
    from peft import PeftModel

    model, adaptation = adapted("sam-tiny", mode)
    _perturb(model)
    model.eval()
    folder = write_peft_folder(tmp_path / "peft", model, adaptation)
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in load_file(folder / ADAPTER_WEIGHTS))

    missing, unexpected = peft_key_report(folder, build("sam-tiny").image_encoder)
    assert (missing, unexpected) == ([], [])

    fresh = build("sam-tiny").eval()  # the same seed-0 base, untouched by any adapter
    loaded = PeftModel.from_pretrained(fresh.image_encoder, str(folder)).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.allclose(loaded(model.normalise(images, None)), model.encode(images), atol=1e-5)

    decoder = load_file(folder / DECODER_WEIGHTS)
    assert set(decoder) == {k for k in model.state_dict() if k.startswith("mask_decoder.")}


def test_modes_without_a_peft_tuner_write_no_peft_folder(tmp_path):
    model, adaptation = adapted("sam-tiny", "sam_adpt")
    assert write_peft_folder(tmp_path / "peft", model, adaptation) is None
    assert not (tmp_path / "peft").exists()


# peft's loader warns that AdaLoRA's rank-pattern keys (`<module>.lora_E`) match no module name, for peft's own
# AdaLoRA checkpoints too; it still resizes the layers by the pattern, which is what this test checks
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_an_adalora_layer_pruned_to_rank_zero_is_written_without_warnings_and_loads(tmp_path):
    """AdaLoRA may prune a layer to rank 0: its tensors are then zero-sized, which peft reads as unsharded."""
    import warnings

    from peft import PeftModel

    model, adaptation = adapted("sam-tiny", "sam_adalora")
    _perturb(model)
    budget = adaptation.budget
    pruned = budget.layer_names[0]
    state = budget.state_dict()
    state["rank_pattern"] = {name: [name != pruned] * values.shape[0]
                             for name, values in zip(budget.layer_names, budget.values)}
    adaptation.load_state_dict(state)
    budget.hold_pattern()  # the pruned layer's singular values are now zero
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = write_peft_folder(tmp_path / "peft", model, adaptation)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    assert weights["base_model.model." + pruned.replace(".default", "").replace("lora_E", "lora_A")].shape[0] == 0

    fresh = build("sam-tiny").eval()
    loaded = PeftModel.from_pretrained(fresh.image_encoder, str(folder)).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.allclose(loaded(model.normalise(images, None)), model.encode(images), atol=1e-5)
