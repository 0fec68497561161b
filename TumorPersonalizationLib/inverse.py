"""Direct inverse network: tissue + observed tumor -> normalised growth parameters (the start of the inversion)."""
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .surrogate import ChannelLayerNorm, ConvNeXtEncoder


@dataclass(frozen=True)
class InverseConfig:
    grid: int = 32
    in_channels: int = 4  # WM, GM, CSF, tumor concentration
    widths: Tuple[int, ...] = (16, 32, 64, 96)
    blocks_per_level: int = 1
    kernel_size: int = 3
    parameters: int = 5

    def to_dict(self) -> Dict:
        out = asdict(self)
        out["widths"] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, data: Dict) -> "InverseConfig":
        data = dict(data)
        data["widths"] = tuple(data["widths"])
        return cls(**data)


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
