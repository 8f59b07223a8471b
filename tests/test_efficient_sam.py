"""EfficientSAM (ViT-T / ViT-S) against the official layout and the random-weight fixture in ../shared/reference.

`pytest -s tests/test_efficient_sam.py` prints the max abs differences against the official outputs.
"""
from __future__ import annotations

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
from models.efficient_sam import EFFICIENT_SAM_TARGETS
from models.efficient_sam.prompt_encoder import MAX_POINTS, prompt_points
from models.registry import resolve_encoder
from models.segmenter import Prompts

TOLERANCE = 1e-4
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def to_model_frame(xy: torch.Tensor, height: int, width: int, size: int = 1024) -> torch.Tensor:
    """Pixel xy of a height x width image -> pixels of the stretched size x size model input."""
    return torch.stack([xy[..., 0] * size / width, xy[..., 1] * size / height], dim=-1)


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("encoder", ["vit_t", "vit_s"])
def test_state_dict_matches_official_layout(shared_dir: Path, encoder: str) -> None:
    name = f"efficientsam_{encoder}"
    keys = json.loads(reference_file(shared_dir, f"{name}.keys.json").read_text())
    meta = json.loads(reference_file(shared_dir, f"{name}.meta.json").read_text())
    model = build_segmenter("efficient_sam", encoder, 64, 1)
    layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert layout == keys
    assert sum(p.numel() for p in model.parameters()) == meta["total_parameters"]
    for level in ("parameter_counts_top_level", "parameter_counts_second_level"):
        for prefix, count in meta[level].items():
            assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + ".") or n == prefix) \
                == count, prefix
    buffers = dict(model.named_buffers())
    assert sorted(n for n in buffers if n in model.state_dict()) == meta["persistent_buffers"]
    for buffer, shape, _ in meta["non_persistent_buffers_not_in_state_dict"]:
        assert list(buffers[buffer].shape) == shape


def test_default_encoder_is_vit_s() -> None:
    assert resolve_encoder("efficient_sam", "default") == "vit_s"


