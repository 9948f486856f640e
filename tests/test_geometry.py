"""One pixel scale per category (``pretrained.geometry: scale``): the working shape of every image size, the streamed
bank over images of several sizes, and scoring that batches by working shape and reads each image's score from its own
map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import save

from aead.data.mvtec import (Geometry, Sample, category_geometry, category_shape, image_sizes, load_geometry,
                             working_shape)
from aead.errors import DataError
from aead.models import maps
from aead.models.memory_bank import stream_bank
from aead.models.scoring import AnomalyMapper, Inputs, mean_and_peak_scale, score_inputs
from aead.models.torch_model import PretrainedPatchMemory

CPU = torch.device("cpu")


def samples_of(tmp_path, shapes: list[tuple[int, int]]) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(str(save(tmp_path / f"{i:03d}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))), "c", "good", 0,
                   None) for i, (h, w) in enumerate(shapes)]


def test_one_pixel_scale_scales_every_side_by_one_factor(tmp_path):
    train = samples_of(tmp_path, [(100, 300), (140, 420), (120, 150), (90, 400), (500, 120)])
    sizes = image_sizes(train, "test")
    geo = category_geometry(sizes, 224, "scale", 16)
    # the median image by area (90 x 400: 36,000 px) gets as many pixels as 224 x 224 x the median aspect ratio, 3
    scale = math.sqrt(224 * 224 * 3 / 36_000)
    assert geo.num / geo.den == pytest.approx(scale, rel=1e-5)
    assert geo.shape == category_shape(train, 224, 16) == (224, 672)  # the grid maps and masks are compared on
    assert geo.of(120, 150) == (240, 304)  # 245.4 and 306.7 px, each to the nearest multiple of 16
    assert geo.of(60, 1920) == (128, 3920)  # a 32:1 strip stays one (30.6:1 after rounding the short side)
    assert geo.of(3, 5) == (16, 16)  # at least one multiple
    for h, w in [(77, 129), (1000, 333), (120, 120), (90, 400)]:  # every side within half a multiple of its length
        for side, n in zip(geo.of(h, w), (h, w)):
            assert side % 16 == 0 and abs(side - n * scale) <= 8
    shape_geo = category_geometry(sizes, 224, "shape", 16)
    assert shape_geo.of(60, 1920) == shape_geo.shape == geo.shape
    assert Geometry.from_dict(geo.to_dict()) == geo
    with pytest.raises(DataError, match="geometry: expected one of scale, shape, got 'tiles'"):
        category_geometry(sizes, 224, "tiles", 16)


def test_on_a_category_of_one_size_both_geometries_give_the_same_shape(tmp_path):
    """(Up to sides whose scaled length ends exactly in .5, which :func:`working_shape` rounds to even.)"""
    for h, w in [(256, 256), (256, 640), (230, 1000), (480, 640), (645, 256), (1024, 1024)]:
        train = samples_of(tmp_path / f"{h}x{w}", [(h, w)] * 3)
        sizes = image_sizes(train, "test")
        scale, shape = category_geometry(sizes, 224, "scale", 16), category_geometry(sizes, 224, "shape", 16)
        assert scale.of(h, w) == shape.of(h, w) == working_shape(h, w, 224, 16)


def test_images_load_at_their_own_shape_and_masks_at_the_category_grid(tmp_path):
    train = samples_of(tmp_path / "train", [(32, 64), (32, 64), (48, 64)])
    geo = category_geometry(image_sizes(train, "test"), 32, "scale", 8)
    test = samples_of(tmp_path / "test", [(32, 64), (64, 32), (16, 256)])
    mask = np.zeros((16, 256), np.uint8)
    mask[4:8, 100:140] = 255
    test[2] = Sample(test[2].path, "c", "scratch", 1, str(save(tmp_path / "mask.png", mask)))
    images, masks = load_geometry(test, geo, with_masks=True)
    assert isinstance(images, list) and [i.shape for i in images] == [(32, 64, 3), (64, 32, 3), (16, 256, 3)]
    assert masks is not None and masks.shape == (3, *geo.shape) and masks[:2].sum() == 0 and masks[2].sum() > 0
    same, _ = load_geometry(test[:1] * 2, geo, with_masks=False)
    assert isinstance(same, np.ndarray) and same.shape == (2, 32, 64, 3)  # one working shape: one array


WEIGHTS = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(7))


def extract(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x, WEIGHTS, stride=4)


def test_a_bank_streams_images_of_several_sizes_with_their_own_patch_counts():
    rng = np.random.default_rng(1)
    shapes = [(16, 16)] * 3 + [(16, 32)] * 4 + [(32, 8)] * 2 + [(8, 64)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    counts = np.array([(h // 4) * (w // 4) for h, w in shapes])
    feats = torch.cat([extract(torch.from_numpy(i).permute(2, 0, 1)[None].float() / 255).permute(0, 2, 3, 1)
                       .reshape(-1, 40) for i in images])
    assert feats.shape[0] == counts.sum()

    def build(chunk: int, method: str, sample: int | None):
        out = stream_bank(extract, lambda a, b: images[a:b], len(images), method, 0.25, 1000, 3, sample, chunk, 1, CPU,
                          patch_counts=counts)
        assert out is not None
        return out

    whole = build(len(images), "greedy", None)
    assert whole.stats.patches == counts.sum() and whole.bank.shape[0] == round(0.25 * counts.sum())
    assert torch.allclose(whole.sample, feats, atol=1e-6)  # every patch, in order
    a, b = build(len(images), "random", 20), build(3, "random", 20)  # draws independent of the chunks
    assert torch.equal(a.bank, b.bank) and torch.equal(a.sample, b.sample)
    with pytest.raises(ValueError, match="patch_counts: 9 counts for 10 images"):
        stream_bank(extract, lambda a, b: images[a:b], len(images), "greedy", 0.25, 1000, 3, None, 4, 1, CPU,
                    patch_counts=counts[:-1])
    wrong = counts.copy()
    wrong[0] += 1
    with pytest.raises(ValueError, match="images 0:1 have 17 patches, got 16"):
        stream_bank(extract, lambda a, b: images[a:b], len(images), "greedy", 0.25, 1000, 3, None, 4, 1, CPU,
                    patch_counts=wrong)


def test_the_peak_scale_of_maps_of_several_sizes_is_over_images_not_pixels():
    a, b = torch.tensor([0.0, 2.0, 4.0, 2.0]), torch.tensor([1.0, 1.0])
    mean, scale = mean_and_peak_scale([a, b])
    assert float(mean) == pytest.approx(10 / 6) and float(scale) == pytest.approx((4 + 1) / 2 - 10 / 6)
    same = [torch.tensor([0.0, 3.0]), torch.tensor([1.0, 2.0])]
    assert [float(v) for v in mean_and_peak_scale(same)] == [float(v) for v in mean_and_peak_scale(torch.stack(same))]


class _Ramp(PretrainedPatchMemory):
    """A stand-in pretrained memory whose map is the image's mean brightness plus a horizontal ramp: a map that depends
    on the image's own size, so that scoring at the wrong shape shows."""

    def __init__(self) -> None:
        torch.nn.Module.__init__(self)

    def distance_map(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = torch.linspace(0, 1, w).expand(n, h, w)
        return x.mean(dim=(1, 2, 3))[:, None, None] + ramp


def test_scoring_batches_by_working_shape_and_reads_each_score_from_its_own_map():
    rng = np.random.default_rng(2)
    shapes = [(16, 64), (32, 32), (16, 64), (48, 16), (16, 64), (32, 32)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    inputs = Inputs(None, images)
    groups = list(inputs.groups(2))
    assert sorted(np.concatenate(groups).tolist()) == list(range(6))
    assert all(len({shapes[i] for i in g}) == 1 and len(g) <= 2 for g in groups)
    mapper = AnomalyMapper(("pretrained",), (32, 32), 1.0, 1.5, 0.0, pretrained=_Ramp(),
                           geometry=Geometry("scale", (32, 32), 1, 1, 8))
    scored = score_inputs(mapper, inputs, 2, CPU, own_maps=True)
    assert scored.maps.shape == (6, 32, 32) and scored.own is not None
    for i, image in enumerate(images):
        alone = mapper(None, torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
        assert scored.own[i].shape == shapes[i]
        np.testing.assert_allclose(scored.own[i], alone[0].numpy(), rtol=1e-6)
        expected = maps.image_scores(alone, smooth_sigma=0.0)
        for name, value in expected.items():
            assert scored.scores[name][i] == pytest.approx(float(value[0]), rel=1e-6)
