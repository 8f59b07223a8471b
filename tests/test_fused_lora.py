"""FusedLoraLinear (peft's LoRA layer on the fused arithmetic of low_rank.py, for DoRA and -lora_conv) gives
peft's numbers, gradients, state dict and merge, and leaves the cases it does not fuse (dropout, DoRA,
disabled adapters) to peft's own forward."""
from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.modes.fused_lora import FusedLoraLinear, fusable_adapter, fused_lora_config


# float32 results summed in another order (peft's ops against the fused ones; the threaded BLAS splits its sums
# differently from run to run): gradients near zero differ by about 1e-6
REORDERED_SUMS = dict(rtol=1e-5, atol=1e-5)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))


def adapted(fused: bool, **options) -> nn.Module:
    options = dict(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False, **options)
    config = fused_lora_config(**options) if fused else LoraConfig(**options)
    torch.manual_seed(1)
    return inject_adapter_in_model(config, mlp())


def step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


# 14 tokens, fewer than the layers' 20 features: the rank-wide branch is added over the tokens; 40 tokens: the
# weight is merged (low_rank.merge_pays)
FEW_TOKENS, MANY_TOKENS = (2, 7), (4, 10)


@pytest.mark.parametrize("batch_tokens", [FEW_TOKENS, MANY_TOKENS])
def test_fused_layer_gives_peft_output_and_gradients(batch_tokens):
    x = torch.randn(*batch_tokens, 12)
    fused, plain = adapted(True), adapted(False)
    assert isinstance(fused[0], FusedLoraLinear) and type(plain[0]) is LoraLinear
    results = step(fused, x), step(plain, x)
    assert len(results[0]) == 2 + 4
    for value, reference in zip(*results):
        torch.testing.assert_close(value, reference, **REORDERED_SUMS)
    assert fused.state_dict().keys() == plain.state_dict().keys()


