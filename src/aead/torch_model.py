"""The two autoencoders of the seed project, as pure torch modules.

``ConvBlock`` = (Conv3x3 -> BatchNorm -> ReLU) x 2. Both models share the encoder
(3 -> c -> 2c -> 4c, MaxPool(2) after each block) and the bottleneck (4c -> 8c); they differ in the decoder:
the baseline upsamples without skip connections, the multi-scale (U-Net style) model concatenates the
matching encoder output before each decoder block. With ``base_channels`` c = 32 they have 1.73M and
1.93M parameters, as in the seed.

``SegmentationHead`` is the discriminative part of DRAEM (Zavrtanik et al., ICCV 2021): a small U-Net that sees an
image next to its reconstruction (6 channels) and outputs one defect logit per pixel. It is trained after the
autoencoder, on synthetic defects, to tell where input and reconstruction differ in a way a defect would.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

from aead.errors import ParamsError

M = TypeVar("M", bound=nn.Module)


class ConvBlock(nn.Sequential):
    """(Conv3x3 -> BatchNorm -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class _Encoder(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.enc1 = ConvBlock(3, c)
        self.enc2 = ConvBlock(c, 2 * c)
        self.enc3 = ConvBlock(2 * c, 4 * c)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(4 * c, 8 * c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x1 = self.enc1(x)
        x2 = self.enc2(self.pool(x1))
        x3 = self.enc3(self.pool(x2))
        return x1, x2, x3, self.bottleneck(self.pool(x3))


class BaselineAutoencoder(nn.Module):
    """Conv autoencoder without skip connections (the seed's baseline)."""

    def __init__(self, base_channels: int = 32) -> None:
        super().__init__()
        c = base_channels
        self.encoder = _Encoder(c)
        self.up3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.dec3 = ConvBlock(4 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = ConvBlock(2 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = ConvBlock(c, c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        *_, z = self.encoder(x)
        y = self.dec3(self.up3(z))
        y = self.dec2(self.up2(y))
        y = self.dec1(self.up1(y))
        return torch.sigmoid(self.head(y))


class MultiScaleAutoencoder(nn.Module):
    """U-Net style autoencoder: each decoder step sees the matching encoder features (the seed's model)."""

    def __init__(self, base_channels: int = 32) -> None:
        super().__init__()
        c = base_channels
        self.encoder = _Encoder(c)
        self.up3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.dec3 = ConvBlock(8 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = ConvBlock(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = ConvBlock(2 * c, c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2, x3, z = self.encoder(x)
        y = self.dec3(torch.cat([self.up3(z), x3], dim=1))
        y = self.dec2(torch.cat([self.up2(y), x2], dim=1))
        y = self.dec1(torch.cat([self.up1(y), x1], dim=1))
        return torch.sigmoid(self.head(y))


class SegmentationHead(nn.Module):
    """U-Net (widths c, 2c, 4c, bottleneck 4c, three skip connections) from image + reconstruction to a
    (N, 1, H, W) defect logit map."""

    def __init__(self, base_channels: int = 16) -> None:
        super().__init__()
        c = base_channels
        self.enc1 = ConvBlock(6, c)
        self.enc2 = ConvBlock(c, 2 * c)
        self.enc3 = ConvBlock(2 * c, 4 * c)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(4 * c, 4 * c)
        self.up3 = nn.ConvTranspose2d(4 * c, 4 * c, 2, stride=2)
        self.dec3 = ConvBlock(8 * c, 2 * c)
        self.up2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)
        self.dec2 = ConvBlock(4 * c, c)
        self.up1 = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.dec1 = ConvBlock(2 * c, c)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        x1 = self.enc1(torch.cat([image, recon], dim=1))
        x2 = self.enc2(self.pool(x1))
        x3 = self.enc3(self.pool(x2))
        z = self.bottleneck(self.pool(x3))
        y = self.dec3(torch.cat([self.up3(z), x3], dim=1))
        y = self.dec2(torch.cat([self.up2(y), x2], dim=1))
        y = self.dec1(torch.cat([self.up1(y), x1], dim=1))
        return self.head(y)


def _initialised(cls: type[M], base_channels: int, seed: int | None) -> M:
    """``cls(base_channels)``; with ``seed`` its initial weights depend on the seed only (the global RNG state
    is left as it was)."""
    if seed is None:
        return cls(base_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(base_channels)


def build_head(base_channels: int, seed: int | None = None) -> SegmentationHead:
    """A freshly initialised segmentation head; with ``seed`` its weights depend on the seed only."""
    return _initialised(SegmentationHead, base_channels, seed)


MODELS: dict[str, type[nn.Module]] = {"baseline": BaselineAutoencoder, "multiscale": MultiScaleAutoencoder}


def build_model(name: str, base_channels: int, seed: int | None = None) -> nn.Module:
    """A freshly initialised model by name (``baseline`` or ``multiscale``); with ``seed`` the initial
    weights depend on the seed only (the global RNG state is left as it was)."""
    if name not in MODELS:
        raise ParamsError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    return _initialised(MODELS[name], base_channels, seed)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
