"""The one interface every net is wrapped behind: encode images, decode prompts into class masks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class Prompts:
    """Prompts for B images and C classes, in pixel coordinates of the S x S model input.

    points: B x C x N x 2 (x, y); point_labels: B x C x N (1 foreground, 0 background, -1 padding);
    boxes: B x C x 4 (x0, y0, x1, y1). Any of them may be None (prompt "none" leaves all None).
    """

    points: Optional[Tensor] = None
    point_labels: Optional[Tensor] = None
    boxes: Optional[Tensor] = None

    def per_query(self) -> "Prompts":
        """Flatten B x C into B*C decoder queries (query b*C + c is class c of image b)."""
        flat = lambda t, keep: None if t is None else t.reshape(-1, *t.shape[keep:])
        return Prompts(flat(self.points, 2), flat(self.point_labels, 2), flat(self.boxes, 2))

    def to(self, device: torch.device) -> "Prompts":
        move = lambda t: None if t is None else t.to(device)
        return Prompts(move(self.points), move(self.point_labels), move(self.boxes))


@dataclass(frozen=True)
class AdaptTargets:
    """Where the adaptation modes act inside one image encoder (regexes over its module names).

    linears: attention qkv/proj and MLP linears (LoRA, AdaLoRA, DoRA targets);
    attention / mlp: the modules an Adapter follows (attention) or runs beside (MLP);
    blocks: the transformer blocks that activation checkpointing wraps;
    convs: the convolutions of a convolutional stem that `-lora_conv` also adapts ("" when none);
    prefix: names of the leading modules, in order, that precede every adapter and every trainable part
        of the PEFT modes (without -lora_conv): run without autograd state and in channels-last while
        frozen (models/frozen_prefix.py).
    """

    linears: str
    attention: str
    mlp: str
    blocks: str
    convs: str = ""
    prefix: tuple[str, ...] = ()


class PromptableSegmenter(nn.Module):
    """Image encoder plus prompt-conditioned mask decoder, with C output classes.

    Class c of an image is decoded as its own query, prompted by that class's prompts. With one
    class the decoder's single-mask token is used; with C > 1 classes, class c reads multimask
    token c, so classes stay distinct even without prompts.
    """

    image_encoder: nn.Module
    adapt_targets: AdaptTargets
    max_classes = 3

    def __init__(self, image_size: int, num_classes: int):
        super().__init__()
        if not 1 <= num_classes <= self.max_classes:
            raise ValueError(f"num_classes must be 1..{self.max_classes}, got {num_classes}")
        self.image_size = image_size
        self.num_classes = num_classes

    def encode(self, images: Tensor, valid_hw: Optional[Tensor] = None) -> Tensor:
        """B x 3 x S x S images with values 0..255, zero-padded outside the top-left valid_hw (B x 2:
        height, width; None: no padding) -> B x 256 x S/k x S/k embeddings (k: the encoder's stride).

        Each net normalises the valid area its own way and gives the padding the value its
        pretraining pipeline gave it (see models/preprocess.py)."""
        raise NotImplementedError

    def decode_queries(self, embeddings: Tensor, prompts: Prompts, multimask: bool) -> tuple[Tensor, Tensor]:
        """Q embeddings and Q queries' prompts -> (Q x M x s x s logits, Q x M IoU), M = 3 or 1."""
        raise NotImplementedError

    def decode(self, embeddings: Tensor, prompts: Prompts) -> tuple[Tensor, Tensor]:
        """B embeddings, B x C prompts -> (B x C x s x s logits, B x C predicted IoU)."""
        batch, classes = embeddings.shape[0], self.num_classes
        per_query = embeddings.repeat_interleave(classes, dim=0)
        logits, iou = self.decode_queries(per_query, prompts.per_query(), multimask=classes > 1)
        if classes > 1:
            token = torch.arange(classes, device=logits.device).repeat(batch)
            rows = torch.arange(batch * classes, device=logits.device)
            logits, iou = logits[rows, token], iou[rows, token]
        else:
            logits, iou = logits[:, 0], iou[:, 0]
        return logits.view(batch, classes, *logits.shape[-2:]), iou.view(batch, classes)

    def forward(self, images: Optional[Tensor], prompts: Prompts, embeddings: Optional[Tensor] = None,
                valid_hw: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Encode and decode; pass precomputed `embeddings` (images None) to skip the encoder."""
        return self.decode(self.encode(images, valid_hw) if embeddings is None else embeddings, prompts)
