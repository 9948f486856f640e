"""The pretrained map's brightness model: a per-position Gaussian of the relative log brightness that finds a smooth
brightness change without an edge, ignores a change of exposure, stretches over images of any size, and takes the
larger of its map and the features' map on their validation scales; it survives a checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aead.errors import ParamsError
from aead.models.backbones import build_backbone
from aead.models.maps import gaussian_blur, image_scores
from aead.models.memory_bank import fit_brightness, validation_scales
from aead.models.torch_model import STD_FLOOR, BrightnessModel, FeatureDiscriminator, PretrainedPatchMemory
from aead.training.checkpoint import load_pretrained_bank, save_pretrained_bank


def surfaces(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """(n, 3, h, w) gray surfaces in [0, 1]: fine grain on a shading that falls from left to right, as a lamp makes."""
    gen = torch.Generator().manual_seed(seed)
    shading = torch.linspace(0.65, 0.45, w).expand(h, w)
    grain = gaussian_blur(torch.rand(n, 1, h, w, generator=gen), 1.0) - 0.5
    return (shading + 0.3 * grain).clamp(0, 1).expand(n, 3, h, w).contiguous()


def ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    hard = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()
    return gaussian_blur(hard[None, None], 4.0)[0, 0]


@pytest.fixture(scope="module")
def model() -> BrightnessModel:
    train = surfaces(24, 96, 160, seed=0)
    m = BrightnessModel(8.0, BrightnessModel.grid_of((96, 160), 8.0))
    assert tuple(m.mean.shape) == (12, 20)
    m.fit(torch.cat([m.cells(train[i : i + 8]) for i in range(0, 24, 8)]))
    return m.eval()


def test_a_darker_region_without_an_edge_scores_above_every_good_image(model):
    good = surfaces(16, 96, 160, seed=1)
    soft = ellipse(96, 160, 48, 100, 18, 30)
    defective = good[:4] * (1 - 0.15 * soft)  # 15 % darker at its centre, no edge
    with torch.no_grad():
        good_scores = image_scores(model(good), smooth_sigma=0.0)["top1"]
        maps = model(defective)
        scores = image_scores(maps, smooth_sigma=0.0)["top1"]
    assert scores.min() > good_scores.max()
    peak = maps[0].flatten().argmax().item()
    assert soft[peak // 160, peak % 160] > 0.5, "the map peaks inside the darker region"


def test_a_change_of_exposure_or_shading_seen_in_training_is_not_a_defect(model):
    good = surfaces(4, 96, 160, seed=2)
    with torch.no_grad():
        base = model(good)
        brighter = model(good * 1.2)  # the whole image brighter: the relative brightness is nearly the same
    assert (brighter - base).abs().max() < 0.25 * base.max()
    assert torch.allclose(model.field(good * 1.2), model.field(good), atol=0.02)


def test_the_grid_stretches_over_an_image_of_any_size(model):
    for h, w in ((48, 80), (96, 640), (33, 17)):
        x = surfaces(2, h, w, seed=3)
        with torch.no_grad():
            amap = model(x)
        assert amap.shape == (2, h, w) and torch.isfinite(amap).all()


def test_its_deviation_is_floored_at_the_median_cell(model):
    assert torch.all(model.std >= model.std.median() - 1e-12) and torch.all(model.std >= STD_FLOOR)
    with pytest.raises(ParamsError, match="brightness_sigma"):
        BrightnessModel(0.0, (2, 2))


def test_fit_reads_the_training_images_chunk_by_chunk():
    images = (surfaces(10, 64, 96, seed=4).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    reads = []

    def load(start: int, stop: int) -> np.ndarray:
        reads.append((start, stop))
        return images[start:stop]

    chunked = fit_brightness(8.0, (64, 96), load, 10, 4, 3, torch.device("cpu"))
    whole = fit_brightness(8.0, (64, 96), lambda a, b: images[a:b], 10, 10, 10, torch.device("cpu"))
    assert reads == [(0, 4), (4, 8), (8, 10)]
    assert torch.allclose(chunked.mean, whole.mean, atol=1e-6) and torch.allclose(chunked.std, whole.std, atol=1e-6)


@pytest.fixture(scope="module")
def memory(model) -> PretrainedPatchMemory:
    torch.manual_seed(0)
    mem = PretrainedPatchMemory(build_backbone("efficientnet_lite0"), ("blocks.4", "blocks.10"), 3, 64, 152, 0,
                                FeatureDiscriminator(152, 8), BrightnessModel(8.0, (12, 20)))
    with torch.no_grad():
        mem.bank.normal_()
        mem.discriminator.out.weight.normal_()
        mem.brightness.load_state_dict(model.state_dict())
    return mem.eval()


def test_the_map_is_the_larger_of_the_features_and_the_brightness_on_their_validation_scales(memory):
    val = (surfaces(5, 96, 160, seed=5).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    scales, fusion = validation_scales(memory, val, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        memory.part_scales.copy_(scales)
        memory.fusion_scales.copy_(fusion)
        x = torch.from_numpy(val).permute(0, 3, 1, 2).float() / 255.0
        distances, disc, bright = memory.part_maps(x)
        features = (distances - scales[0, 0]) / scales[0, 1] + (disc - scales[1, 0]) / scales[1, 1]
        for row, amap in zip(fusion.double(), (features, bright)):
            top = image_scores(amap, smooth_sigma=0.0)["top1"].double()
            assert row[0].item() == pytest.approx(top.mean().item(), rel=1e-5)
            assert row[1].item() == pytest.approx(top.std().item(), rel=1e-4)
        expected = torch.maximum((features - fusion[0, 0]) / fusion[0, 1], (bright - fusion[1, 0]) / fusion[1, 1])
        assert torch.allclose(memory.distance_map(x), expected, atol=1e-5)
        assert math.isclose(memory.feature_map([distances, disc, bright]).sub(features).abs().max().item(), 0,
                            abs_tol=1e-5)


def test_a_bank_with_a_brightness_model_round_trips(memory, tmp_path):
    memory.fusion_scales.copy_(torch.tensor([[0.5, 2.0], [1.5, 0.25]]))
    path = tmp_path / "bank.pt"
    save_pretrained_bank(path, memory, {"backbone": "efficientnet_lite0", "layers": list(memory.layers),
                                        "neighbourhood": 3, "shape": [96, 160]})
    loaded, meta = load_pretrained_bank(path)
    assert meta["brightness_grid"] == [12, 20] and loaded.brightness is not None and loaded.brightness.sigma == 8.0
    x = torch.rand(1, 3, 96, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.distance_map(x), memory.distance_map(x))
