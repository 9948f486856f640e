"""The two autoencoders of the seed project, as pure torch modules.

``ConvBlock`` = (Conv3x3 -> BatchNorm -> ReLU) x 2. Both models share the encoder
(3 -> c -> 2c -> 4c, MaxPool(2) after each block) and the bottleneck (4c -> 8c); they differ in the decoder:
the baseline upsamples without skip connections, the multi-scale (U-Net style) model concatenates the
matching encoder output before each decoder block. With ``base_channels`` c = 32 they have 1.73M and
1.93M parameters, as in the seed.

``SegmentationHead`` is the discriminative part of DRAEM (Zavrtanik et al., ICCV 2021): a small U-Net that sees an
image next to its reconstruction (6 channels) and outputs one defect logit per pixel. It is trained after the
autoencoder, on synthetic defects, to tell where input and reconstruction differ in a way a defect would.

``PatchMemory`` is the memory bank of PatchCore (Roth et al., CVPR 2022), built on this project's own encoder
instead of a pretrained network: patch features of defect-free training images (the three encoder levels,
each averaged over its 3x3 neighbourhood and brought to one ``feature_size`` grid). A test patch's anomaly is its
distance to the nearest stored patch. With a ``padding`` (``memory_bank.border_padding``; 0 by default), the image is
mirrored outwards by that many pixels before the encoder and the features are cropped back to the image, so that a
patch near the border is described by its mirrored surroundings instead of by the convolutions' zero padding.

``FeatureDiscriminator`` is the trained part of SimpleNet (Liu et al., CVPR 2023) on the pretrained patch features: a
linear adaptor and a one-hidden-layer classifier, trained to tell the defect-free training patches' features from the
same features plus Gaussian noise. A patch whose features lie off the defect-free manifold in any direction scores
high even where its nearest stored patch is close, which finds thin and faint surface defects a bank misses.

``BrightnessModel`` is a per-position Gaussian (PaDiM's, on one channel) of an image's relative brightness: the log of
its gray level's local mean less the image's median of it, compared at each relative position with its mean over the
training images, in units of its standard deviation there. It sees a smooth brightness change without an edge (uneven
regions, shading defects), which ImageNet features barely do.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

from aead.errors import ParamsError
from aead.models.maps import blur_by_convolution

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

    def levels(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The three encoder blocks' outputs, at full, half and quarter resolution."""
        x1 = self.enc1(x)
        x2 = self.enc2(self.pool(x1))
        return x1, x2, self.enc3(self.pool(x2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x1, x2, x3 = self.levels(x)
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


def patch_features(encoder: nn.Module, x: Tensor, feature_size: int, padding: int = 0) -> Tensor:
    """(N, 7c, feature_size, feature_size) patch features of images ``x``: each encoder level averaged over
    its 3x3 neighbourhood (PatchCore's local aggregation), then average-pooled (or bilinearly upsampled) to
    the ``feature_size`` grid, and concatenated.

    ``padding`` (a multiple of 4, less than the image side): the image is first extended by that many mirrored
    pixels on each side, and every level is cropped back to the image before pooling. Without it, the
    convolutions' zero padding makes patches up to the deepest level's receptive field (about 20 pixels) from
    the border look unlike the same texture inside the image."""
    if padding % 4 or padding < 0:
        raise ValueError(f"patch_features: padding must be a non-negative multiple of 4, got {padding}")
    if padding:
        x = nn.functional.pad(x, (padding, padding, padding, padding), mode="reflect")
    out = []
    for scale, level in enumerate(encoder.levels(x)):
        level = nn.functional.avg_pool2d(level, 3, stride=1, padding=1, count_include_pad=False)
        if padding:  # the levels are at full, half and quarter resolution
            c = padding >> scale
            level = level[..., c : level.shape[-2] - c, c : level.shape[-1] - c]
        if level.shape[-1] >= feature_size:
            level = nn.functional.adaptive_avg_pool2d(level, feature_size)
        else:
            level = nn.functional.interpolate(level, size=(feature_size, feature_size), mode="bilinear",
                                              align_corners=False)
        out.append(level)
    return torch.cat(out, dim=1)


EXPORT_BANK_CHUNK = 4096  # bank rows per step in an exported graph: a batch of 8 images of 784 patches ranks in 103 MB


def nearest_distance(queries: Tensor, bank: Tensor, query_chunk: int = 512, bank_chunk: int = 65536) -> Tensor:
    """(Q,): the Euclidean distance of each row of ``queries`` (Q, C) to its nearest row of ``bank`` (M, C), exact,
    in fp32. Queries are taken ``query_chunk`` at a time and the bank ``bank_chunk`` rows at a time, so memory stays
    at ``query_chunk x bank_chunk`` floats however large either is (small query chunks stay in cache: 2.9x faster than
    4096 for a 5222-patch bank, measured on the development CPU).

    In a graph being exported (``torch.export``, ONNX) the number of queries is symbolic (any batch size), so all
    queries are ranked together against :data:`EXPORT_BANK_CHUNK` bank rows at a time: the same arithmetic per query."""
    with torch.autocast(queries.device.type, enabled=False):  # distances in bf16 would be too coarse
        queries, bank = queries.float(), bank.float()
        bank_sq = (bank * bank).sum(1)
        if torch.compiler.is_exporting():
            return _nearest_rows(queries, bank, bank_sq, EXPORT_BANK_CHUNK)
        return torch.cat([_nearest_rows(queries[s : s + query_chunk], bank, bank_sq, bank_chunk)
                          for s in range(0, queries.shape[0], query_chunk)])


def _nearest_rows(a: Tensor, bank: Tensor, bank_sq: Tensor, bank_chunk: int) -> Tensor:
    """(Q,): the distance of each row of ``a`` to its nearest row of ``bank`` (whose squared norms are ``bank_sq``),
    ranking ``bank_chunk`` bank rows at a time."""
    best = torch.full((a.shape[0],), float("inf"), device=a.device)
    best_row = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    for b in range(0, bank.shape[0], bank_chunk):
        part = bank[b : b + bank_chunk]
        # |a - b|^2 - |a|^2 = |b|^2 - 2 a.b ranks the bank for each query in one matrix product
        ranking = torch.addmm(bank_sq[b : b + bank_chunk][None, :], a, part.T, alpha=-2.0)
        value, row = ranking.min(dim=1)
        closer = value < best
        best = torch.where(closer, value, best)
        best_row = torch.where(closer, row + b, best_row)
    # the ranking cancels digits, so the distance to the chosen neighbour is measured directly
    return (a - bank[best_row]).norm(dim=1)


def principal_axes(bank: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The mean (C,) of the rows of ``bank`` (M, C) and their ``dim`` principal axes as the columns of a (C, dim)
    projection, largest variance first: computed in float64 (eigenvectors of the covariance), each axis's sign fixed
    so that its largest component is positive, returned in float32."""
    x = bank.double()
    mean = x.mean(0)
    centred = x - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred / max(1, x.shape[0] - 1))
    axes = vectors[:, -dim:].flip(1)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    return mean.float(), (axes * signs).float()


def candidate_distance(queries: Tensor, bank: Tensor, mean: Tensor, projection: Tensor, bank_projected: Tensor,
                       candidates: int, query_chunk: int = 512) -> Tensor:
    """(Q,): for each row of ``queries`` (Q, C), the exact Euclidean distance to the nearest of its ``candidates``
    candidate rows of ``bank`` (M, C): the rows nearest to it in the bank's principal subspace (``mean``,
    ``projection`` (C, d), ``bank_projected`` = (bank - mean) @ projection, from :func:`principal_axes`). A two-stage
    search: ranking the bank in d dimensions costs d/C of the exact search, and re-ranking the candidates in all C
    dimensions makes every distance a true distance to a stored patch, the nearest one unless the subspace ranked it
    below ``candidates`` others (then a slightly larger one). In an exported graph all queries are ranked together,
    :data:`EXPORT_BANK_CHUNK` bank rows at a time, keeping the best ``candidates`` of each part: the same candidates."""
    with torch.autocast(queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        k = min(candidates, bank.shape[0])
        projected_sq = (bank_projected * bank_projected).sum(1)
        if torch.compiler.is_exporting():
            return _candidate_rows(queries, bank, mean, projection, bank_projected, projected_sq, k, EXPORT_BANK_CHUNK)
        return torch.cat([_candidate_rows(queries[s : s + query_chunk], bank, mean, projection, bank_projected,
                                          projected_sq, k, bank.shape[0])
                          for s in range(0, queries.shape[0], query_chunk)])


def _candidate_rows(a: Tensor, bank: Tensor, mean: Tensor, projection: Tensor, bank_projected: Tensor,
                    projected_sq: Tensor, k: int, bank_chunk: int) -> Tensor:
    """:func:`candidate_distance` of the rows of ``a``, ranking ``bank_chunk`` bank rows at a time."""
    ap = (a - mean) @ projection
    values, rows = [], []
    for b in range(0, bank.shape[0], bank_chunk):
        ranking = torch.addmm(projected_sq[b : b + bank_chunk][None, :], ap, bank_projected[b : b + bank_chunk].T,
                              alpha=-2.0)
        value, row = ranking.topk(min(k, ranking.shape[1]), dim=1, largest=False, sorted=False)
        values.append(value)
        rows.append(row + b)
    row = rows[0]
    if len(rows) > 1:
        pick = torch.cat(values, 1).topk(k, dim=1, largest=False, sorted=False).indices
        row = torch.cat(rows, 1).gather(1, pick)
    return (a[:, None, :] - bank[row]).norm(dim=2).min(1).values


class PatchMemory(nn.Module):
    """PatchCore's memory on this project's encoder: defect-free patch features (``bank``, (M, C)) on a
    ``feature_size`` grid, and the nearest-patch distance map of new images."""

    def __init__(self, bank_size: int, channels: int, feature_size: int, padding: int = 0) -> None:
        super().__init__()
        self.feature_size = feature_size
        self.padding = padding
        self.register_buffer("bank", torch.zeros(bank_size, channels))

    def distance_map(self, encoder: nn.Module, x: Tensor) -> Tensor:
        """(N, H, W): for each patch of ``x``, the Euclidean distance to its nearest neighbour in the bank,
        bilinearly upsampled to the image. Computed in fp32, also under autocast."""
        n, _, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            f = patch_features(encoder, x.float(), self.feature_size, self.padding)
            d = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), self.bank)
            d = d.reshape(n, 1, self.feature_size, self.feature_size)
            return nn.functional.interpolate(d, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


class FeatureDiscriminator(nn.Module):
    """SimpleNet's adaptor and discriminator over (N, C, h, w) patch features: each channel standardised by the
    training patches' ``mean`` and ``scale``, a linear ``adaptor`` (C -> C, initialised to the identity), then
    ``hidden`` (C -> H), LeakyReLU(0.2) and ``out`` (H -> 1). :meth:`logits` is high for defect-free features;
    :meth:`forward` returns its negative, an anomaly score per patch."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))
        self.adaptor = nn.Linear(channels, channels)
        self.hidden = nn.Linear(channels, hidden)
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.adaptor.weight.copy_(torch.eye(channels))
            self.adaptor.bias.zero_()

    def adapt(self, patches: Tensor) -> Tensor:
        """(M, C) standardised and adapted patch features."""
        return self.adaptor((patches - self.mean) / self.scale)

    def logits(self, adapted: Tensor) -> Tensor:
        """(M,) defect-free logits of adapted features."""
        return self.out(nn.functional.leaky_relu(self.hidden(adapted), 0.2))[:, 0]

    def forward(self, f: Tensor) -> Tensor:
        n, c, h, w = f.shape
        return -self.logits(self.adapt(f.permute(0, 2, 3, 1).reshape(-1, c))).reshape(n, 1, h, w)


STD_FLOOR = 0.01  # a 1 % change of brightness (8-bit quantisation at mid-gray is 0.8 %) is at most one unit of the map


class BrightnessModel(nn.Module):
    """Where an image's brightness departs from the training images' at the same relative position.

    :meth:`field` is the log of the gray level's local mean (Gaussian ``sigma`` pixels) less its median over the image,
    so a brighter or darker exposure of the whole image changes nothing. ``mean`` and ``std`` (``grid``, cells of
    ``sigma`` pixels of the category's working shape) are its mean and standard deviation over the training images
    (:meth:`fit`), the standard deviation floored at its median over the cells and at :data:`STD_FLOOR`; both are
    stretched over each image, whatever its size, and the map is ``|field - mean| / std``."""

    def __init__(self, sigma: float, grid: tuple[int, int]) -> None:
        super().__init__()
        if sigma <= 0:
            raise ParamsError(f"pretrained.brightness_sigma: expected a positive number of pixels, got {sigma}")
        self.sigma = float(sigma)
        self.register_buffer("mean", torch.zeros(grid))
        self.register_buffer("std", torch.ones(grid))

    @staticmethod
    def grid_of(shape: tuple[int, int], sigma: float) -> tuple[int, int]:
        """The cells of ``sigma`` pixels that cover a working ``shape`` (at least one per side)."""
        return tuple(max(1, -(-int(side) // max(1, round(sigma)))) for side in shape)  # type: ignore[return-value]

    def field(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) relative log brightness of float images ``x`` (N, 3, H, W) in [0, 1]."""
        gray = x.mean(dim=1, keepdim=True)
        # by 1-D convolutions at every size, as in an exported graph, so that both round alike
        blurred = blur_by_convolution(gray, self.sigma)
        local = torch.log(blurred + 8.0 / 255.0)
        flat = local.flatten(1)
        # the lower median, as the k-th largest value (k in integers: exportable like the top-1 % score)
        k = flat.shape[1] - (flat.shape[1] - 1) // 2
        median = flat.topk(k, dim=1).values[:, -1]
        return local - median[:, None, None, None]

    def cells(self, x: Tensor) -> Tensor:
        """(N, *grid): the :meth:`field` of float images ``x`` (N, 3, H, W) averaged over each cell of the grid."""
        return nn.functional.interpolate(self.field(x), size=tuple(self.mean.shape), mode="area")[:, 0]

    @torch.no_grad()
    def fit(self, cells: Tensor) -> None:
        """Set ``mean`` and ``std`` from the training images' :meth:`cells` (N, *grid)."""
        cells = cells.double()
        mean = cells.mean(0)
        std = cells.std(0) if cells.shape[0] > 1 else torch.ones_like(mean)
        self.mean.copy_(mean)
        self.std.copy_(torch.maximum(std, std.median()).clamp_min(STD_FLOOR))

    def forward(self, x: Tensor) -> Tensor:
        """(N, H, W) map of float images ``x`` (N, 3, H, W) in [0, 1]."""
        f = self.field(x)
        mean, std = (nn.functional.interpolate(v[None, None], size=f.shape[-2:], mode="bilinear", align_corners=False)
                     for v in (self.mean, self.std))
        return ((f - mean).abs() / std)[:, 0]


class PretrainedPatchMemory(nn.Module):
    """PatchCore (Roth et al., CVPR 2022) on a frozen ImageNet backbone: each chosen layer's output averaged over its
    ``neighbourhood`` x ``neighbourhood`` patches, the deeper layers bilinearly upsampled to the grid of the first
    (finest) one, concatenated; ``bank`` (M, C) holds such patch features of defect-free images, and a new image's
    anomaly map is each patch's distance to its nearest stored patch, upsampled to the image.

    With a ``discriminator`` (:class:`FeatureDiscriminator`, trained on the bank's training patches), the map is the
    sum of the two maps, nearest-patch distance and discriminator score, each less its mean and divided by its peak
    scale over defect-free validation images (``part_scales``, (2, 2): a row of mean and scale per part).

    The neighbourhood average counts the positions outside the image as zeros (PatchCore's pooling), so the features
    of the outermost patches, and with them their distances, shrink by the share of their neighbourhood that lies
    inside the image: the border, where the backbone sees its own zero padding, cannot dominate the map (without
    that, the corners of defect-free texture images scored highest).

    ``padding``: the image is first extended by that many mirrored pixels on each side (a multiple of the deepest
    layer's stride) and the features are cropped back to the image, so that patches near the border are described
    by mirrored surroundings instead, at the cost of the padded pixels (0, the default, pads nothing).

    The bank is searched exactly (:func:`nearest_distance`) until :meth:`index_bank` gives it a two-stage search
    (:func:`candidate_distance`: candidates ranked in the bank's principal subspace, re-ranked in all channels).

    With a ``brightness`` model (:class:`BrightnessModel`), the map is the larger, at each pixel, of the features' map
    (the above) and the brightness map, each less the mean of its validation images' ``top1`` scores and divided by
    their standard deviation (``fusion_scales``, (2, 2)): either part flags a pixel by itself, in units of how much
    its own scores vary over defect-free images."""

    def __init__(self, backbone: nn.Module, layers: tuple[str, ...], neighbourhood: int, bank_size: int,
                 channels: int, padding: int = 0, discriminator: FeatureDiscriminator | None = None,
                 brightness: BrightnessModel | None = None) -> None:
        super().__init__()
        strides = [backbone.stride(name) for name in layers]
        if padding < 0 or padding % max(strides):
            raise ParamsError(f"pretrained.border_padding: expected a multiple of {max(strides)} (the stride of the "
                              f"deepest of pretrained.layers), got {padding}")
        self.backbone = backbone.eval()
        self.layers = tuple(layers)
        self.neighbourhood = neighbourhood
        self.padding = padding
        self.crop = padding // strides[0]  # grid cells of the finest layer covered by the mirrored border
        self.register_buffer("bank", torch.zeros(bank_size, channels))
        self.discriminator = discriminator
        self.register_buffer("part_scales", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        self.brightness = brightness
        self.register_buffer("fusion_scales", torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        self.search_candidates = 0
        self.register_buffer("search_mean", torch.zeros(channels))
        self.register_buffer("search_projection", torch.zeros(channels, 0))
        self.register_buffer("bank_projected", torch.zeros(bank_size, 0))

    def index_bank(self, dim: int, candidates: int) -> None:
        """Search the bank in two stages from now on (:func:`candidate_distance`): ``candidates`` candidates ranked in
        the bank's ``dim`` principal dimensions; ``candidates`` 0 (or ``dim`` not below the channels): exactly."""
        channels = self.bank.shape[1]
        if candidates == 0 or dim >= channels:
            self.search_candidates = 0
            self.search_mean = torch.zeros_like(self.search_mean)
            self.search_projection = self.bank.new_zeros(channels, 0)
            self.bank_projected = self.bank.new_zeros(self.bank.shape[0], 0)
            return
        self.set_search(*principal_axes(self.bank, dim), candidates)

    def set_search(self, mean: Tensor, projection: Tensor, candidates: int) -> None:
        """Search the bank in two stages with ``candidates`` candidates ranked in the subspace of ``mean`` (C,) and
        ``projection`` (C, d) (:func:`principal_axes`, or as a checkpoint stored them); the bank's projection is
        derived from them."""
        self.search_candidates = candidates
        self.search_mean, self.search_projection = mean.to(self.bank), projection.to(self.bank)
        self.bank_projected = (self.bank - self.search_mean) @ self.search_projection

    def nearest(self, queries: Tensor) -> Tensor:
        """(Q,): each row of ``queries`` (Q, C)'s distance to its nearest stored patch, by the bank's search (exact,
        or in two stages after :meth:`index_bank`)."""
        if self.search_candidates:
            return candidate_distance(queries, self.bank, self.search_mean, self.search_projection,
                                      self.bank_projected, self.search_candidates)
        return nearest_distance(queries, self.bank)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, h, w) patch features of float images ``x`` (N, 3, H, W) in [0, 1], on the finest layer's grid."""
        k, p = self.neighbourhood, self.padding
        if p:
            x = nn.functional.pad(x, (p, p, p, p), mode="reflect")
        out: list[Tensor] = []
        for level in self.backbone(x, self.layers):
            if k > 1:
                level = nn.functional.avg_pool2d(level, k, stride=1, padding=k // 2, count_include_pad=True)
            if out and level.shape[-2:] != out[0].shape[-2:]:
                level = nn.functional.interpolate(level, size=out[0].shape[-2:], mode="bilinear", align_corners=False)
            out.append(level)
        f = torch.cat(out, dim=1)
        if self.crop:
            c = self.crop
            f = f[..., c : f.shape[-2] - c, c : f.shape[-1] - c]
        return f

    def part_maps(self, x: Tensor) -> list[Tensor]:
        """The (N, H, W) maps of ``x`` upsampled to the image: nearest-patch distances, with a discriminator its
        scores, with a brightness model its map; fp32, also under autocast."""
        n, _, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            f = self.features(x)
            grids = [self.nearest(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])).reshape(
                n, 1, f.shape[-2], f.shape[-1])]
            if self.discriminator is not None:
                grids.append(self.discriminator(f))
            maps = [nn.functional.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                    for g in grids]
            if self.brightness is not None:
                maps.append(self.brightness(x))
            return maps

    def feature_map(self, parts: list[Tensor], scales: Tensor | None = None) -> Tensor:
        """The features' map from :meth:`part_maps`: the nearest-patch distances, or with a discriminator the sum of
        both on their validation scales (``scales``, by default :attr:`part_scales`)."""
        features = parts[: 1 + (self.discriminator is not None)]
        if len(features) == 1:
            return features[0]
        return sum_on_scales(features, self.part_scales if scales is None else scales)

    def distance_map(self, x: Tensor) -> Tensor:
        """(N, H, W) anomaly map of ``x``: the features' map (:meth:`feature_map`), with a brightness model the
        larger of it and the brightness map on their validation scales; upsampled to the image, fp32, also under
        autocast."""
        parts = self.part_maps(x)
        features = self.feature_map(parts)
        if self.brightness is None:
            return features
        s = self.fusion_scales
        return torch.maximum((features - s[0, 0]) / s[0, 1], (parts[-1] - s[1, 0]) / s[1, 1])


def sum_on_scales(part_maps: list[Tensor], scales: Tensor) -> Tensor:
    """The sum of ``part_maps``, each less its mean and divided by its scale (``scales``: a row of mean and scale
    per part): how several anomaly maps are put on one scale and fused."""
    total = (part_maps[0] - scales[0, 0]) / scales[0, 1]
    for i in range(1, len(part_maps)):
        total = total + (part_maps[i] - scales[i, 0]) / scales[i, 1]
    return total


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
