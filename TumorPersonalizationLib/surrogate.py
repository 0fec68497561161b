"""Neural surrogate of the FD solver: a ConvNeXt-block 3-D U-Net.

Input: the tissue crop (WM, GM, CSF fractions) on the surrogate grid; the normalised parameters (seed offset,
mu_D, mu_rho; see parameters.ParameterScaling) pass through a small MLP and are added channel-wise at the
bottleneck. Output: the tumor-cell concentration on the same grid (sigmoid). The grid and the widths are
configuration, so the same code trains the CPU-sized model here and the 128^3 model of the published work on a GPU.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .constants import BRAIN_FRACTION_THRESHOLD


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of a network: surrogate grid, input channels, widths per level, blocks per level, kernel size."""

    grid: int = 32
    in_channels: int = 3
    widths: Tuple[int, ...] = (16, 32, 64, 96)
    blocks_per_level: int = 1
    kernel_size: int = 3
    parameters: int = 5

    def to_dict(self) -> Dict:
        out = asdict(self)
        out["widths"] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, data: Dict):
        data = dict(data)
        data["widths"] = tuple(data["widths"])
        return cls(**data)


@dataclass(frozen=True)
class SurrogateConfig(NetworkConfig):
    """Surrogate input: WM, GM, CSF.

    seed_fields: the seed also enters as fields of each voxel's position relative to it (x, y, z and squared
    distance, in the frame's [-1, 1] units; seed_field_scale = cube_mm / (2 * seed_offset_half_range_mm) converts
    the normalised seed offset to them), concatenated at the bottleneck and every decoder level. Added channel-wise
    at the bottleneck only, as the first networks have it, a seed offset is a spatially uniform signal the decoder
    can turn into a position only through the borders' zero padding: moving their seed 12 mm moved their tumor by
    < 1 mm.
    """

    bottleneck_blocks: int = 1  # ConvNeXt blocks after the parameter injection (cheap: the coarsest grid)
    seed_fields: bool = False
    seed_field_scale: float = 1.0

    def to_dict(self) -> Dict:
        out = super().to_dict()
        if not self.seed_fields:  # the cards of networks without them keep their configuration as it was
            out.pop("seed_fields")
            out.pop("seed_field_scale")
        return out


SEED_FIELD_CHANNELS = 4  # x, y, z relative to the seed and the squared distance


def seed_fields(seed_normalised: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """(B, 3) normalised seed offsets (RAS x, y, z) -> (B, 4, grid, grid, grid) fields on a RAS-aligned frame grid
    (axes k, j, i = z, y, x): each voxel centre's position minus the seed's, in units of the frame's half side, and
    the squared distance. Linear in the seed, so its gradient reaches the seed everywhere."""
    centres = (torch.arange(grid, dtype=seed_normalised.dtype, device=seed_normalised.device) - (grid - 1) / 2.0) \
        * (2.0 / grid)
    seed = seed_normalised * scale
    dx = centres.view(1, 1, 1, -1) - seed[:, 0].view(-1, 1, 1, 1)
    dy = centres.view(1, 1, -1, 1) - seed[:, 1].view(-1, 1, 1, 1)
    dz = centres.view(1, -1, 1, 1) - seed[:, 2].view(-1, 1, 1, 1)
    shape = (seed.shape[0], grid, grid, grid)
    dx, dy, dz = dx.expand(shape), dy.expand(shape), dz.expand(shape)
    return torch.stack([dx, dy, dz, dx * dx + dy * dy + dz * dz], dim=1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor, as ConvNeXt normalises each position."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


class ConvNeXtBlock(nn.Module):
    """Depthwise k^3 conv, channel LayerNorm, 1x1x1 expansion x4, GELU, projection, layer scale, residual."""

    def __init__(self, channels: int, kernel_size: int = 3, layer_scale: float = 1e-2):
        super().__init__()
        self.depthwise = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = ChannelLayerNorm(channels)
        self.expand = nn.Conv3d(channels, 4 * channels, 1)
        self.project = nn.Conv3d(4 * channels, channels, 1)
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1, 1), layer_scale))

    def forward(self, x):
        y = self.project(F.gelu(self.expand(self.norm(self.depthwise(x)))))
        return x + self.scale * y


