"""The token sequence both mask decoders (SAM's and EfficientSAM's) feed their two-way transformer."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def query_tokens(iou_token: nn.Embedding, mask_tokens: nn.Embedding, image_embeddings: Tensor,
                 sparse_prompt_embeddings: Tensor) -> Tensor:
    """Q x (1 + M + N) x C tokens: the IoU token, the M mask tokens, then each query's N prompt tokens.

    One image embedding per query: Q image embeddings for Q x N x C prompts (ValueError otherwise)."""
    queries = sparse_prompt_embeddings.shape[0]
    if image_embeddings.shape[0] != queries:
        raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {queries} queries")
    output_tokens = torch.cat([iou_token.weight, mask_tokens.weight], dim=0)
    return torch.cat([output_tokens.expand(queries, -1, -1).to(sparse_prompt_embeddings.dtype),
                      sparse_prompt_embeddings], dim=1)
