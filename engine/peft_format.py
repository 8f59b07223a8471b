"""A run's encoder adapters in peft's own format, so that peft reads them without this toolkit.

    run_dir/peft/adapter_config.json          peft's config of the tuner (LoRA, DoRA or AdaLoRA)
    run_dir/peft/adapter_model.safetensors    the encoder adapters under peft's key names
                                              (base_model.model.<module>.lora_A.weight, ...)
    run_dir/peft/mask_decoder.safetensors     the trained mask decoder (mask_decoder.* keys of the
                                              segmenter: the decoder is not part of the peft-wrapped encoder)

Load them onto a freshly built base encoder with
`peft.PeftModel.from_pretrained(segmenter.image_encoder, run_dir / "peft")` or
`set_peft_model_state_dict(peft_model, load_peft_weights(run_dir / "peft"))`, and the decoder with
`segmenter.load_state_dict(load_file(".../mask_decoder.safetensors"), strict=False)`.
Modes without a peft tuner (sam_adpt, sam_full, sam_decoder) write no peft folder.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

from safetensors.torch import save_file
from torch import nn

from models.modes.adaptation import Adaptation
from models.modes.lora_layer import LowRankTuner

PEFT_DIR = "peft"
ADAPTER_CONFIG, ADAPTER_WEIGHTS, DECODER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", \
    "mask_decoder.safetensors"


class _AsPeftModel(nn.Module):
    """The tuner under the attribute PeftModel gives it (`base_model`), so state-dict keys carry PeftModel's
    names; peft's state-dict helper reads `peft_config`."""

    def __init__(self, tuner: nn.Module):
        super().__init__()
        self.base_model = tuner
        self.peft_config = tuner.peft_config


def peft_state(adaptation: Adaptation) -> tuple[dict, object]:
    """(peft-named adapter tensors, the peft config to save with them) of a tuner-backed adaptation: the
    project's own LoRA / AdaLoRA give both themselves (the config as a dict of peft's fields); for peft's
    tuners (DoRA, `-lora_conv`) peft's `get_peft_model_state_dict` names the tensors (drops the adapter
    name, `base_model.model.<module>...`)."""
    tuner = adaptation.tuner
    if isinstance(tuner, LowRankTuner):
        return tuner.peft_state()
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(_AsPeftModel(tuner), adapter_name="default", save_embedding_layers=False)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, copy.deepcopy(tuner.peft_config["default"])


def write_peft_folder(folder: Path, model: nn.Module, adaptation: Adaptation,
                      metadata: Optional[dict[str, str]] = None) -> Optional[Path]:
    """Write the peft folder (see the module docstring); None (nothing written) for modes without a tuner."""
    if adaptation.tuner is None:
        return None
    from engine.checkpoints import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = peft_state(adaptation)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if isinstance(config, dict):  # the project's own LoRA / AdaLoRA: peft's config fields, as peft writes them
        atomic_write(folder / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    else:
        config.inference_mode = True
        config.save_pretrained(str(folder))
    decoder = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if k.startswith("mask_decoder.")}
    atomic_write(folder / DECODER_WEIGHTS, lambda tmp: save_file(decoder, tmp, metadata=metadata or {}))
    return folder
