"""Direct inverse network: tissue + observed tumor -> normalised growth parameters (the start of the inversion)."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .surrogate import ChannelLayerNorm, ConvNeXtEncoder, NetworkConfig


@dataclass(frozen=True)
class InverseConfig(NetworkConfig):
    in_channels: int = 4  # WM, GM, CSF, tumor concentration


class InverseNet(nn.Module):
    def __init__(self, config: InverseConfig = InverseConfig()):
        super().__init__()
        self.config = config
        self.encoder = ConvNeXtEncoder(config.in_channels, config.widths, config.blocks_per_level, config.kernel_size)
        width = config.widths[-1]
        self.norm = ChannelLayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, 128), nn.GELU(), nn.Linear(128, config.parameters))

    def forward(self, tissue: torch.Tensor, tumor: torch.Tensor) -> torch.Tensor:
        """tissue (B, 3, G, G, G), tumor (B, G, G, G) -> normalised parameters (B, 5) in (-1, 1)."""
        x, _ = self.encoder(torch.cat([tissue, tumor[:, None]], dim=1))
        pooled = self.norm(x).mean(dim=(2, 3, 4))
        return torch.tanh(self.head(pooled))
