"""The trainer's optimizer: fused AdamW where torch has the kernel, stepping like the per-tensor loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.optim import adamw, learning_rate_groups


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    fused_params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    loop_params = [nn.Parameter(p.detach().clone()) for p in fused_params]
    start = [p.detach().clone() for p in fused_params]
    fused = adamw(fused_params, lr=1e-2, weight_decay=1e-2)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=1e-2, foreach=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        for p, q in zip(fused_params, loop_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q, before in zip(fused_params, loop_params, start):
        assert (p - before).abs().max() > 5e-3  # the weights moved (lr 1e-2), so the comparison below means something
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_adamw_falls_back_to_the_loop_where_no_fused_kernel_exists():
    assert not adamw([nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3, weight_decay=0.0).defaults["fused"]


def test_learning_rate_groups_give_named_parameters_their_ratio_and_keep_the_rest_at_lr():
    model = nn.ModuleDict({"lora_E": nn.Linear(3, 3), "lora_A": nn.Linear(3, 3), "frozen": nn.Linear(3, 3)})
    model["frozen"].requires_grad_(False)
    groups = learning_rate_groups(model, 1e-3, {"lora_E": 10.0})
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]  # the run's rate first: the trainer logs group 0
    assert [set(map(id, g["params"])) for g in groups] == [set(map(id, model["lora_A"].parameters())),
                                                           set(map(id, model["lora_E"].parameters()))]
    assert len(learning_rate_groups(model, 1e-3, {})) == 1
    optimizer = adamw(groups, lr=1e-3, weight_decay=0.0)
    assert optimizer.defaults["fused"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves every entry by its group's rate
    moved = {name: (p - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert moved["lora_E.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["lora_A.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["frozen.weight"] == 0
