"""The metrics' feature network: a small U-Net segmenter (siamese for cd) behind a spectral layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from specdm_cli.manifest import Task

# Bumped whenever the architecture or training recipe changes, so cached weights are not reused.
ARCHITECTURE_VERSION = 1


class FeatureNetConfig(BaseModel):
    """How the feature network is built and trained; its JSON is part of the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ARCHITECTURE_VERSION, description="architecture/recipe version")
    task: Task
    bands: int = Field(gt=0, description="input bands of the reference store")
    classes: int = Field(gt=1, description="label classes (cd: 2, change / no change)")
    # The paper maps HSI to 3 channels with a learned layer before SegFormer (Sec. 3.4); with no
    # pretrained RGB backbone to feed we keep a few more channels (8, our choice).
    spectral_dim: int = Field(8, gt=0, description="channels of the learned 1x1 spectral map")
    width: int = Field(16, gt=0, description="channels of the first encoder level")
    levels: int = Field(3, ge=1, le=5, description="downsamplings before the bottleneck")
    # Issue 5: pooled features of at most 64 dims, so covariances of a few hundred samples are
    # still estimable. See `Encoder`: spatial mean and std of the spectral map (2 x spectral_dim)
    # and of the bottleneck (the rest, so the bottleneck has feature_dim / 2 - spectral_dim).
    feature_dim: int = Field(64, ge=4, le=64, multiple_of=2, description="pooled feature dims")
    # Training budget: fixed so the weights depend only on (reference store, this config).
    # 400 steps of 16 samples on 2 CPU cores (our measurement): ~25 s at 32 px, ~1.5 min at
    # 64 px, ~5 min at 128 px; once per reference store, then cached.
    steps: int = Field(400, ge=1, description="optimiser steps")
    batch_size: int = Field(16, ge=1, description="samples per step")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate (cosine decay)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    seed: int = Field(0, description="seed of initialisation, batch order and augmentation")

    @model_validator(mode="after")
    def _bottleneck_left(self) -> FeatureNetConfig:
        if self.feature_dim // 2 <= self.spectral_dim:
            raise ValueError("feature_dim must exceed 2 x spectral_dim (room for the bottleneck)")
        return self


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and SiLU (a U-Net level).

    BatchNorm, not GroupNorm/InstanceNorm: those normalise each sample by its own statistics
    and so erase a per-sample brightness or band-ratio shift, the very thing a spectral metric
    must see. In eval mode BatchNorm is a fixed affine map: features stay per-sample.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.SiLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x)
        return out


def _level_channels(config: FeatureNetConfig) -> list[int]:
    """Channels of each encoder level, the last one being the bottleneck."""
    bottleneck = config.feature_dim // 2 - config.spectral_dim
    return [config.width * 2**i for i in range(config.levels)] + [bottleneck]


def pool(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, 2C): per-channel spatial mean and standard deviation."""
    variance, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    return torch.cat([mean, variance.clamp_min(0.0).sqrt()], dim=1)


class Encoder(nn.Module):
    """Learned 1x1 spectral map, then U-Net encoder levels.

    Image features = `pool` of the spectral map and of the bottleneck, side by side. The
    bottleneck alone, trained to segment, learns to ignore what segmentation does not need, such
    as a band's gain; the spectral map is a learned linear view of the spectra at full
    resolution, so its means see any spectral shift and its deviations see sharpness.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        channels = _level_channels(config)
        self.spectral = nn.Conv2d(config.bands, config.spectral_dim, 1)
        inputs = [config.spectral_dim, *channels[:-1]]
        self.blocks = nn.ModuleList(ConvBlock(i, o) for i, o in zip(inputs, channels, strict=True))

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(B, bands, H, W) normalised -> (every level's output, pooled features (B, D))."""
        outputs: list[Tensor] = []
        spectral = h = self.spectral(x)
        for level, block in enumerate(self.blocks):
            # Average pooling (not strided conv) keeps odd sizes workable: decoders resize back.
            h = block(h if level == 0 else F.avg_pool2d(h, 2, ceil_mode=True))
            outputs.append(h)
        return outputs, torch.cat([pool(spectral), pool(h)], dim=1)


class Decoder(nn.Module):
    """U-Net decoder: upsample, concatenate the skip, convolve; 1x1 head to class logits."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        channels = _level_channels(config)
        self.blocks = nn.ModuleList(
            ConvBlock(channels[i + 1] + channels[i], channels[i])
            for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv2d(channels[0], config.classes, 1)

    def forward(self, levels: list[Tensor]) -> Tensor:
        h = levels[-1]
        for block, skip in zip(self.blocks, reversed(levels[:-1]), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        logits: Tensor = self.head(h)
        return logits


class SegmentationNet(nn.Module):
    """ss: encoder -> decoder; image features from the encoder."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, images: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """(one image batch) -> ([pooled features (B, D)], logits (B, K, H, W))."""
        levels, features = self.encoder(images[0])
        return [features], self.decoder(levels)


class SiameseChangeNet(nn.Module):
    """cd: a shared encoder on t1 and t2; each level fused from |f1 - f2| and (f1, f2); decoder.

    Image features per phase come from the shared encoder, so one feature space serves
    `fd_spectral_t1` and `fd_spectral_t2`.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.encoder = Encoder(config)
        self.fuse = nn.ModuleList(nn.Conv2d(3 * c, c, 1) for c in _level_channels(config))
        self.decoder = Decoder(config)

    def forward(self, images: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """(t1 batch, t2 batch) -> ([features t1, features t2], change logits (B, 2, H, W))."""
        (first, features_1), (second, features_2) = (self.encoder(x) for x in images[:2])
        fused = [
            fuse(torch.cat([(a - b).abs(), a, b], dim=1))
            for fuse, a, b in zip(self.fuse, first, second, strict=True)
        ]
        return [features_1, features_2], self.decoder(fused)


def build_network(config: FeatureNetConfig) -> SegmentationNet | SiameseChangeNet:
    """The network of `config.task`, initialised from the current torch RNG."""
    if config.task == "cd":
        return SiameseChangeNet(config)
    return SegmentationNet(config)
