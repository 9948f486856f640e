from __future__ import annotations

import pytest
import torch

from aead.errors import ParamsError
from aead.models.torch_model import BaselineAutoencoder, MultiScaleAutoencoder, build_head, build_model, count_parameters


def test_parameter_counts_match_the_seed():
    assert count_parameters(BaselineAutoencoder(32)) == 1_733_539  # seed: ~1.73M
    assert count_parameters(MultiScaleAutoencoder(32)) == 1_927_075  # seed: ~1.93M


@pytest.mark.parametrize("name", ["baseline", "multiscale"])
@pytest.mark.parametrize("size", [8, 24, 64])
def test_any_size_divisible_by_8_round_trips(name, size):
    model = build_model(name, 4).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_skip_connections_only_in_multiscale():
    assert build_model("multiscale", 8).dec3[0].in_channels == 64  # 4c upsampled + 4c skip
    assert build_model("baseline", 8).dec3[0].in_channels == 32


def test_unknown_model():
    with pytest.raises(ParamsError, match="unknown model"):
        build_model("vae", 8)


HEAD_PARAMETERS_16 = 233121  # the default segmentation head (segmentation.base_channels: 16)


@pytest.mark.parametrize("size", [8, 24, 64])
def test_segmentation_head_gives_one_logit_per_pixel(size):
    head = build_head(4, seed=0).eval()
    image, recon = torch.rand(2, 3, size, size), torch.rand(2, 3, size, size)
    assert head(image, recon).shape == (2, 1, size, size)
    assert not torch.equal(head(image, recon), head(image, image))  # it looks at the reconstruction
    same = build_head(4, seed=0).eval()
    assert torch.equal(same(image, recon), head(image, recon))
    assert count_parameters(build_head(16)) == HEAD_PARAMETERS_16
