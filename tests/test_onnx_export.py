"""ONNX export of LoRA-merged segmenters, checked with onnxruntime against PyTorch.

Each case: build the net at 64 px, apply -mod sam_lora, perturb lora_B (peft starts it at zero, which
would leave the merge a no-op), merge, export both graphs, then compare at batch 1 and 2 (the graphs
are traced at batch 3, so both exercise the dynamic batch axis).

Which decoder paths run (each decoder export costs several CPU seconds in torch.export, so the test
keeps one export per path rather than the full product): MobileSAM and SAM share the prompt encoder and
mask decoder code, which runs click with 1 class, box with 2 classes and no prompt with 2 classes;
EfficientSAM's own prompt encoder and decoder run click with 2 classes and box with 1 class. Each net's
encoder (LoRA merged) is checked in every one of its cases. `pytest -s` prints the differences.
"""
from __future__ import annotations

import onnx
import pytest
import torch

from cfg import Config
from models import build_segmenter
from models.merge import merge_adapters
from engine.session import mode_options
from models.modes import apply_mode
from models.onnx_export import check_onnx, export_onnx

SIZE = 64
TOLERANCE = 1e-4
NUM_POINTS = 8  # more than EfficientSAM's 6 prompt points: which clicks it keeps depends on a stable sort
NETS = {
    "mobile_sam": ("mobile_sam", "tiny_vit", {}),
    "sam-tiny": ("sam", "vit_b", dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))),
    "efficient_sam": ("efficient_sam", "vit_t", {}),
}
CASES = [("mobile_sam", "click", 1), ("mobile_sam", "box", 2), ("efficient_sam", "click", 2),
         ("efficient_sam", "box", 1), ("sam-tiny", "none", 2)]
DECODER_INPUTS = {"click": ["embeddings", "points", "point_labels"], "box": ["embeddings", "boxes"],
                  "none": ["embeddings"]}
# Padding clicks (-1) sit between real ones. EfficientSAM stably moves them last and keeps the first six
# points: class 0 has seven real clicks, so its last one is dropped, and only a stable sort (in PyTorch and
# in the exported graph) drops that same one.
LABELS = torch.tensor([[1, 0, -1, 1, 0, 1, 1, 0], [1, -1, 1, 0, 0, 1, 0, -1]])


pytestmark = pytest.mark.usefixtures("one_thread")


def merged_model(net: str, num_classes: int) -> torch.nn.Module:
    """The seed-0 net with sam_lora applied, lora_B perturbed, merged and in eval mode."""
    family, encoder, arch = NETS[net]
    torch.manual_seed(0)
    model = build_segmenter(family, encoder, SIZE, num_classes, **arch).eval()
    probe = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 255
    with torch.no_grad():
        base = model.encode(probe)
    adaptation = apply_mode(model, "sam_lora", 10, **mode_options(Config(mod="sam_lora")))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b
        for param in lora_b:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        adapted = model.encode(probe)
    merge_adapters(adaptation)
    model.eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        merged = model.encode(probe)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the encoder ...
    assert (merged - adapted).abs().max() < 1e-4  # ... and the merged linears reproduce it
    return model


def sample_inputs(prompt: str, batch: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"images": torch.rand(batch, 3, SIZE, SIZE, generator=generator) * 255}
    if prompt == "click":
        inputs["points"] = torch.rand(batch, num_classes, NUM_POINTS, 2, generator=generator) * (SIZE - 1)
        inputs["point_labels"] = LABELS[:num_classes].expand(batch, -1, -1).clone()
    elif prompt == "box":
        corners = torch.rand(batch, num_classes, 2, 2, generator=generator) * (SIZE - 1)
        inputs["boxes"] = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    return inputs


def batch_axis(graph: onnx.ModelProto) -> set[str]:
    """The symbolic names of axis 0 of every graph input and output (empty string: a fixed size)."""
    values = list(graph.graph.input) + list(graph.graph.output)
    return {v.type.tensor_type.shape.dim[0].dim_param for v in values}


@pytest.mark.parametrize("net, prompt, num_classes", CASES)
def test_export_matches_pytorch(tmp_path, net: str, prompt: str, num_classes: int) -> None:
    model = merged_model(net, num_classes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = export_onnx(model, tmp_path, prompt, num_points=NUM_POINTS)
    assert not model.training  # exporting leaves the segmenter as it was
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sorted(paths) == ["image_encoder", "mask_decoder"]

    encoder, decoder = onnx.load(paths["image_encoder"]), onnx.load(paths["mask_decoder"])
    assert [i.name for i in encoder.graph.input] == ["images"]
    assert [i.name for i in decoder.graph.input] == DECODER_INPUTS[prompt]
    assert [o.name for o in decoder.graph.output] == ["logits", "iou"]
    for graph in (encoder, decoder):
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        names = batch_axis(graph)
        assert len(names) == 1 and "" not in names, names  # one symbolic batch axis everywhere

    for batch in (1, 2):
        inputs = sample_inputs(prompt, batch, num_classes, seed=batch)
        diffs = check_onnx(model, paths, inputs)
        print(f"{net} {prompt} classes={num_classes} batch={batch}: "
              + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
        assert set(diffs) == {"embeddings", "logits", "iou", "logits_chained", "iou_chained"}
        assert all(value < TOLERANCE for value in diffs.values()), diffs


def test_refuses_bad_prompt_and_training_mode(tmp_path) -> None:
    family, encoder, arch = NETS["sam-tiny"]
    model = build_segmenter(family, encoder, SIZE, 1, **arch)
    with pytest.raises(ValueError, match="eval-mode"):
        export_onnx(model, tmp_path, "click")
    with pytest.raises(ValueError, match="prompt must be one of"):
        export_onnx(model.eval(), tmp_path, "mask")
    assert not list(tmp_path.iterdir())
