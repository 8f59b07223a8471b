"""Loading an official-layout SAM ViT-B checkpoint (segment-anything's flat sam_vit_b state_dict).

The checkpoint is built from ../shared/reference/sam_vit_b.keys.json: zeros for most tensors (fast),
random values for the absolute position embedding and the relative-position tables, which are the
tensors that must be resized when the model runs below 1024 px.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import missing
import torch
import torch.nn.functional as F

from common.errors import UserError
from models import build_segmenter
from models.registry import read_checkpoint_file

GLOBAL_BLOCKS = (2, 5, 8, 11)  # vit_b's global-attention blocks; the others use 14 x 14 windows
DIM, HEAD_DIM = 768, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layout(shared_dir: Path) -> list:
    path = shared_dir / "reference" / "sam_vit_b.keys.json"
    if not path.is_file():
        missing(f"{path} is missing")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def official(layout: list, tmp_path_factory) -> tuple[dict, Path]:
    """(state dict, path of its flat torch.save file) in the official sam_vit_b layout."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in layout:
        if key == "image_encoder.pos_embed" or "rel_pos" in key:
            state[key] = torch.randn(shape, generator=g)
        else:
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    path = tmp_path_factory.mktemp("official") / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return state, path


def save_variant(state: dict, path: Path) -> str:
    torch.save(state, path)
    return str(path)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """segment-anything's own get_rel_pos resizing: linear interpolation along the position axis."""
    resized = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def test_model_layout_at_1024_is_the_official_one(layout: list) -> None:
    model = build_segmenter("sam", "vit_b", 1024, 1)
    own = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert len(own) == len(layout) == 314
    assert own == layout


def test_official_checkpoint_loads_at_1024_unchanged(official) -> None:
    state, path = official
    model = build_segmenter("sam", "vit_b", 1024, 1, checkpoint=str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, HEAD_DIM)


def test_official_checkpoint_is_resized_for_256(official) -> None:
    state, path = official
    model = build_segmenter("sam", "vit_b", 256, 1, checkpoint=str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(state)

    pos = loaded["image_encoder.pos_embed"]
    assert pos.shape == (1, 16, 16, DIM)
    expected = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(pos, expected, atol=1e-6, rtol=0)
    bilinear = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(16, 16),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert (pos - bilinear).abs().max() > 1e-3, "bicubic, not bilinear"

    resized = {"image_encoder.pos_embed"}
    for block in range(12):
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"
            if block in GLOBAL_BLOCKS:  # 2 * 16 - 1 relative positions over the 16 x 16 token grid
                assert state[key].shape == (127, HEAD_DIM) and loaded[key].shape == (31, HEAD_DIM)
                torch.testing.assert_close(loaded[key], resize_rel_pos(state[key], 31), atol=1e-6, rtol=0)
                resized.add(key)
            else:  # windowed blocks keep their 2 * 14 - 1 table
                assert loaded[key].shape == (27, HEAD_DIM) and torch.equal(loaded[key], state[key])
    assert len(resized) == 1 + 2 * len(GLOBAL_BLOCKS)
    for key, value in loaded.items():  # everything else loads as stored (the zeros replace the random init)
        if key not in resized:
            assert torch.equal(value, state[key]), key
    assert torch.count_nonzero(loaded["image_encoder.blocks.0.attn.qkv.weight"]) == 0


@pytest.mark.parametrize("problem", ("missing", "unexpected", "shape"))
def test_mismatched_checkpoints_are_rejected(official, tmp_path: Path, problem: str) -> None:
    state, _ = official
    variant = dict(state)
    if problem == "missing":
        key = "image_encoder.blocks.7.mlp.lin2.bias"
        del variant[key]
        expected = ("1 missing keys", key)
    elif problem == "unexpected":  # vit_l has 24 blocks
        key = "image_encoder.blocks.12.attn.proj.bias"
        variant[key] = torch.zeros(DIM)
        expected = ("1 unexpected keys", key)
    else:  # vit_l-shaped qkv (embed dim 1024)
        key = "image_encoder.blocks.0.attn.qkv.weight"
        variant[key] = torch.zeros(3 * 1024, 1024)
        expected = ("1 shape mismatches", key)
    path = save_variant(variant, tmp_path / f"{problem}.pth")
    with pytest.raises(UserError) as error:
        build_segmenter("sam", "vit_b", 1024, 1, checkpoint=path)
    message = str(error.value)
    assert path in message and "-net sam -encoder vit_b" in message
    for part in expected:
        assert part in message, message
    Path(path).unlink()


def test_unreadable_files_are_rejected(tmp_path: Path) -> None:
    tiny = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
    noise = tmp_path / "noise.pth"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(UserError, match="is not a PyTorch checkpoint") as error:
        build_segmenter("sam", "vit_b", 64, 1, checkpoint=str(noise), **tiny)
    assert str(noise) in str(error.value)
    missing = tmp_path / "absent" / "sam_vit_b.pth"
    with pytest.raises(UserError, match="does not exist") as error:
        build_segmenter("sam", "vit_b", 64, 1, checkpoint=str(missing), **tiny)
    assert str(missing) in str(error.value)
    wrapped = tmp_path / "wrapped.pth"  # EfficientSAM's {"model": ...} wrapping is not SAM's format
    torch.save({"model": {"image_encoder.pos_embed": torch.zeros(1)}}, wrapped)
    with pytest.raises(UserError, match="holds no state dict of tensors"):
        build_segmenter("sam", "vit_b", 64, 1, checkpoint=str(wrapped), **tiny)
    unwrapped = read_checkpoint_file(str(wrapped), unwrap_key="model")  # what the EfficientSAM entry reads
    assert list(unwrapped) == ["image_encoder.pos_embed"] and torch.equal(unwrapped["image_encoder.pos_embed"],
                                                                          torch.zeros(1))
