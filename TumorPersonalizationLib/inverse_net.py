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


# The networks' frames are axis-aligned in RAS (frame.SurrogateFrame: identity direction on both of its paths), so a
# frame's last grid axis is RAS x and a flip along it is the left-right mirror image of brain and tumor, the kind of
# brain the training data hold (the atlas and its mirror image, mirror_probability 0.5). Mirrored, the seed's x
# offset from the frame's centre changes sign and mu_D, mu_rho do not.
MIRROR_AXIS = -1
MIRROR_SIGNS = (-1.0, 1.0, 1.0, 1.0, 1.0)


def predict_mirror_averaged(model: nn.Module, tissue: torch.Tensor, tumor: torch.Tensor) -> torch.Tensor:
    """The mean of the network's answer and of its answer to the left-right mirrored input, mirrored back.

    tissue (B, 3, G, G, G) and tumor (B, G, G, G) on a frame's grid; returns normalised parameters (B, 5). Two
    forward passes: the network is not exactly mirror-symmetric, and averaging the two answers cancels part of its
    error (on the held-out test set the mean mu_D error fell from 13.3 % to 12.2 % and the seed error from 6.3 to
    5.6 mm; benchmarks/results/surrogate32_v3.json)."""
    signs = torch.tensor(MIRROR_SIGNS, dtype=tissue.dtype, device=tissue.device)
    plain = model(tissue, tumor)
    mirrored = model(torch.flip(tissue, (MIRROR_AXIS,)), torch.flip(tumor, (MIRROR_AXIS,))) * signs
    return (plain + mirrored) / 2.0


def inverse_answer(model: nn.Module, tissue: torch.Tensor, tumor: torch.Tensor, mirror_average: bool = True
                   ) -> torch.Tensor:
    """The network's normalised parameters (B, 5) for tissue (B, 3, G, G, G) and tumor (B, G, G, G): averaged with
    the mirrored input's answer (predict_mirror_averaged), or from one pass with mirror_average=False. The one way
    the inversion and the held-out scores ask the network."""
    return predict_mirror_averaged(model, tissue, tumor) if mirror_average else model(tissue, tumor)
