"""The lean mask decoder and fused LayerNorm2d against segment-anything's own modules."""
from __future__ import annotations

import copy

import torch
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d as SegmentAnythingLayerNorm2d
from segment_anything.modeling.transformer import TwoWayAttentionBlock

from models.layer_norm_2d import LayerNorm2d
from models.sam_decoder import sam_mask_decoder, sam_prompt_encoder


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.1)
    return module


def segment_anythings_classes(decoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of `decoder` whose transformer and norms run segment-anything's own forward."""
    original = copy.deepcopy(decoder)
    for module in original.modules():
        for base in (TwoWayTransformer, TwoWayAttentionBlock, SegmentAnythingLayerNorm2d):
            if isinstance(module, base):
                module.__class__ = base
    return original


def decoder_inputs(size: int = 64, batch: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(1)
    prompts = sam_prompt_encoder(size)
    points = (torch.rand(batch, 1, 2) * size, torch.ones(batch, 1, dtype=torch.int))
    with torch.no_grad():
        sparse, dense = prompts(points=points, boxes=None, masks=None)
        embeddings = torch.randn(batch, 256, size // 16, size // 16)
        return [t.double() for t in (embeddings, prompts.get_dense_pe(), sparse, dense)]


def outputs_and_gradients(decoder: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    embeddings = inputs[0].clone().requires_grad_()
    masks, iou = decoder(embeddings, inputs[1], inputs[2], inputs[3], multimask_output=True)
    loss = masks.sin().sum() + iou.sum()
    return [masks, iou, *torch.autograd.grad(loss, [embeddings, *decoder.parameters()])]


def test_layer_norm_2d_gives_segment_anythings_numbers_and_gradients():
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for norm_class in (SegmentAnythingLayerNorm2d, LayerNorm2d):
        norm = randomised(norm_class(6)).double()
        out = norm(x)
        results.append([out, *torch.autograd.grad(out.sin().sum(), [x, *norm.parameters()])])
    for value, expected in zip(*results):
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    assert LayerNorm2d(6).state_dict().keys() == SegmentAnythingLayerNorm2d(6).state_dict().keys()


def test_the_lean_decoder_gives_segment_anythings_numbers_and_gradients():
    lean = randomised(sam_mask_decoder()).double()
    original = segment_anythings_classes(lean)
    assert type(original.transformer) is TwoWayTransformer and type(lean.transformer) is not TwoWayTransformer
    assert lean.state_dict().keys() == original.state_dict().keys()
    inputs = decoder_inputs()
    for value, expected in zip(outputs_and_gradients(lean, inputs), outputs_and_gradients(original, inputs)):
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-11)


def saved_bytes(decoder: torch.nn.Module, inputs: list[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps after the decoder's forward."""
    params = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    kept = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    embeddings = inputs[0].clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(embeddings, *inputs[1:], multimask_output=True)
    return sum(kept.values())


def test_the_position_sums_are_not_kept():
    """Five sums of image tokens and position encoding (two per block, one for the final attention) were
    each kept by the projection taking them; the fused norms keep one tensor where two were kept."""
    lean = randomised(sam_mask_decoder())
    inputs = [t.float() for t in decoder_inputs(size=128, batch=2)]
    image_tokens = inputs[0].numel() * 4
    saved = {name: saved_bytes(decoder, inputs) for name, decoder in
             (("lean", lean), ("segment_anything", segment_anythings_classes(lean)))}
    assert saved["segment_anything"] - saved["lean"] >= 5 * image_tokens
