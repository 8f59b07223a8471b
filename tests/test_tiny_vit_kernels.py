"""TinyViT's faster, leaner paths give the plain computation's numbers: BatchNorm folded into its
convolution, window attention on torch's fused kernel, activations stored as recipes (saved_tensors)."""
from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch.profiler import profile

from models.modes.adaptation import take_autocast_inputs_as_given
from models.saved_tensors import without_recipes
from models.tiny_vit import Conv2dBN, Mlp, WindowAttention


def randomised_conv_bn(groups: int = 1) -> Conv2dBN:
    torch.manual_seed(0)
    layer = Conv2dBN(8, 8, kernel_size=3, groups=groups)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_()
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)
    return layer


def unfolded(layer: Conv2dBN, x: torch.Tensor) -> torch.Tensor:
    return layer.bn(layer.c(x))


@pytest.mark.parametrize("groups", [1, 8])
def test_eval_mode_batchnorm_is_folded_with_the_same_output_and_gradients(groups):
    layer = randomised_conv_bn(groups).eval()
    bn_calls = []
    layer.bn.register_forward_hook(lambda *args: bn_calls.append(1))
    x = torch.randn(2, 8, 9, 9)
    grads = []
    for forward in (layer, lambda x: unfolded(layer, x)):
        layer.zero_grad()
        out = forward(x)
        (out * torch.linspace(-1, 1, 9)).sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in (layer.c.weight, layer.bn.weight, layer.bn.bias)])
    assert len(bn_calls) == 1  # only the unfolded reference called the BatchNorm module
    for folded_value, reference in zip(*grads):
        torch.testing.assert_close(folded_value, reference, rtol=1e-5, atol=1e-5)


def folded_conv(layer: Conv2dBN, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode fold written out with autograd's own convolution."""
    bn = layer.bn
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return F.conv2d(x, layer.c.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale,
                    layer.c.stride, layer.c.padding, layer.c.dilation, layer.c.groups)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups, stride", [(1, 1), (8, 1), (8, 2)])
def test_a_frozen_folded_conv_gives_autograd_s_output_and_input_gradient(groups, stride, channels_last, amp):
    layer = randomised_conv_bn(groups).eval().requires_grad_(False)
    layer.c.stride = (stride, stride)
    x = torch.randn(2, 8, 9, 9)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    results = []
    for forward in (layer, lambda x: folded_conv(layer, x)):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = forward(x)
        out.float().square().sum().backward()
        results.append([out.detach(), x.grad.clone(), out.is_contiguous(memory_format=torch.channels_last)])
    assert results[0][0].dtype == (torch.bfloat16 if amp else torch.float32)
    assert results[0][2] == results[1][2]  # the same memory format out
    for value, reference in zip(results[0][:2], results[1][:2]):  # the same kernels: the same numbers
        torch.testing.assert_close(value, reference, rtol=0, atol=0)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_folded_conv_keeps_no_input_for_backward(frozen):
    layer = randomised_conv_bn(8).eval().requires_grad_(not frozen)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    hidden = x * 2  # an activation: freed after forward unless the convolution keeps it
    kept = weakref.ref(hidden.untyped_storage())
    out = layer(hidden)
    del hidden
    gc.collect()
    assert (kept() is None) == frozen
    out.sum().backward()
    assert x.grad is not None


def operators_called(forward, x: torch.Tensor) -> set[str]:
    with profile() as prof:
        forward(x)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups, stride", [(1, 1), (8, 1), (8, 2)])
def test_conv_bn_gelu_without_gradient_is_one_fused_kernel_with_the_plain_numbers(groups, stride, channels_last):
    layer = randomised_conv_bn(groups).eval()
    layer.c.stride = (stride, stride)
    x = torch.randn(2, 8, 9, 9)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        reference = F.gelu(unfolded(layer, x))
        # BatchNorm folded into the weights sums in another order: about 1e-6 apart on an AVX-512 CPU; the tanh
        # approximation of GELU would be up to 5e-4 apart
        torch.testing.assert_close(layer.activated(x), reference, rtol=1e-5, atol=1e-5)
        called = operators_called(layer.activated, x)
    assert "mkldnn::_convolution_pointwise" in called and "aten::gelu" not in called


@pytest.mark.parametrize("case", ["gradient", "train_mode_batchnorm", "autocast", "float64"])
def test_conv_bn_gelu_takes_the_plain_path_where_the_fused_kernel_does_not_apply(case):
    layer = randomised_conv_bn(8).eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64 if case == "float64" else torch.float32)
    layer = layer.to(x.dtype).train(case == "train_mode_batchnorm")
    reference = F.gelu(unfolded(layer, x))
    grad_mode = torch.enable_grad() if case == "gradient" else torch.no_grad()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with grad_mode, amp:
        called = operators_called(layer.activated, x)
        out = layer.activated(x)
    assert "mkldnn::_convolution_pointwise" not in called and "aten::gelu" in called
    tolerance = 2e-2 if case == "autocast" else 1e-5
    torch.testing.assert_close(out.float(), reference.float().detach(), rtol=tolerance, atol=tolerance)
    if case == "gradient":
        out.sum().backward()
        assert layer.c.weight.grad is not None


