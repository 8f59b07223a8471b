"""Export a (merged, eval-mode) segmenter to two ONNX graphs and check them against PyTorch.

`image_encoder.onnx`: images (B x 3 x S x S float32, values 0..255; the net's normalisation is
inside the graph) -> embeddings (B x 256 x S/16 x S/16).
`mask_decoder.onnx`: embeddings plus the prompt tensors of one prompt kind -> logits (B x C x s x s)
and iou (B x C), exactly `PromptableSegmenter.decode`:

    prompt "click": points (B x C x N x 2 float32, pixels of the S x S input), point_labels (B x C x N int64)
    prompt "box":   boxes (B x C x 4 float32, x0 y0 x1 y1 pixels)
    prompt "none":  embeddings only

The batch axis B of every input and output is dynamic; C (the model's classes) and N (clicks per
class, `num_points`) are fixed in the graph, as they are fixed for a training run.

Exporters, one per graph:
- mask decoder: the torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`). The legacy
  TorchScript exporter cannot export it: segment-anything's prompt encoder updates
  `point_embedding[labels == -1] += ...` through a boolean mask, which the tracer records with the
  number of masked rows of the example input, so onnxruntime fails for other labels or batch sizes
  (and the legacy exporter has no translation of EfficientSAM's stable sort). torch.export keeps the
  masked updates as element-wise selects, and the batch axis symbolic.
- image encoder: the legacy TorchScript exporter (`dynamo=False`). The encoders have no data-dependent
  ops, only Python branches on H and W, which are fixed for a graph; the traced graph is checked exact
  at other batch sizes, and it exports 5-10x faster than torch.export (about 1 s against 5-20 s for
  MobileSAM on a shared CPU), which matters because export_onnx runs per prompt kind.

EfficientSAM exports too: its prompt encoder orders padding points last with a *stable* argsort
(`aten.sort.stable`), which the ONNX translation library has no entry for. It is translated here to a
full-length ONNX TopK, which the ONNX specification defines to break ties by the lower index, i.e. a
stable sort.

Export adapted models after `merge_adapters` (LoRA / DoRA / AdaLoRA are then plain linears); the
segmenter must be in eval mode (BatchNorm statistics, no dropout).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from .segmenter import PromptableSegmenter, Prompts

OPSET = 18
PROMPT_INPUTS = {"click": ("points", "point_labels"), "box": ("boxes",), "none": ()}
ENCODER_FILE, DECODER_FILE = "image_encoder.onnx", "mask_decoder.onnx"
ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64}  # the graphs' input types
EXAMPLE_BATCH = 3  # trace with B = 3: never specialised to 1, and unlike the common B = 1, 2


class ImageEncoderGraph(nn.Module):
    """images 0..255 -> embeddings (`segmenter.encode`, normalisation included)."""

    def __init__(self, segmenter: PromptableSegmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, images: Tensor) -> Tensor:
        return self.segmenter.encode(images)


class MaskDecoderGraph(nn.Module):
    """embeddings + the prompt tensors of one prompt kind -> (logits, iou) (`segmenter.decode`)."""

    def __init__(self, segmenter: PromptableSegmenter, prompt: str):
        super().__init__()
        self.segmenter = segmenter
        self.prompt_names = PROMPT_INPUTS[prompt]

    def forward(self, embeddings: Tensor, *prompt_tensors: Tensor) -> tuple[Tensor, Tensor]:
        return self.segmenter.decode(embeddings, Prompts(**dict(zip(self.prompt_names, prompt_tensors))))


def _stable_sort(self, stable: Optional[bool] = None, dim: int = -1, descending: bool = False):
    """aten.sort.stable as one ONNX TopK over the whole axis (ties: lower index first, per the ONNX spec)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if self.dtype in (ir.DataType.BOOL, ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.INT16,
                      ir.DataType.UINT16, ir.DataType.UINT32):
        keys = op.Cast(self, to=ir.DataType.INT64)  # onnxruntime's TopK takes no small integer types
    else:
        keys = self
    length = op.Reshape(op.Gather(op.Shape(keys), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
    values, indices = op.TopK(keys, length, axis=dim, largest=descending, sorted=True)
    if keys is not self:
        values = op.Cast(values, to=self.dtype)
    return values, indices


CUSTOM_TRANSLATIONS = {torch.ops.aten.sort.stable: _stable_sort}


def example_prompts(segmenter: PromptableSegmenter, prompt: str, batch: int, num_points: int = 1,
                    generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Random prompt tensors of one kind, named as the decoder graph's inputs (pixels of the S x S input)."""
    if prompt not in PROMPT_INPUTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPT_INPUTS)}, got {prompt!r}")
    size, classes = segmenter.image_size, segmenter.num_classes
    if prompt == "click":
        points = torch.rand(batch, classes, num_points, 2, generator=generator) * (size - 1)
        labels = torch.randint(0, 2, (batch, classes, num_points), generator=generator)
        labels[..., 0] = 1  # at least one foreground click per class
        return {"points": points, "point_labels": labels}
    if prompt == "box":
        corners = torch.rand(batch, classes, 2, 2, generator=generator) * (size - 1)
        low, high = corners.min(dim=2).values, corners.max(dim=2).values
        return {"boxes": torch.cat([low, high], dim=-1)}
    return {}


def _check_exportable(segmenter: PromptableSegmenter, prompt: str) -> None:
    if prompt not in PROMPT_INPUTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPT_INPUTS)}, got {prompt!r}")
    if segmenter.training:
        raise ValueError("export_onnx needs an eval-mode segmenter: call segmenter.eval() first")


