"""-mod sam_adpt: where each Adapter sits, per encoder, against a hand-built reference block.

The serial Adapter acts on the attention's output (a = attn(.) ; a + adapter(a)); the parallel one sits
beside the MLP and reads the MLP's input (mlp(h) + adapter(h)). Each test rebuilds one adapted block's
forward from its submodules (called through `.forward`, which skips the hooks) with non-zero adapter
weights, so feeding the MLP adapter the MLP's output, or the attention adapter the attention's input,
makes the comparison fail.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import build_segmenter
from models.modes import apply_mode

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
TINY_VIT = dict(embed_dims=(16, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                window_sizes=(4, 4, 4, 4))
NETS = {  # name -> (builder arguments, the block to check)
    "sam": (("sam", "vit_b", SIZE, 1), dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)),
            "blocks.1"),
    "mobile_sam": (("mobile_sam", "tiny_vit", SIZE, 1), TINY_VIT, "layers.1.blocks.0"),
    "lite_medsam": (("lite_medsam", "tiny_vit", SIZE, 1), TINY_VIT, "layers.1.blocks.0"),
    "efficient_sam": (("efficient_sam", "vit_t", SIZE, 1), dict(embed_dim=32, depth=2, num_heads=2), "blocks.1"),
}


def adapted_block(net: str) -> nn.Module:
    args, overrides, block_name = NETS[net]
    torch.manual_seed(0)
    model = build_segmenter(*args, **overrides)
    apply_mode(model, "sam_adpt", 10, mid_dim=None, decoder="full")
    block = model.image_encoder.get_submodule(block_name)
    assert isinstance(block.attn.adapter, nn.Module) and isinstance(block.mlp.adapter, nn.Module)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the up-projections start at zero: make both adapters act
        for name, param in block.named_parameters():
            if ".adapter." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return block.eval()


def adapter(module: nn.Module, x: Tensor) -> Tensor:
    a = module.adapter
    return a.up(F.gelu(a.down(x)))  # written out: down, exact GELU, up


def reference_sam(block: nn.Module, x: Tensor) -> Tensor:
    assert block.window_size == 0  # a global-attention block: no window partition to rebuild
    a = block.attn.forward(block.norm1(x))
    x = x + a + adapter(block.attn, a)
    h = block.norm2(x)
    return x + block.mlp.forward(h) + adapter(block.mlp, h)


def reference_efficient_sam(block: nn.Module, x: Tensor) -> Tensor:
    a = block.attn.forward(block.norm1(x))
    x = x + a + adapter(block.attn, a)
    h = block.norm2(x)
    return x + block.mlp.forward(h) + adapter(block.mlp, h)


def reference_tiny_vit(block: nn.Module, x: Tensor) -> Tensor:
    a = block.attn.forward(x)  # WindowAttention norms its input and windows it itself
    x = x + a + adapter(block.attn, a)
    x = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return x + block.mlp.forward(x) + adapter(block.mlp, x)  # the Mlp norms its input itself


REFERENCES = {"sam": reference_sam, "mobile_sam": reference_tiny_vit, "lite_medsam": reference_tiny_vit,
              "efficient_sam": reference_efficient_sam}


def block_input(net: str, block: nn.Module) -> Tensor:
    g = torch.Generator().manual_seed(5)
    if net == "efficient_sam":
        return torch.randn(2, 16, block.norm1.normalized_shape[0], generator=g)  # B x N x D tokens
    dim = block.mlp.adapter.down.in_features
    side = 8 if net in ("mobile_sam", "lite_medsam") else 4
    return torch.randn(2, side, side, dim, generator=g)  # B x H x W x C


@pytest.mark.parametrize("net", tuple(NETS))
def test_adapters_sit_after_attention_and_beside_the_mlp(net: str) -> None:
    block = adapted_block(net)
    x = block_input(net, block)
    with torch.no_grad():
        got = block(x)
        want = REFERENCES[net](block, x)
        for module in (block.attn, block.mlp):  # sanity: the perturbed adapters change the block's output
            module.adapter.up.weight.zero_()
            module.adapter.up.bias.zero_()
        unadapted = block(x)
    assert (want - unadapted).abs().max() > 1e-2, "the perturbed adapters do not change the block"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