def test_train_mode_batchnorm_uses_batch_statistics_and_updates_them():
    layer = randomised_conv_bn().train()
    before = layer.bn.running_mean.clone()
    x = torch.randn(4, 8, 9, 9)
    out = layer(x)
    per_channel_mean = out.mean(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel_mean, layer.bn.bias.detach(), rtol=1e-4, atol=1e-4)
    assert not torch.equal(layer.bn.running_mean, before)


def attention_reference(attention: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's window attention as the official code computes it: B x H x W x C zero-padded to whole
    windows, every padded token normed, projected and asking queries, softmax(q k^T / sqrt(d) + bias) v,
    then the padding cropped away."""
    batch, height, width, dim = x.shape
    ws, heads, head_dim = attention.window_size, attention.num_heads, attention.head_dim
    padded = torch.nn.functional.pad(x, (0, 0, 0, -width % ws, 0, -height % ws))
    rows, cols = padded.shape[1] // ws, padded.shape[2] // ws
    windows = padded.view(batch, rows, ws, cols, ws, dim).transpose(2, 3).reshape(-1, ws * ws, dim)
    qkv = attention.qkv(attention.norm(windows)).view(len(windows), ws * ws, heads, 3 * head_dim).permute(0, 2, 1, 3)
    q, k, v = qkv.split(head_dim, dim=-1)
    bias = attention.attention_biases[:, attention.attention_bias_idxs]
    weights = (q @ k.transpose(-1, -2) / head_dim ** 0.5 + bias).softmax(-1)
    out = attention.proj((weights @ v).transpose(1, 2).reshape(len(windows), ws * ws, dim))
    out = out.view(batch, rows, cols, ws, ws, dim).transpose(2, 3).reshape(batch, rows * ws, cols * ws, dim)
    return out[:, :height, :width]


def window_attention() -> WindowAttention:
    torch.manual_seed(0)
    attention = WindowAttention(dim=32, num_heads=2, window_size=7)
    with torch.no_grad():
        attention.attention_biases.normal_()
        attention.norm.bias.normal_()  # a padding token's keys and values then differ from a zero input's
    return attention


@pytest.mark.parametrize("grid", [(14, 21), (9, 12), (3, 16), (13, 13)])  # whole windows; every kind of
# span; one short row; little padding (the grid padded first)
@pytest.mark.parametrize("biases_train", [False, True])
def test_window_attention_asked_by_the_real_tokens_matches_the_official_padded_computation(grid, biases_train):
    attention = window_attention()
    attention.attention_biases.requires_grad_(biases_train)
    x = torch.randn(2, *grid, 32, requires_grad=True)
    results = []
    for forward in (attention, lambda x: attention_reference(attention, x)):
        x.grad = None
        attention.zero_grad()
        out = forward(x)
        out.square().sum().backward()
        trained = [p.grad.clone() for p in attention.parameters() if p.requires_grad]
        results.append([out.detach(), x.grad.clone()] + trained)
    for value, reference in zip(*results):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-4)


def test_window_attention_asks_no_padded_queries():
    attention = window_attention().requires_grad_(False)
    x = torch.randn(1, 16, 16, 32)  # 16 x 16 in 7 x 7 windows: 21 x 21 padded, 441 tokens for 256
    with profile(record_shapes=True) as trace:
        attention(x)
    queries = sum(event.input_shapes[0][0] * event.input_shapes[0][2] for event in trace.key_averages(group_by_input_shape=True)
                  for _ in range(event.count) if event.key == "aten::_scaled_dot_product_flash_attention_for_cpu")
    assert queries == 256
    (projected,) = [event.input_shapes[1] for event in trace.key_averages(group_by_input_shape=True)
                    if event.key == "aten::addmm" and event.input_shapes[2] == [32, 96] and event.input_shapes[1][0] > 1]
    assert projected == [256, 32]  # qkv on the real tokens (and, apart, one padding token)


def test_window_attention_takes_the_fused_kernel_in_float32_on_cpu_when_biases_are_frozen():
    attention = window_attention().requires_grad_(False)
    x = torch.randn(2, 9, 12, 32, requires_grad=True)
    with profile() as trace:
        attention(x).sum().backward()
    kernels = {event.key for event in trace.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in kernels


@pytest.mark.parametrize("training", [True, False])
def test_window_attention_in_bf16_on_cpu_takes_the_math_kernel_only_for_backward(training):
    attention = window_attention().requires_grad_(False)
    x = torch.randn(2, 9, 12, 32, requires_grad=training)
    with torch.autocast("cpu", dtype=torch.bfloat16), profile() as trace:
        out = attention(x)
    kernels = {event.key for event in trace.key_averages()}
    fused = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert ("aten::_scaled_dot_product_attention_math" in kernels) == training and (fused in kernels) != training
    torch.testing.assert_close(out.float(), attention_reference(attention, x.detach()), rtol=0.05, atol=0.05)


def lora_mlp(recompute_hidden: bool = False) -> tuple[Mlp, torch.Tensor]:
    """A frozen TinyViT MLP with LoRA on fc1 and fc2, as -mod sam_lora builds it, and an input needing grad."""
    torch.manual_seed(0)
    mlp = inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False), Mlp(16, 64))
    mlp.recompute_hidden = recompute_hidden
    return mlp, torch.randn(3, 5, 16, requires_grad=True)


@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("adapted", [True, False])  # LoRA on frozen linears, or full fine-tuning
def test_saved_recipes_give_the_same_output_and_gradients_as_saving_the_tensors(recompute_hidden, adapted):
    mlp, x = lora_mlp(recompute_hidden)
    if not adapted:
        mlp = Mlp(16, 64)
        mlp.recompute_hidden = recompute_hidden
    fc1_calls, results = [], []
    mlp.fc1.register_forward_hook(lambda *args: fc1_calls.append(torch.is_grad_enabled()))
    for context in (contextlib.nullcontext, without_recipes):
        x.grad = None
        mlp.zero_grad()
        with context():
            out = mlp(x)
        out.square().sum().backward()
        trained = [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
        results.append([out.detach(), x.grad.clone()] + trained)
    assert len(results[0]) == (2 + 4 if adapted else 2 + 6)  # output, input gradient, LoRA pairs or all weights
    assert fc1_calls == [True] + [False] * recompute_hidden + [True]  # the rerun in backward runs fc1 once
    for value, reference in zip(*results):
        torch.testing.assert_close(value, reference, rtol=0, atol=0)


@pytest.mark.parametrize("recipes", [True, False])
@pytest.mark.parametrize("recompute_hidden", [False, True])
def test_the_hidden_activations_are_not_kept_for_backward_when_stored_as_recipes(recipes, recompute_hidden):
    mlp, x = lora_mlp(recompute_hidden)
    kept = {}

    def keep(layer: str):
        def hook(module, args, out) -> None:
            kept[layer] = weakref.ref(out)
        return hook

    for layer in ("fc1", "act"):
        mlp.get_submodule(layer).register_forward_hook(keep(layer))
    with contextlib.nullcontext() if recipes else without_recipes():
        out = mlp(x)
    gc.collect()
    # stored as recipes, the 4*dim activations are freed after forward: GELU's output always, fc1's on request
    assert (kept["act"]() is None) == recipes
    assert (kept["fc1"]() is None) == (recipes and recompute_hidden)
    out.sum().backward()


@pytest.mark.parametrize("recompute_hidden", [False, True])
def test_under_bf16_autocast_the_normed_input_is_cast_once_and_kept_as_a_recipe(recompute_hidden):
    mlp, x = lora_mlp(recompute_hidden)  # the rerun of fc1 in backward re-enters the forward's autocast
    take_autocast_inputs_as_given(mlp)
    branch_inputs, results = [], []
    mlp.fc1.lora_A["default"].register_forward_hook(lambda module, args, out: branch_inputs.append(args[0]))
    for context in (contextlib.nullcontext, without_recipes):
        x.grad = None
        mlp.zero_grad()
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(x)
        assert branch_inputs[0].dtype == torch.bfloat16  # cast before the linear, not inside the branch
        cast = weakref.ref(branch_inputs.pop())
        gc.collect()
        assert (cast() is None) == (context is contextlib.nullcontext)  # the LoRA branch kept no copy of its own
        out.float().square().sum().backward()
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad])
    for value, reference in zip(*results):
        torch.testing.assert_close(value, reference, rtol=0, atol=0)