def _stage(channels: int, blocks: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(*[ConvNeXtBlock(channels, kernel_size) for _ in range(blocks)])


class ConvNeXtEncoder(nn.Module):
    """Stem + levels of ConvNeXt blocks, each followed by a stride-2 downsampling (not after the last)."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: int, kernel_size: int):
        super().__init__()
        self.stem = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList([_stage(w, blocks, kernel_size) for w in widths])
        self.downsample = nn.ModuleList([
            nn.Sequential(ChannelLayerNorm(a), nn.Conv3d(a, b, 2, stride=2)) for a, b in zip(widths[:-1], widths[1:])])

    def forward(self, x):
        skips = []
        x = self.stem(x)
        for level, stage in enumerate(self.stages):
            x = stage(x)
            if level < len(self.downsample):
                skips.append(x)
                x = self.downsample[level](x)
        return x, skips


class SurrogateUNet(nn.Module):
    def __init__(self, config: SurrogateConfig = SurrogateConfig()):
        super().__init__()
        if config.grid % 2 ** (len(config.widths) - 1):
            raise ValueError(f"grid {config.grid} must be divisible by {2 ** (len(config.widths) - 1)}")
        self.config = config
        widths = config.widths
        self.encoder = ConvNeXtEncoder(config.in_channels, widths, config.blocks_per_level, config.kernel_size)
        bottleneck = widths[-1]
        self.parameter_mlp = nn.Sequential(nn.Linear(config.parameters, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                                           nn.Linear(64, bottleneck))
        self.bottleneck = _stage(bottleneck, config.bottleneck_blocks, config.kernel_size)
        self.upsample = nn.ModuleList([nn.ConvTranspose3d(b, a, 2, stride=2)
                                       for a, b in zip(widths[:-1], widths[1:])])
        fields = SEED_FIELD_CHANNELS if config.seed_fields else 0
        self.merge = nn.ModuleList([nn.Conv3d(2 * a + fields, a, 1) for a in widths[:-1]])
        if config.seed_fields:
            # Starts at zero: the network begins as the one without fields (a retraining from its weights starts
            # from its function) and learns how much of the seed's position to use.
            self.seed_projection = nn.Conv3d(SEED_FIELD_CHANNELS, bottleneck, 1)
            nn.init.zeros_(self.seed_projection.weight)
            nn.init.zeros_(self.seed_projection.bias)
        self.decoder = nn.ModuleList([_stage(a, config.blocks_per_level, config.kernel_size) for a in widths[:-1]])
        self.head = nn.Conv3d(widths[0], 1, 1)

    def forward(self, tissue: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """tissue (B, 3, G, G, G), normalised parameters (B, 5) -> concentration (B, G, G, G) in (0, 1)."""
        return torch.sigmoid(self.logits(tissue, parameters))

    def logits(self, tissue: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """The concentration before the sigmoid (what the training loss sees, so it never saturates)."""
        return self.decode(self.encoder(tissue), parameters)

    def encode(self, tissue: torch.Tensor):
        """The tissue's encoding (bottleneck features and skips). The parameters enter only after it, so a search
        over the parameters of one tumor encodes its tissue once and calls decode for every candidate."""
        return self.encoder(tissue)

    def decode(self, encoded, parameters: torch.Tensor) -> torch.Tensor:
        """Logits from an encoding (B or 1 tissues; a single one is shared by every row of `parameters`)."""
        x, skips = encoded
        batch = parameters.shape[0]
        if x.shape[0] != batch:
            x, skips = x.expand(batch, -1, -1, -1, -1), [s.expand(batch, -1, -1, -1, -1) for s in skips]
        x = x + self.parameter_mlp(parameters)[:, :, None, None, None]
        config = self.config
        if config.seed_fields:
            x = x + self.seed_projection(seed_fields(parameters[:, :3], x.shape[-1], config.seed_field_scale))
        x = self.bottleneck(x)
        for level in reversed(range(len(self.upsample))):
            x = self.upsample[level](x)
            features = [x, skips[level]]
            if config.seed_fields:
                features.append(seed_fields(parameters[:, :3], x.shape[-1], config.seed_field_scale))
            x = self.merge[level](torch.cat(features, dim=1))
            x = self.decoder[level](x)
        return self.head(x)[:, 0]


def brain_mask_from_tissue(tissue: torch.Tensor, threshold: float = BRAIN_FRACTION_THRESHOLD) -> torch.Tensor:
    """(B, 3, ...) WM/GM/CSF -> (B, ...) float mask of voxels that can hold tumor (WM+GM >= threshold)."""
    return ((tissue[:, 0] + tissue[:, 1]) >= threshold).to(tissue.dtype)


def masked_mse(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over brain voxels, averaged per sample then over the batch."""
    per_sample = ((predicted - target) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)
    return per_sample.mean()


def masked_bce_with_logits(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against concentrations in [0, 1], over brain voxels. Unlike MSE after a sigmoid, its
    gradient (sigmoid(logit) - c) does not vanish where the output saturates, so the network cannot get stuck
    predicting 'no tumor' on the mostly empty crops."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per_sample = (loss * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)
    return per_sample.mean()
