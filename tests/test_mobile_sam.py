"""MobileSAM (TinyViT) against the official layout and the random-weight fixture in ../shared/reference.

`pytest -s tests/test_mobile_sam.py` prints the max abs differences against the official outputs.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from common.errors import UserError
from models import build_segmenter
from conftest import reference_file
from models.mobile_sam import TINY_VIT_TARGETS
from models.segmenter import Prompts

PROMPT_CASES = {  # fixture output name -> (use points, use box, multimask)
    "points_multimask": (True, False, True),
    "points_single": (True, False, False),
    "box_single": (False, True, False),
    "box_multimask": (False, True, True),
}
HOOKED = ("patch_embed", "layers.0", "layers.1", "layers.2", "layers.3", "neck")
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def load_fixture(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def float_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def official_encoder_input(fixture: dict) -> torch.Tensor:
    """The official encoder input: normalise the uint8 image, then zero-pad the bottom to 1024 x 1024."""
    x = fixture["image_uint8"].permute(2, 0, 1)[None].float()
    x = (x - PIXEL_MEAN) / PIXEL_STD
    height, width = x.shape[-2:]
    return F.pad(x, (0, 1024 - width, 0, 1024 - height))


def fixture_differences(fixture: dict) -> dict[str, float]:
    """Run our MobileSAM on the fixture weights and input; max abs difference per official output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the fixture's thread count (only changes float summation order)
    try:
        model = build_segmenter("mobile_sam", "default", 1024, 1).eval()  # .eval() before loading on purpose
        model.load_state_dict(float_state_dict(fixture["state_dict"]))
        x = official_encoder_input(fixture)
        diffs = {"encoder_input_hash_mismatch": float(hashlib.sha256(x.numpy().tobytes()).hexdigest()
                                                      != fixture["image_encoder_input"]["sha256_of_float32_bytes"])}
        outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.image_encoder.named_modules())
        hooks = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
                 for name in HOOKED]
        with torch.no_grad():
            embeddings = model.image_encoder(x)
            for hook in hooks:
                hook.remove()
            diffs["image_embeddings"] = (embeddings - fixture["image_embeddings"]).abs().max().item()
            for name in HOOKED:  # summaries of intermediates, for diagnosis
                summary = fixture["encoder_intermediates"][f"image_encoder.{name}"]
                flat = outputs[name].reshape(-1)
                sample = flat[::summary["sample_stride"]][:len(summary["sample"])]
                diffs[f"{name}.sample"] = (sample - summary["sample"]).abs().max().item()
                diffs[f"{name}.mean"] = abs(flat.double().mean().item() - summary["mean"])
            image_pe = model.prompt_encoder.get_dense_pe()[:, :, ::8, ::8]
            diffs["image_pe_stride8"] = (image_pe - fixture["image_pe_stride8"]).abs().max().item()
            for case, (points, box, multimask) in PROMPT_CASES.items():
                prompts = Prompts(points=fixture["point_coords"] if points else None,
                                  point_labels=fixture["point_labels"] if points else None,
                                  boxes=fixture["box"] if box else None)
                masks, iou = model.decode_queries(embeddings, prompts, multimask=multimask)
                expected = fixture["outputs"][case]
                diffs[f"{case}.low_res_masks"] = (masks - expected["low_res_masks"]).abs().max().item()
                diffs[f"{case}.iou_predictions"] = (iou - expected["iou_predictions"]).abs().max().item()
        return diffs
    finally:
        torch.set_num_threads(threads)


def test_state_dict_layout_matches_official(shared_dir):
    keys = json.loads(reference_file(shared_dir, "mobilesam_vit_t.keys.json").read_text())
    meta = json.loads(reference_file(shared_dir, "mobilesam_vit_t.meta.json").read_text())
    model = build_segmenter("mobile_sam", "default", 1024, 1)
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == keys
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    assert counts == meta["parameter_counts_top_level"]
    assert sum(counts.values()) == meta["total_parameters"]
    for name, count in meta["parameter_counts_second_level"].items():
        assert sum(p.numel() for p in model.get_submodule(name).parameters()) == count, name


def test_fixture_outputs_match_official(shared_dir):
    fixture = load_fixture(reference_file(shared_dir, "mobilesam_vit_t.fixture.pt"))
    diffs = fixture_differences(fixture)
    print("\nMobileSAM max abs differences vs official:")
    for name, value in diffs.items():
        print(f"  {name}: {value:.3g}")
    assert diffs["encoder_input_hash_mismatch"] == 0.0
    failed = {name: value for name, value in diffs.items() if value > 1e-4}
    assert not failed, f"over 1e-4: {failed}"


