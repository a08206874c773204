"""e4e's latent discriminator: tells the generator's mapped codes (real W) from the encoder's codes."""
from __future__ import annotations

import torch
from torch import nn


class LatentDiscriminator(nn.Module):
    """An MLP on one W code [N, 512] -> a logit [N, 1]: `n_hidden` Linear + LeakyReLU(0.2) layers, then a
    Linear to one output. Its state keys (`mlp.0.*`, `mlp.2.*`, ..., `mlp.6.*` for the released 4 layers)
    are those of e4e's `discriminator_state_dict`."""

    def __init__(self, style_dim: int = 512, n_mlp: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n_mlp - 1):
            layers += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(style_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(w)   # [N, 512] -> [N, 1]
