"""The trainer's optimizer: fused AdamW where torch has the kernel, stepping like torch's AdamW, with its state."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.optim import FusedAdamW, adamw, learning_rate_groups


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_loop():
    torch.manual_seed(0)
    fused_params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    loop_params = [nn.Parameter(p.detach().clone()) for p in fused_params]
    start = [p.detach().clone() for p in fused_params]
    fused = adamw(fused_params, lr=1e-2, weight_decay=1e-2)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=1e-2, foreach=False)
    assert isinstance(fused, FusedAdamW)
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
    optimizer = adamw([nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3, weight_decay=0.0)
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]


def test_learning_rate_groups_give_named_parameters_their_ratio_and_keep_the_rest_at_lr():
    model = nn.ModuleDict({"lora_E": nn.Linear(3, 3), "lora_A": nn.Linear(3, 3), "frozen": nn.Linear(3, 3)})
    model["frozen"].requires_grad_(False)
    groups = learning_rate_groups(model, 1e-3, {"lora_E": 10.0})
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]  # the run's rate first: the trainer logs group 0
    assert [set(map(id, g["params"])) for g in groups] == [set(map(id, model["lora_A"].parameters())),
                                                           set(map(id, model["lora_E"].parameters()))]
    assert len(learning_rate_groups(model, 1e-3, {})) == 1
    optimizer = adamw(groups, lr=1e-3, weight_decay=0.0)
    assert isinstance(optimizer, FusedAdamW)
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
    held = []
    in_backward = StepInBackward(optimizers[1], on_gradient=lambda p: held.append(
        sum(q.grad is not None for q in nets[1].parameters())))
    for step in range(4):
        x = torch.randn(5, 8)
        for net, optimizer in zip(nets, optimizers):
            optimizer.param_groups[0]["lr"] = 1e-2 / (1 + step)  # as the trainer schedules it
            net(x).square().sum().backward()
            if optimizer is optimizers[0]:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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


def _two_groups(seed: int) -> tuple[list[nn.Parameter], list[dict]]:
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3, 3))]
    return params, [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-2}]


def _step_with_gradients(optimizers: list, params: list[list[nn.Parameter]], skip: int = -1) -> None:
    """One step of every optimizer on the same random gradients; parameter `skip` gets none."""
    gradients = [torch.randn_like(p) for p in params[0]]
    for optimizer, own in zip(optimizers, params):
        for i, (p, g) in enumerate(zip(own, gradients)):
            p.grad = None if i == skip else g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_fused_adamw_equals_torchs_fused_adamw_exactly_per_group_and_skips_parameters_without_gradient():
    ours, ours_groups = _two_groups(0)
    theirs, their_groups = _two_groups(0)
    optimizers = [FusedAdamW(ours_groups, lr=1e-3, weight_decay=0.05),
                  torch.optim.AdamW(their_groups, lr=1e-3, weight_decay=0.05, fused=True)]
    start = [p.detach().clone() for p in ours]
    for step in range(6):
        _step_with_gradients(optimizers, [ours, theirs], skip=1 if step < 2 else -1)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all((p - s).abs().min() > 1e-3 for p, s in zip(ours, start))  # every tensor moved
    ours_state, their_state = optimizers[0].state_dict(), optimizers[1].state_dict()
    assert [ours_state["state"][number]["step"].item() for number in range(3)] == [6.0, 4.0, 6.0]
    assert ours_state["state"].keys() == their_state["state"].keys()
    for number, state in ours_state["state"].items():
        assert state.keys() == their_state["state"][number].keys()
        assert all(torch.equal(state[key], their_state["state"][number][key]) for key in state)
    assert [g["params"] for g in ours_state["param_groups"]] == [g["params"] for g in their_state["param_groups"]]


@pytest.mark.parametrize("saved_by", ["ours", "torch"])
def test_fused_adamw_resumes_from_its_own_or_torchs_state_dict(saved_by):
    """A run saved after 3 steps and resumed in a new optimizer continues exactly as one never stopped."""
    straight, straight_groups = _two_groups(1)
    stopped, stopped_groups = _two_groups(1)
    first = (FusedAdamW(stopped_groups, lr=1e-3, weight_decay=0.1) if saved_by == "ours"
             else torch.optim.AdamW(stopped_groups, lr=1e-3, weight_decay=0.1, fused=True))
    straight_optimizer = FusedAdamW(straight_groups, lr=1e-3, weight_decay=0.1)
    torch.manual_seed(2)
    for _ in range(3):
        _step_with_gradients([straight_optimizer, first], [straight, stopped])
    saved = copy.deepcopy(first.state_dict())
    _, fresh_groups = _two_groups(99)  # other values: the state must not depend on the new optimizer's
    resumed = FusedAdamW([{**g, "params": p} for g, p in zip(fresh_groups, [stopped[:2], stopped[2:]])],
                         lr=5.0, weight_decay=0.0)
    resumed.load_state_dict(saved)
    assert [g["lr"] for g in resumed.param_groups] == [1e-2, 3e-2]
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.1, 0.1]
    for _ in range(3):
        _step_with_gradients([straight_optimizer, resumed], [straight, stopped])
    assert all(torch.equal(a, b) for a, b in zip(straight, stopped))
    torch_optimizer = torch.optim.AdamW(straight_groups, lr=1e-3, fused=True)
    torch_optimizer.load_state_dict(straight_optimizer.state_dict())  # and torch reads ours
    assert torch_optimizer.state[straight[0]]["step"].item() == 6.0


def test_fused_adamw_refuses_a_state_for_other_parameter_groups():
    params, groups = _two_groups(0)
    saved = FusedAdamW([{"params": params}], lr=1e-3, weight_decay=0.0).state_dict()
    with pytest.raises(ValueError, match=r"groups of \[3\] parameters, this optimizer \[2, 1\]"):
        FusedAdamW(groups, lr=1e-3, weight_decay=0.0).load_state_dict(saved)
