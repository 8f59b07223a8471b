"""The TinyViT frozen prefix (patch embedding + stage 0) runs without autograd state, in channels-last,
while frozen; outputs and adapter gradients are those of the plain path."""
from __future__ import annotations

import pytest
import torch

import models.frozen_prefix as frozen_prefix
from models.modes import apply_mode
from models.registry import build_segmenter
from models.segmenter import Prompts

TINY = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_sizes=(7, 7, 7, 7))
OPTIONS = dict(mid_dim=2, lora_alpha=None, lora_dropout=0.0, lora_conv=False, decoder="full")


def _step(model, enabled: bool, monkeypatch, size: int = 32):
    monkeypatch.setattr(frozen_prefix, "ENABLED", enabled)
    model.zero_grad(set_to_none=True)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 255
    prompts = Prompts(torch.full((2, 1, 1, 2), size / 2), torch.ones(2, 1, 1, dtype=torch.long))
    seen = {}
    hook = model.image_encoder.layers[0].register_forward_hook(
        lambda m, a, out: seen.update(grad_fn=out.grad_fn, channels_last=a[0].is_contiguous(
            memory_format=torch.channels_last) and a[0].shape[1] > 1))
    logits, _ = model(images, prompts)
    logits.square().mean().backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, seen


@pytest.mark.parametrize("net", ["lite_medsam", "mobile_sam"])
def test_frozen_prefix_changes_nothing_but_autograd_state(net, monkeypatch, one_thread):
    torch.manual_seed(0)
    size = 32 if net == "lite_medsam" else 64
    model = build_segmenter(net, "default", size, 1, **TINY)
    apply_mode(model, "sam_lora", 10, **OPTIONS)
    for module in model.modules():  # as the trainer keeps frozen BatchNorm
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    plain_logits, plain_grads, plain_seen = _step(model, False, monkeypatch, size)
    logits, grads, seen = _step(model, True, monkeypatch, size)
    assert plain_seen["grad_fn"] is None and seen["grad_fn"] is None  # frozen: no graph either way
    assert seen["channels_last"] and not plain_seen["channels_last"]
    assert torch.allclose(logits, plain_logits, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and any(".lora_" in n for n in grads)
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-5, rtol=1e-4), name
    assert not any(n.startswith(("image_encoder.patch_embed", "image_encoder.layers.0.")) for n in grads)
    assert torch.is_grad_enabled()


def test_trainable_prefix_runs_with_gradients(monkeypatch, one_thread):
    torch.manual_seed(0)
    model = build_segmenter("lite_medsam", "default", 32, 1, **TINY)
    apply_mode(model, "sam_lora", 10, **{**OPTIONS, "lora_conv": True})
    _, grads, seen = _step(model, True, monkeypatch)
    assert seen["grad_fn"] is not None
    assert any("patch_embed" in n and ".lora_" in n for n in grads)


def test_full_fine_tuning_trains_the_prefix(monkeypatch, one_thread):
    model = build_segmenter("lite_medsam", "default", 32, 1, **TINY)
    apply_mode(model, "sam_full", 10)
    _, grads, _ = _step(model, True, monkeypatch)
    assert any(n.startswith("image_encoder.patch_embed") for n in grads)
    assert any(n.startswith("image_encoder.layers.0.") for n in grads)
