"""``nn.Embedding``: the input feature is the one-hot row of each index.

The indices are kept instead of the one-hot rows; positions holding ``padding_idx`` get
no gradient, so they are masked out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ntk_torch._engines._layers._base import LayerRule, Site, register


class EmbeddingRule(LayerRule):
    name = "embedding"
    modules = ((nn.Embedding, ("forward",)),)

    def accepts(self, module: nn.Module) -> bool:
        # max_norm renormalises rows in place; scale_grad_by_freq rescales per batch.
        return module.max_norm is None and not module.scale_grad_by_freq

    def sizes(self, module: nn.Module, site: Site) -> tuple[int, int, int, int]:
        return math.prod(site.in_shape), 1, module.num_embeddings, module.embedding_dim

    def features(self, module: nn.Module, site: Site,
                 feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(N, T)`` and the mask of positions that are not padding."""
        indices = feat.reshape(feat.shape[0], -1)
        pad = module.padding_idx
        mask = indices != pad if pad is not None else torch.ones_like(indices, dtype=torch.bool)
        return indices, mask

    def feature_elements(self, module: nn.Module, site: Site) -> int:
        return self.sizes(module, site)[0]  # the indices

    def vocab(self, module: nn.Module) -> int:
        return module.num_embeddings


EMBEDDING = register(EmbeddingRule())