def export_onnx(segmenter: PromptableSegmenter, out_dir, prompt: str, num_points: int = 1,
                opset: int = OPSET) -> dict[str, str]:
    """Write `image_encoder.onnx` and `mask_decoder.onnx` for `prompt` ("click", "box" or "none")
    into `out_dir`; returns {"image_encoder": path, "mask_decoder": path}.

    The segmenter should already be merged (`merge_adapters`) and in eval mode. `num_points` is the
    fixed number N of clicks per class of the "click" decoder (padding clicks carry label -1).
    """
    _check_exportable(segmenter, prompt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(segmenter.parameters()).device
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(EXAMPLE_BATCH, 3, segmenter.image_size, segmenter.image_size, generator=generator) * 255
    images = images.to(device)
    with torch.no_grad():
        embeddings = segmenter.encode(images)
    prompts = {k: v.to(device) for k, v in
               example_prompts(segmenter, prompt, EXAMPLE_BATCH, num_points, generator).items()}
    paths = {"image_encoder": str(out / ENCODER_FILE), "mask_decoder": str(out / DECODER_FILE)}
    _export_encoder(ImageEncoderGraph(segmenter).eval(), images, paths["image_encoder"], opset)
    _export_decoder(MaskDecoderGraph(segmenter, prompt).eval(), embeddings, prompts, paths["mask_decoder"], opset)
    return paths


def _export_encoder(module: nn.Module, images: Tensor, path: str, opset: int) -> None:
    """TorchScript-traced export; only the batch axis of `images` varies, and it is kept symbolic.

    The tracer warns where the encoders branch on Python values derived from H and W (window padding,
    relative-position table sizes, position-grid resizing); H = W = S is fixed per graph, so those
    branches are constants of the graph by design and the warnings are silenced.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not removed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (images,), path, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["embeddings"], do_constant_folding=True,
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})


def _export_decoder(module: nn.Module, embeddings: Tensor, prompts: dict[str, Tensor], path: str,
                    opset: int) -> None:
    """torch.export-based export with one symbolic `batch` dimension shared by every input."""
    batch = torch.export.Dim("batch")
    with torch.no_grad(), warnings.catch_warnings():
        # inputs sharing the one `batch` Dim keep a single axis name; the exporter warns about it
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            module, (embeddings, *prompts.values()), dynamo=True, opset_version=opset,
            input_names=["embeddings", *prompts], output_names=["logits", "iou"],
            dynamic_shapes=({0: batch}, tuple({0: batch} for _ in prompts)) if prompts else ({0: batch},),
            custom_translation_table=CUSTOM_TRANSLATIONS, optimize=True, verbose=False)
    program.save(path)


def _session(path: str):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _feed(session, tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    types = {i.name: ONNX_TO_NUMPY[i.type] for i in session.get_inputs()}
    return {n: tensors[n].detach().cpu().numpy().astype(types[n], copy=False) for n in names}


def _max_diff(onnx_value: np.ndarray, torch_value: Tensor) -> float:
    expected = torch_value.detach().cpu().numpy()
    if onnx_value.shape != expected.shape:
        raise ValueError(f"onnxruntime output shape {onnx_value.shape} != PyTorch {expected.shape}")
    return float(np.abs(onnx_value.astype(np.float64) - expected.astype(np.float64)).max())


def check_onnx(segmenter: PromptableSegmenter, paths: dict, sample_inputs: dict[str, Tensor]) -> dict[str, float]:
    """Run both graphs with onnxruntime (CPUExecutionProvider) against the PyTorch segmenter.

    `sample_inputs`: "images" plus the decoder's prompt tensors by input name ("points", "point_labels"
    or "boxes"). Returns max abs differences: "embeddings" (encoder graph), "logits" / "iou" (decoder
    graph fed the PyTorch embeddings), and "logits_chained" / "iou_chained" (decoder graph fed the
    encoder graph's embeddings, i.e. ONNX end to end).
    """
    encoder, decoder = _session(paths["image_encoder"]), _session(paths["mask_decoder"])
    images = sample_inputs["images"].float()
    prompt_names = [i.name for i in decoder.get_inputs()][1:]
    missing = [n for n in prompt_names if n not in sample_inputs]
    if missing:
        raise ValueError(f"sample_inputs lack {', '.join(missing)}, inputs of {paths['mask_decoder']}")
    prompts = {n: sample_inputs[n] for n in prompt_names}
    device = next(segmenter.parameters()).device
    with torch.no_grad():
        embeddings = segmenter.encode(images.to(device))
        logits, iou = segmenter.decode(embeddings, Prompts(**{n: t.to(device) for n, t in prompts.items()}))
    onnx_embeddings = encoder.run(None, _feed(encoder, {"images": images}))[0]
    onnx_logits, onnx_iou = decoder.run(None, _feed(decoder, {"embeddings": embeddings, **prompts}))
    chained = _feed(decoder, {"embeddings": embeddings, **prompts})
    chained["embeddings"] = onnx_embeddings
    chained_logits, chained_iou = decoder.run(None, chained)
    return {"embeddings": _max_diff(onnx_embeddings, embeddings), "logits": _max_diff(onnx_logits, logits),
            "iou": _max_diff(onnx_iou, iou), "logits_chained": _max_diff(chained_logits, logits),
            "iou_chained": _max_diff(chained_iou, iou)}
