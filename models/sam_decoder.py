"""SAM's prompt encoder and mask decoder, shared by SAM ViT and MobileSAM.

The segment-anything 1.0 decoder repeats every image embedding once per prompt in the batch,
which is only right for one image at a time. `BatchedMaskDecoder` pairs query i with embedding i,
so a batch of B images with B queries costs B decoder passes, not B x B.
"""
from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import Tensor

from .decoder_tokens import query_tokens

EMBED_DIM = 256
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class BatchedMaskDecoder(MaskDecoder):
    """SAM's mask decoder (same modules and keys) with one image embedding per query."""

    # `-decoder lora`: the two-way transformer's attention projections and MLP linears (module names)
    lora_targets = (r"transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
                    r"|final_attn_token_to_image)\.(q|k|v|out)_proj|transformer\.layers\.\d+\.mlp\.lin[12]")

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                      dense_prompt_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        tokens = query_tokens(self.iou_token, self.mask_tokens, image_embeddings, sparse_prompt_embeddings)
        image = image_embeddings + dense_prompt_embeddings
        batch, channels, height, width = image.shape
        hidden, image = self.transformer(image, image_pe.expand(batch, -1, -1, -1), tokens)
        iou_token_out = hidden[:, 0]
        mask_tokens_out = hidden[:, 1:1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(batch, channels, height, width))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        up_channels, up_h, up_w = upscaled.shape[1:]
        masks = (hyper_in @ upscaled.flatten(2)).view(batch, -1, up_h, up_w)
        return masks, self.iou_prediction_head(iou_token_out)


def sam_prompt_encoder(image_size: int, embedding_stride: int = 16) -> PromptEncoder:
    grid = image_size // embedding_stride
    return PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(grid, grid),
                         input_image_size=(image_size, image_size), mask_in_chans=16)


def sam_mask_decoder() -> BatchedMaskDecoder:
    transformer = TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8)
    return BatchedMaskDecoder(transformer_dim=EMBED_DIM, transformer=transformer, num_multimask_outputs=3,
                              iou_head_depth=3, iou_head_hidden_dim=256)
