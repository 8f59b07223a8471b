"""The trainer's optimizer: fused AdamW where torch has the kernel, stepping like the per-tensor loop."""
from __future__ import annotations

import copy

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


def test_stepping_in_backward_gives_the_step_after_backward_holding_one_gradient_at_a_time():
    from engine.optim import StepInBackward

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))]
    nets.append(copy.deepcopy(nets[0]))
    optimizers = [adamw(net.parameters(), lr=1e-2, weight_decay=0.1) for net in nets]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)) for o in optimizers]
    held = []
    in_backward = StepInBackward(optimizers[1], on_gradient=lambda p: held.append(
        sum(q.grad is not None for q in nets[1].parameters())))
    for _ in range(4):
        x = torch.randn(5, 8)
        for net, optimizer, schedule in zip(nets, optimizers, schedules):
            net(x).square().sum().backward()
            if optimizer is optimizers[0]:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    assert held == [1] * 4 * len(list(nets[1].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    states = [optimizer.state_dict()["state"] for optimizer in optimizers]  # first stepped in another order
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][i][key], states[1][i][key]) for i in states[0] for key in states[0][i])
    in_backward.remove()
    nets[1](torch.randn(5, 8)).sum().backward()
    assert all(p.grad is not None for p in nets[1].parameters())  # no longer stepped in backward


def test_only_full_fine_tuning_without_a_scaler_or_ddp_steps_in_backward():
    from engine.optim import steps_in_backward

    assert steps_in_backward(True, "none", False) and steps_in_backward(True, "bf16", False)
    assert not steps_in_backward(False, "none", False)  # adapters: small gradients, and AdaLoRA reads them
    assert not steps_in_backward(True, "fp16", False)  # the scaler checks every gradient before any step
    assert not steps_in_backward(True, "none", True)  # DDP averages gradients after they accumulate
