"""SAM's prompt encoder and mask decoder, shared by SAM ViT and MobileSAM.

The segment-anything 1.0 decoder repeats every image embedding once per prompt in the batch,
which is only right for one image at a time. `BatchedMaskDecoder` pairs query i with embedding i,
so a batch of B images with B queries costs B decoder passes, not B x B.

Its two-way transformer adds the position encoding to the image tokens three times per block pair
(keys + key_pe), and the projections that take each sum save it for backward: at LiteMedSAM's 64 x 64
image embedding, batch 2, five 8 MB copies. `LeanTwoWayAttentionBlock` forms the sum once for both
cross attentions and, like `LeanTwoWayTransformer` for the final attention, keeps it as a recipe
(models/saved_tensors.py) over the image tokens, which the value projections keep anyway.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .decoder_tokens import query_tokens
from .layer_norm_2d import fuse_layer_norms_2d
from .saved_tensors import saved_as_recipe
from .segment_anything_modeling import MaskDecoder, PromptEncoder, TwoWayAttentionBlock, TwoWayTransformer

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
        hidden, image = self.transformer(image, image_pe, tokens)
        iou_token_out = hidden[:, 0]
        mask_tokens_out = hidden[:, 1:1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(batch, channels, height, width))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        up_channels, up_h, up_w = upscaled.shape[1:]
        masks = (hyper_in @ upscaled.flatten(2)).view(batch, -1, up_h, up_w)
        return masks, self.iou_prediction_head(iou_token_out)


class LeanTwoWayAttentionBlock(TwoWayAttentionBlock):
    """`TwoWayAttentionBlock` with one recipe-kept sum of image tokens and position encoding (module docstring)."""

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            with_pe = queries + query_pe
            queries = queries + self.self_attn(q=with_pe, k=with_pe, v=queries)
        queries = self.norm1(queries)
        keys_with_pe = keys + key_pe
        with saved_as_recipe(keys_with_pe, lambda: keys + key_pe):
            attended = self.cross_attn_token_to_image(q=queries + query_pe, k=keys_with_pe, v=keys)
            queries = self.norm2(queries + attended)
            queries = self.norm3(queries + self.mlp(queries))
            attended = self.cross_attn_image_to_token(q=keys_with_pe, k=queries + query_pe, v=queries)
        return queries, self.norm4(keys + attended)


class LeanTwoWayTransformer(TwoWayTransformer):
    """`TwoWayTransformer` on contiguous image tokens (a recipe needs them), its final attention's sum of
    image tokens and position encoding kept as a recipe too (module docstring)."""

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        keys_with_pe = keys + key_pe
        with saved_as_recipe(keys_with_pe, lambda: keys + key_pe):
            attended = self.final_attn_token_to_image(q=queries + point_embedding, k=keys_with_pe, v=keys)
        return self.norm_final_attn(queries + attended), keys


def sam_prompt_encoder(image_size: int, embedding_stride: int = 16) -> PromptEncoder:
    grid = image_size // embedding_stride
    return fuse_layer_norms_2d(PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(grid, grid),
                                             input_image_size=(image_size, image_size), mask_in_chans=16))


def sam_mask_decoder() -> BatchedMaskDecoder:
    transformer = TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8)
    transformer.__class__ = LeanTwoWayTransformer  # the same modules and keys (module docstring)
    for layer in transformer.layers:
        layer.__class__ = LeanTwoWayAttentionBlock
    return fuse_layer_norms_2d(BatchedMaskDecoder(transformer_dim=EMBED_DIM, transformer=transformer,
                                                  num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256))
