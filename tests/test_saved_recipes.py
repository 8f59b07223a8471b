"""SAM's and EfficientSAM's ViT blocks store the inputs of their adapted linears as recipes (saved_tensors):
the same numbers as storing them, and those inputs freed after forward. SAM's window attention runs qkv
and proj on the real tokens only, with segment-anything's numbers."""
from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from functools import partial

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from segment_anything.modeling.image_encoder import Block
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.efficient_sam.encoder import Block as EfficientSamBlock
from models.modes.adaptation import take_autocast_inputs_as_given
from models.sam_vit_blocks import keep_less_for_backward
from models.saved_tensors import without_recipes

DIM, HEADS, SIDE = 32, 4, 6
ADAPTED = {"sam": ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"),
           "efficient_sam": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def randomised(block: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.1)
    return block


def sam_block(window_size: int) -> nn.Module:
    torch.manual_seed(0)
    return randomised(Block(DIM, HEADS, window_size=window_size, use_rel_pos=True, input_size=(SIDE, SIDE)))


def with_lora(block: nn.Module, family: str) -> nn.Module:
    torch.manual_seed(1)
    config = LoraConfig(r=2, target_modules=list(ADAPTED[family]), init_lora_weights=False)
    return take_autocast_inputs_as_given(inject_adapter_in_model(config, block))


def lean_lora_block(kind: str) -> tuple[nn.Module, str, torch.Tensor]:
    """A frozen block with LoRA on its four linears, as -mod sam_lora builds it, and an input needing grad."""
    if kind == "efficient_sam":
        torch.manual_seed(0)
        block, family, x = randomised(EfficientSamBlock(DIM, HEADS, mlp_ratio=4.0)), kind, torch.randn(2, SIDE * SIDE, DIM)
    else:  # sam windowed (5-token windows: padded) or global
        block, family, x = keep_less_for_backward(sam_block(5 if kind == "sam_windowed" else 0)), "sam", torch.randn(2, SIDE, SIDE, DIM)
    return with_lora(block, family), family, x.requires_grad_()


KINDS = ["sam_windowed", "sam_global", "efficient_sam"]


def output_and_gradients(block: nn.Module, x: torch.Tensor, context, amp: bool) -> list[torch.Tensor]:
    x.grad = None
    block.zero_grad()
    with context(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = block(x)
    out.float().square().sum().backward()
    return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters() if p.requires_grad]


@pytest.mark.parametrize("window_size", [0, 5, 6])  # global; 6 x 6 tokens in padded windows; in whole ones
def test_the_lean_sam_block_gives_segment_anythings_numbers(window_size):
    reference = with_lora(sam_block(window_size), "sam")
    lean = with_lora(keep_less_for_backward(sam_block(window_size)), "sam")
    assert lean.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, SIDE, SIDE, DIM, requires_grad=True)
    tokens = {}
    for name, block in (("reference", reference), ("lean", lean)):
        for part in ("qkv", "proj"):
            block.attn.get_submodule(part).register_forward_pre_hook(
                lambda module, args, key=(name, part): tokens.setdefault(key, []).append(args[0].shape[:-1].numel()))
    results = [output_and_gradients(block, x, contextlib.nullcontext, amp=False) for block in (reference, lean)]
    assert len(results[0]) == 2 + 8  # output, input gradient, four LoRA pairs
    for value, expected in zip(*results):  # qkv and proj see other matrix shapes: float rounding only
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    real = 2 * SIDE * SIDE
    padded = real if window_size in (0, SIDE) else 2 * 10 * 10  # 6 x 6 tokens padded to 2 x 2 windows of 5
    assert tokens[("reference", "qkv")] == [padded] and tokens[("reference", "proj")] == [padded]
    # the lean block: qkv on the real tokens (and one zero token for the padding), proj on the real tokens
    assert tokens[("lean", "qkv")] == ([real] if padded == real else [real, 1]) and tokens[("lean", "proj")] == [real]


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_recipes_give_the_same_output_and_gradients_as_saving_the_tensors(kind, amp):
    block, _, x = lean_lora_block(kind)
    results = [output_and_gradients(block, x, context, amp) for context in (contextlib.nullcontext, without_recipes)]
    for value, expected in zip(*results):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("recipes", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_the_adapted_linears_inputs_are_freed_after_forward(kind, recipes, amp):
    block, family, x = lean_lora_block(kind)
    kept = {}

    def keep_first_input(name: str):  # the real input: SAM's window attention then feeds qkv one zero token
        def hook(module, args) -> None:
            kept.setdefault(name, weakref.ref(args[0].untyped_storage()))
        return hook

    for name in ADAPTED[family]:
        block.get_submodule(name).register_forward_pre_hook(keep_first_input(name))
    with contextlib.nullcontext() if recipes else without_recipes(), torch.autocast("cpu", enabled=amp):
        out = block(x)
    gc.collect()
    # proj's input is kept: EfficientSAM's is a view of the output the fused attention kernel keeps for its
    # own backward (laid out token-major); SAM's would take the attention's product again (sam_vit_blocks)
    assert {name: ref() is None for name, ref in kept.items()} == {name: recipes and name != "attn.proj"
                                                                   for name in ADAPTED[family]}
    out.float().sum().backward()


def test_keeping_less_leaves_every_other_module_and_key_as_it_was():
    plain, lean = sam_block(5), keep_less_for_backward(sam_block(5))
    assert [name for name, _ in lean.named_modules()] == [name for name, _ in plain.named_modules()]
    assert all(torch.equal(a, b) for a, b in zip(lean.state_dict().values(), plain.state_dict().values()))
    assert isinstance(lean, Block) and type(lean) is not Block
    assert keep_less_for_backward(copy.deepcopy(lean)).__class__ is type(lean)  # idempotent


def test_the_lean_sam_encoder_gives_segment_anythings_encoder_output():
    """A tiny SAM ViT at 96 px (a 6 x 6 grid: windowed blocks pad it to 14 x 14) and at 224 px (whole windows)."""
    from segment_anything.modeling import ImageEncoderViT

    from models.sam import sam_vit_encoder

    arch = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
    for size in (96, 224):
        lean = sam_vit_encoder(size, **arch)
        plain = ImageEncoderViT(img_size=size, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4,
                                out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                use_rel_pos=True, window_size=14, global_attn_indexes=(1,))
        assert type(plain.blocks[0]) is Block and type(lean.blocks[0]) is not Block
        with torch.no_grad():
            for param in plain.parameters():
                param.normal_(0, 0.1)
        lean.load_state_dict(plain.state_dict())
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(lean(images), plain(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sam", "efficient_sam"])
def test_the_encoder_blocks_work_on_token_major_memory(family: str) -> None:
    """The patch embedding's permuted conv output is made contiguous once: otherwise every residual sum keeps
    the conv's channel-major layout and each block's LayerNorms copy their inputs."""
    from models.efficient_sam.encoder import EfficientSamViT
    from models.sam import sam_vit_encoder

    torch.manual_seed(0)
    encoder = (sam_vit_encoder(64, DIM, depth=2, num_heads=HEADS, global_attn_indexes=(1,)) if family == "sam"
               else EfficientSamViT(DIM, depth=2, num_heads=HEADS))
    layouts = []
    for module in encoder.blocks.modules():
        if isinstance(module, nn.LayerNorm):
            module.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous()))
    embeddings = encoder(torch.randn(2, 3, 64, 64))
    assert layouts == [True] * 4  # two blocks, two norms each
    assert embeddings.shape == (2, 256, 4, 4)


class WeightCopies(TorchDispatchMode):
    """Counts the copies made of tensors shaped like the given weights."""

    def __init__(self, shapes: list[torch.Size]):
        super().__init__()
        self.shapes, self.copies = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            self.copies += any(arg.shape in self.shapes for arg in args if isinstance(arg, torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["sam", "efficient_sam", "tiny_vit"])
def test_the_neck_keeps_its_weights_in_the_layout_of_its_input(family: str) -> None:
    """The neck gets its maps channels-last; a 3x3 weight in the other layout was copied at every call."""
    from models.efficient_sam.encoder import EfficientSamViT
    from models.sam import sam_vit_encoder
    from models.tiny_vit import TinyViT

    torch.manual_seed(0)
    encoder = {"sam": lambda: sam_vit_encoder(64, DIM, depth=1, num_heads=HEADS, global_attn_indexes=(0,)),
               "efficient_sam": lambda: EfficientSamViT(DIM, depth=1, num_heads=HEADS),
               "tiny_vit": lambda: TinyViT(image_size=64, embed_dims=(16, 16, 16, 16), depths=(1, 1, 1, 1),
                                           num_heads=(1, 2, 2, 2), window_sizes=(4, 4, 4, 4))}[family]()
    weights = [conv.weight for conv in encoder.neck if isinstance(conv, nn.Conv2d)]
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    with WeightCopies([weight.shape for weight in weights]) as counted:
        encoder(images).sum().backward()
    assert counted.copies == 0