def test_adapt_targets_match_encoder_linears(shared_dir: Path) -> None:
    meta = json.loads(reference_file(shared_dir, "efficientsam_vit_t.meta.json").read_text())
    prefix = "image_encoder."
    official = {n[len(prefix):] for n, *_ in meta["linear_modules"] if n.startswith(prefix)}
    encoder = build_segmenter("efficient_sam", "vit_t", 64, 1).image_encoder
    names = [n for n, _ in encoder.named_modules()]
    matching = lambda pattern: {n for n in names if re.fullmatch(pattern, n)}
    depth = len(encoder.blocks)
    assert matching(EFFICIENT_SAM_TARGETS.attention) == {f"blocks.{i}.attn" for i in range(depth)}
    assert matching(EFFICIENT_SAM_TARGETS.mlp) == {f"blocks.{i}.mlp" for i in range(depth)}
    assert matching(EFFICIENT_SAM_TARGETS.blocks) == {f"blocks.{i}" for i in range(depth)}
    assert matching(EFFICIENT_SAM_TARGETS.linears) == official
    assert EFFICIENT_SAM_TARGETS.convs == ""
    inject_adapter_in_model(LoraConfig(target_modules=EFFICIENT_SAM_TARGETS.linears, r=4), encoder)
    wrapped = {n for n, m in encoder.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == official


# ---------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def fixture_run(shared_dir: Path) -> dict:
    """Our ViT-T at 1024 with the fixture weights, and its embeddings of the official encoder input."""
    fixture = torch.load(reference_file(shared_dir, "efficientsam_vit_t.fixture.pt"), weights_only=True)
    model = build_segmenter("efficient_sam", "vit_t", 1024, 1).eval()
    model.load_state_dict({k: v.float() for k, v in fixture["state_dict"].items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the fixture's thread count (bilinear resize and summation order)
    try:
        image = fixture["image_uint8"].permute(2, 0, 1)[None]
        official_input = F.interpolate(image.float() / 255, (1024, 1024), mode="bilinear")
        official_input = (official_input - IMAGENET_MEAN) / IMAGENET_STD
        stretched = F.interpolate(image.float(), (1024, 1024), mode="bilinear")  # 0..255, as the toolkit feeds
        with torch.no_grad():
            embeddings = model.image_encoder(official_input)
            encoded = model.encode(stretched)
    finally:
        torch.set_num_threads(threads)
    return dict(fixture=fixture, model=model, input=official_input, embeddings=embeddings, encoded=encoded)


def report(what: str, diff: float) -> float:
    print(f"efficient_sam vit_t fixture: max |diff| {what}: {diff:.3g}")
    return diff


def test_fixture_encoder_input(fixture_run: dict) -> None:
    described = fixture_run["fixture"]["image_encoder_input"]
    x = fixture_run["input"]
    assert list(x.shape) == described["shape"]
    assert x.double().sum().item() == pytest.approx(described["sum"], abs=1e-2)
    assert max_diff(x[0, :, :16, :16], described["crop_rows_0_16_cols_0_16"]) < 1e-5
    assert max_diff(x[0, :, -16:, -16:], described["crop_rows_1008_1024_cols_1008_1024"]) < 1e-5


def test_fixture_image_embeddings(fixture_run: dict) -> None:
    expected = fixture_run["fixture"]["image_embeddings"]
    assert report("image_embeddings", max_diff(fixture_run["embeddings"], expected)) < TOLERANCE
    assert report("image_embeddings via encode()", max_diff(fixture_run["encoded"], expected)) < TOLERANCE


def test_fixture_prompt_encoder(fixture_run: dict) -> None:
    fixture, model = fixture_run["fixture"], fixture_run["model"]
    height, width = fixture["input_hw"]
    points = to_model_frame(fixture["batched_points"][0], height, width)
    points[fixture["batched_point_labels"][0] < 0] = -1.0
    assert max_diff(points, fixture["rescaled_points"][0]) < 1e-4
    padded = F.pad(fixture["rescaled_points"][0], (0, 0, 0, MAX_POINTS - 3), value=-1.0)
    labels = F.pad(fixture["batched_point_labels"][0], (0, MAX_POINTS - 3), value=-1)
    with torch.no_grad():
        sparse = model.prompt_encoder(padded, labels)
        dense_pe = model.prompt_encoder.dense_pe(64, 64)
    assert report("sparse_embeddings (both queries)", max_diff(sparse, fixture["sparse_embeddings"])) < TOLERANCE
    assert max_diff(dense_pe[..., ::8, ::8], fixture["image_pe_stride8"]) < TOLERANCE


def fixture_prompts(fixture: dict) -> list[Prompts]:
    """Query 0 (three clicks) and query 1 (a box) in the 1024 x 1024 model frame, as toolkit Prompts."""
    height, width = fixture["input_hw"]
    clicks = Prompts(points=to_model_frame(fixture["point_coords"][0], height, width),
                     point_labels=fixture["point_labels"][0])
    box = Prompts(boxes=to_model_frame(fixture["box"].view(1, 2, 2), height, width).view(1, 4))
    return [clicks, box]


def test_fixture_prompts_through_api(fixture_run: dict) -> None:
    fixture, model = fixture_run["fixture"], fixture_run["model"]
    for query, prompts in enumerate(fixture_prompts(fixture)):
        points, labels = prompt_points(prompts, 1, 1024)
        with torch.no_grad():
            sparse = model.prompt_encoder(points, labels)
        assert labels[0].tolist() == F.pad(fixture["batched_point_labels"][0, query], (0, 3), value=-1).tolist()
        assert report(f"sparse_embeddings query {query} via Prompts",
                      max_diff(sparse[0], fixture["sparse_embeddings"][query])) < TOLERANCE


@pytest.mark.parametrize("mode", ["multimask", "single"])
def test_fixture_mask_decoder(fixture_run: dict, mode: str) -> None:
    """Official sparse embeddings and image embeddings into our decoder (both queries at once)."""
    fixture, model = fixture_run["fixture"], fixture_run["model"]
    expected = fixture["outputs"][mode]
    with torch.no_grad():
        masks, iou = model.mask_decoder(fixture["image_embeddings"].expand(2, -1, -1, -1),
                                        model.prompt_encoder.dense_pe(64, 64), fixture["sparse_embeddings"],
                                        multimask_output=mode == "multimask")
    assert report(f"low_res_masks {mode} (decoder)", max_diff(masks, expected["low_res_masks"][0])) < TOLERANCE
    assert report(f"iou_predictions {mode} (decoder)", max_diff(iou, expected["iou_predictions"][0])) < TOLERANCE


@pytest.mark.parametrize("mode", ["multimask", "single"])
@pytest.mark.parametrize("source", ["official", "ours"])
def test_fixture_decode_queries(fixture_run: dict, mode: str, source: str) -> None:
    """Each fixture query through decode_queries, from the official embeddings or from our own."""
    fixture, model = fixture_run["fixture"], fixture_run["model"]
    expected = fixture["outputs"][mode]
    embeddings = fixture["image_embeddings"] if source == "official" else fixture_run["embeddings"]
    for query, prompts in enumerate(fixture_prompts(fixture)):
        with torch.no_grad():
            masks, iou = model.decode_queries(embeddings, prompts, multimask=mode == "multimask")
        what = f"{mode} query {query} via decode_queries, {source} embeddings"
        assert report(f"low_res_masks {what}", max_diff(masks[0], expected["low_res_masks"][0, query])) < TOLERANCE
        assert report(f"iou_predictions {what}", max_diff(iou[0], expected["iou_predictions"][0, query])) < TOLERANCE


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_loading(shared_dir: Path, tmp_path: Path) -> None:
    fixture = torch.load(reference_file(shared_dir, "efficientsam_vit_t.fixture.pt"), weights_only=True)
    official = tmp_path / "efficient_sam_vitt.pt"
    torch.save({"model": fixture["state_dict"], "epoch": 1}, official)
    model = build_segmenter("efficient_sam", "vit_t", 64, 1, checkpoint=str(official))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in fixture["state_dict"].items())

    with pytest.raises(UserError, match="shape mismatches"):  # ViT-T weights into the default ViT-S
        build_segmenter("efficient_sam", "default", 64, 1, checkpoint=str(official))
    mobile_like = tmp_path / "mobile_sam.pt"
    torch.save({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3),
                "mask_decoder.transformer.layers.0.mlp.lin1.weight": torch.zeros(2048, 256)}, mobile_like)
    with pytest.raises(UserError, match="missing keys"):
        build_segmenter("efficient_sam", "vit_t", 64, 1, checkpoint=str(mobile_like))


# ---------------------------------------------------------------- toolkit use


def test_prompt_points_conventions() -> None:
    clicks = torch.tensor([[[0.0, 0.0], [10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [1.0, 2.0], [3.0, 4.0]]])
    labels = torch.tensor([[-1, 1, 0, 1, 1, 0]])
    box = torch.tensor([[8.0, 16.0, 32.0, 48.0]])
    points, out_labels = prompt_points(Prompts(clicks, labels, box), 1, 64)
    assert out_labels.tolist() == [[1, 0, 1, 1, 2, 3]]  # padding moved out, four clicks kept, box kept
    assert points[0, :4].tolist() == (clicks[0, 1:5] * 16).tolist()
    assert points[0, 4:].tolist() == [[128.0, 256.0], [512.0, 768.0]]
    points, out_labels = prompt_points(Prompts(), 3, 64)
    assert out_labels.tolist() == [[-1] * MAX_POINTS] * 3 and (points == -1).all()
    points, out_labels = prompt_points(Prompts(clicks[:, :2], labels[:, :2]), 1, 256)
    assert out_labels.tolist() == [[1, -1, -1, -1, -1, -1]]
    assert points[0, 0].tolist() == [40.0, 80.0] and (points[0, 1:] == -1).all()


@pytest.mark.parametrize("size", [256, 64])
def test_small_images_batch_and_classes(size: int) -> None:
    torch.manual_seed(0)
    model = build_segmenter("efficient_sam", "vit_t", size, 2).eval()
    images = torch.rand(2, 3, size, size) * 255
    points = torch.rand(2, 2, 3, 2) * size
    labels = torch.tensor([[[1, 0, -1], [1, 1, 1]], [[0, 1, 1], [-1, -1, 1]]])
    boxes = torch.tensor([[[2.0, 4.0, size / 2, size / 2], [0.0, 0.0, size - 1, size - 1]]]).expand(2, -1, -1)
    grid = size // 16
    for prompts in (Prompts(points, labels, boxes), Prompts(points, labels), Prompts(boxes=boxes), Prompts()):
        with torch.no_grad():
            embeddings = model.encode(images)
            logits, iou = model.decode(embeddings, prompts)
            assert embeddings.shape == (2, 256, grid, grid)
            assert logits.shape == (2, 2, 4 * grid, 4 * grid) and iou.shape == (2, 2)
            for b in range(2):
                single = Prompts(*(None if t is None else t[b:b + 1] for t in (prompts.points, prompts.point_labels,
                                                                            prompts.boxes)))
                one_logits, one_iou = model(images[b:b + 1], single)
                assert max_diff(one_logits[0], logits[b]) < 1e-4 and max_diff(one_iou[0], iou[b]) < 1e-5
        assert not torch.equal(logits[:, 0], logits[:, 1])  # classes read different mask tokens


def test_gradients_reach_every_trainable_part() -> None:
    model = build_segmenter("efficient_sam", "vit_t", 64, 1, depth=2)
    points = torch.tensor([[[[20.0, 30.0]]]])
    logits, iou = model(torch.rand(1, 3, 64, 64) * 255, Prompts(points, torch.ones(1, 1, 1, dtype=torch.long)))
    (logits.mean() + iou.mean()).backward()
    for part in ("image_encoder.pos_embed", "image_encoder.blocks.1.attn.qkv.weight",
                 "prompt_encoder.point_embeddings.weight", "mask_decoder.iou_prediction_head.fc.weight"):
        assert model.get_parameter(part).grad is not None, part


# ----------------------------------------------------------------------------- official geometry: stretched
def test_padded_input_follows_the_official_stretch_and_maps_back() -> None:
    """EfficientSAM's official pipeline resizes the image to the square input without keeping the aspect
    ratio and rescales prompts per axis (x * S / W, y * S / H); the toolkit's padded frame must give the same
    encoder input and, mapped back, the same logits."""
    torch.manual_seed(0)
    size, height, width = 64, 40, 64  # a 40 x 64 image zero-padded at the bottom of the 64 x 64 frame
    model = build_segmenter("efficient_sam", "vit_t", size, 1, embed_dim=32, num_heads=2, depth=2).eval()
    image = torch.rand(1, 3, height, width) * 255
    padded = F.pad(image, (0, 0, 0, size - height))
    valid_hw = torch.tensor([[height, width]])
    click = torch.tensor([[[[30.0, 20.0]]]])
    seen = {}
    model.image_encoder.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        logits, iou = model(padded, Prompts(points=click, point_labels=torch.ones(1, 1, 1)), valid_hw=valid_hw)
        # the official way, written out: stretch, normalise, prompts scaled per axis, decode in that frame
        stretched = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False) / 255
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        expected_input = (stretched - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        torch.testing.assert_close(seen["x"], expected_input, atol=1e-5, rtol=0)
        scaled = click * torch.tensor([size / width, size / height])
        official, official_iou = model.decode(model.image_encoder(expected_input),
                                              Prompts(points=scaled, point_labels=torch.ones(1, 1, 1)))
    frame = logits.shape[-1]
    rows = round(height * frame / size)
    back = F.interpolate(official, size=(rows, frame), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits[..., :rows, :], back, atol=1e-4, rtol=0)
    assert torch.all(logits[..., rows:, :] < -1e3)  # the padding is background
    torch.testing.assert_close(iou, official_iou)