def profiled_ops(model: nn.Module, batch_tokens: tuple[int, int]) -> list:
    x = torch.randn(*batch_tokens, 12, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        model(x).sum().backward()
    return list(prof.events())


def full_width_elementwise(model: nn.Module, batch_tokens: tuple[int, int]) -> list[str]:
    """The mul/add calls of one forward and backward over activations (tokens x 12 or 20 features), not
    over the rank-3 products or the adapter weights."""
    return [event.name for event in profiled_ops(model, batch_tokens)
            if event.name in ("aten::mul", "aten::add", "aten::add_")
            and math.prod(event.input_shapes[0] or [0]) >= math.prod(batch_tokens) * 12]


def rank_products_over_tokens(model: nn.Module, batch_tokens: tuple[int, int], rank: int = 3) -> list[list]:
    """Matrix products that multiply over all tokens with the rank as an inner or outer dimension:
    (tokens x r) @ (r x features) and (features x tokens) @ (tokens x r), which CPU BLAS runs slowly."""
    tokens, products = math.prod(batch_tokens), []
    for event in profiled_ops(model, batch_tokens):
        shapes = [shape for shape in event.input_shapes if len(shape) == 2]
        if event.name in ("aten::mm", "aten::addmm") and len(shapes) >= 2:
            left, right = shapes[-2:]
            if (left[0] == tokens and left[1] == rank) or (left[1] == tokens and right[1] == rank):
                products.append([left, right])
    return products


def weight_sized_products(model: nn.Module, batch_tokens: tuple[int, int]) -> list[list]:
    """addmm calls that form a merged weight: W (20 x 12 or 12 x 20) + B @ A."""
    return [event.input_shapes for event in profiled_ops(model, batch_tokens)
            if event.name == "aten::addmm" and event.input_shapes[0] in ([20, 12], [12, 20])]


def test_frozen_float32_base_adds_no_full_width_passes():
    fused, plain = adapted(True), adapted(False)
    assert not fused[0].base_layer.weight.requires_grad
    for batch_tokens in (FEW_TOKENS, MANY_TOKENS):
        assert full_width_elementwise(fused, batch_tokens) == []
        assert full_width_elementwise(plain, batch_tokens).count("aten::mul") == 4
    assert len(rank_products_over_tokens(plain, MANY_TOKENS)) >= 4  # peft: B's product forward, dx and dB per layer


def test_many_tokens_take_one_product_with_the_merged_weight():
    fused = adapted(True)
    assert rank_products_over_tokens(fused, MANY_TOKENS) == [], rank_products_over_tokens(fused, MANY_TOKENS)
    assert len(weight_sized_products(fused, MANY_TOKENS)) == 4  # each layer's forward and backward


def test_few_tokens_add_the_rank_wide_branch_without_forming_the_merged_weight():
    fused = adapted(True)
    assert weight_sized_products(fused, FEW_TOKENS) == []
    # (x A^T) B^T accumulated in place into each layer's output, (grad B) A into its input gradient
    accumulated = [event.input_shapes[1] for event in profiled_ops(fused, FEW_TOKENS) if event.name == "aten::addmm_"]
    assert accumulated == [[14, 3]] * 4, accumulated


class ThinRightFactors(TorchDispatchMode):
    """Records the layout of every (tokens x features) @ (features x rank) product's right factor."""

    def __init__(self, tokens: int, rank: int):
        super().__init__()
        self.tokens, self.rank, self.strides = tokens, rank, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            left, right = args[-2:]
            if left.shape[0] == self.tokens and right.shape[1] == self.rank and right.shape[0] > self.rank:
                self.strides.append(right.stride())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_tokens", [FEW_TOKENS, MANY_TOKENS])
@pytest.mark.parametrize("trainable_base", [False, True])
def test_products_with_a_rank_wide_right_factor_get_it_column_major(trainable_base, batch_tokens):
    # MKL runs (tokens x features) @ (features x r) 4-5x slower with the right factor row-major
    model = adapted(True)
    for layer in (model[0], model[2]):
        layer.base_layer.weight.requires_grad_(trainable_base)
    with ThinRightFactors(tokens=math.prod(batch_tokens), rank=3) as products:
        model(torch.randn(*batch_tokens, 12, requires_grad=True)).sum().backward()
    assert len(products.strides) >= 2, products.strides  # grad @ B in each layer's backward
    assert all(stride[0] == 1 for stride in products.strides), products.strides


def test_backward_keeps_no_copy_of_the_merged_weight():
    # saving W + s B A for backward would hold a copy of every adapted weight through the whole forward
    model = adapted(True)
    weights = {layer.base_layer.weight.data_ptr(): layer.base_layer.weight.shape for layer in (model[0], model[2])}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(torch.randn(*MANY_TOKENS, 12, requires_grad=True)).sum().backward()
    weight_sized = [t for t in saved if t.shape in weights.values()]
    assert weight_sized and all(t.data_ptr() in weights for t in weight_sized)


def test_trainable_base_keeps_the_addmm_path_with_peft_gradients():
    x = torch.randn(2, 7, 12)
    fused, plain = adapted(True), adapted(False)
    for model in (fused, plain):
        for layer in (model[0], model[2]):
            layer.base_layer.weight.requires_grad_(True)
    results = step(fused, x), step(plain, x)
    assert len(results[0]) == 2 + 6  # with the two base weights' gradients
    for value, reference in zip(*results):
        torch.testing.assert_close(value, reference, **REORDERED_SUMS)
    fused_passes, plain_passes = full_width_elementwise(fused, FEW_TOKENS), full_width_elementwise(plain, FEW_TOKENS)
    # peft: per layer a scaling and a sum in forward and a scaling in backward; both keep the sums of the
    # input gradients (base and branch) in backward
    assert "aten::mul" not in fused_passes and plain_passes.count("aten::mul") == 4
    assert len(plain_passes) - len(fused_passes) == 6, (plain_passes, fused_passes)


@pytest.mark.parametrize("options", [dict(lora_dropout=0.1), dict(use_dora=True)])
def test_cases_it_does_not_fuse_take_peft_forward(options):
    x = torch.randn(2, 7, 12)
    fused, plain = adapted(True, **options), adapted(False, **options)
    fused.train(False), plain.train(False)
    assert fusable_adapter(fused[0], (), {}) is None
    torch.testing.assert_close(fused(x), plain(x))


def test_disabled_adapters_and_merging_give_the_base_and_the_merged_output():
    x = torch.randn(2, 7, 12)
    model = adapted(True)
    with_lora = model(x)
    for layer in (model[0], model[2]):
        layer.enable_adapters(False)
    torch.testing.assert_close(model(x), mlp()(x))
    for layer in (model[0], model[2]):
        layer.enable_adapters(True)
        layer.merge()
    torch.testing.assert_close(model(x), with_lora, **REORDERED_SUMS)


def test_under_bf16_autocast_the_fused_output_is_bf16_and_close_to_float32():
    model, x = adapted(True), torch.randn(2, 7, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), rtol=0.05, atol=0.05)