def test_official_checkpoint_loads_strictly(shared_dir, tmp_path):
    state_dict = load_fixture(reference_file(shared_dir, "mobilesam_vit_t.fixture.pt"))["state_dict"]
    path = tmp_path / "mobile_sam.pt"
    torch.save(dict(state_dict), path)
    model = build_segmenter("mobile_sam", "default", 1024, 1, checkpoint=str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_other_architecture_checkpoint_is_rejected(tmp_path):
    other = build_segmenter("sam", "vit_b", 64, 1, embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,))
    path = tmp_path / "sam.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(UserError, match="does not fit -net mobile_sam"):
        build_segmenter("mobile_sam", "default", 64, 1, checkpoint=str(path))


def class_prompts(batch: int, classes: int, size: int) -> Prompts:
    g = torch.Generator().manual_seed(batch * 100 + size)
    points = torch.rand(batch, classes, 2, 2, generator=g) * size
    labels = torch.tensor([1, 0]).expand(batch, classes, 2).clone()
    corners = (torch.rand(batch, classes, 2, 2, generator=g) * size).sort(dim=2).values
    return Prompts(points=points, point_labels=labels, boxes=corners.reshape(batch, classes, 4))


def take(prompts: Prompts, index: int) -> Prompts:
    return Prompts(prompts.points[index:index + 1], prompts.point_labels[index:index + 1],
                   prompts.boxes[index:index + 1])


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_sizes_and_batch_two_equal_two_single_images(size):
    torch.manual_seed(0)
    model = build_segmenter("mobile_sam", "default", size, 2).eval()
    images = torch.rand(2, 3, size, size) * 255
    prompts = class_prompts(2, 2, size)
    with torch.no_grad():
        embeddings = model.encode(images)
        logits, iou = model.decode(embeddings, prompts)
        assert embeddings.shape == (2, 256, size // 16, size // 16)
        assert logits.shape == (2, 2, size // 4, size // 4) and iou.shape == (2, 2)
        assert torch.isfinite(logits).all()
        for i in range(2):
            single_logits, single_iou = model(images[i:i + 1], take(prompts, i))
            torch.testing.assert_close(single_logits, logits[i:i + 1], atol=1e-4, rtol=0)
            torch.testing.assert_close(single_iou, iou[i:i + 1], atol=1e-4, rtol=0)
    assert not torch.allclose(logits[0], logits[1])  # the two images really differ


def adapted_names(encoder: torch.nn.Module) -> list[str]:
    return [name for name, module in encoder.named_modules() if hasattr(module, "lora_A")]


def test_adapt_targets_match_official_modules_and_work_with_peft(shared_dir):
    meta = json.loads(reference_file(shared_dir, "mobilesam_vit_t.meta.json").read_text())
    official = [name.removeprefix("image_encoder.") for name, *_ in meta["linear_modules"]
                if name.startswith("image_encoder.") and name != "image_encoder.head"]
    linear_model = build_segmenter("mobile_sam", "default", 64, 1).eval()
    inject_adapter_in_model(LoraConfig(target_modules=TINY_VIT_TARGETS.linears, r=4), linear_model.image_encoder)
    assert adapted_names(linear_model.image_encoder) == official
    conv_model = build_segmenter("mobile_sam", "default", 64, 1).eval()
    inject_adapter_in_model(LoraConfig(target_modules=TINY_VIT_TARGETS.convs, r=4), conv_model.image_encoder)
    assert adapted_names(conv_model.image_encoder) == [
        "patch_embed.seq.0.c", "patch_embed.seq.2.c", "layers.0.blocks.0.conv1.c", "layers.0.blocks.0.conv3.c",
        "layers.0.blocks.1.conv1.c", "layers.0.blocks.1.conv3.c"]
    with torch.no_grad():
        for model in (linear_model, conv_model):
            assert model.encode(torch.rand(1, 3, 64, 64) * 255).shape == (1, 256, 4, 4)
    names = [name for name, _ in build_segmenter("mobile_sam", "default", 64, 1).image_encoder.named_modules()]
    count = lambda pattern: sum(re.fullmatch(pattern, name) is not None for name in names)
    assert count(TINY_VIT_TARGETS.blocks) == 12
    assert count(TINY_VIT_TARGETS.attention) == count(TINY_VIT_TARGETS.mlp) == 10
