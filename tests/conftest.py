"""Shared fixtures: the repository root, the committed params, and small MVTec-layout folders."""

from __future__ import annotations

import os
from pathlib import Path

# The pipeline's default (model.deterministic: true) pins PyTorch's CPU kernels to AVX2 and MKL to its reproducible
# AVX2 mode before the first computation of a process; the test process computes before any stage function runs, so
# it starts pinned (aead.training.numerics.configure checks this and would refuse).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def raw_params() -> dict:
    """params.yaml as committed, as a plain mapping (tests modify a copy)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.fixture
def odd_dataset(tmp_path: Path) -> Path:
    return make_odd_dataset(tmp_path)


@pytest.fixture(scope="module")
def odd_dataset_module(tmp_path_factory) -> Path:
    return make_odd_dataset(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def raw_params_module() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def make_odd_dataset(tmp_path: Path) -> Path:
    """A tiny real-world-like MVTec folder: grayscale PNG, RGB JPEG and BMP of different sizes,
    one defect image without a mask, masks stored with values 0/1 and one as JPEG-ish noisy 0/255."""
    rng = np.random.default_rng(0)
    root = tmp_path / "odd"
    cat = root / "widget"
    for i, (h, w) in enumerate([(40, 48), (56, 56), (48, 40), (64, 64), (40, 40), (50, 60)]):
        gray = (rng.random((h, w)) * 80 + 90).astype(np.uint8)
        save(cat / "train" / "good" / f"{i:03d}.png", gray)
    save(cat / "train" / "good" / "006.jpg", (rng.random((48, 48, 3)) * 80 + 90).astype(np.uint8), quality=95)
    save(cat / "train" / "good" / "007.bmp", (rng.random((48, 48, 3)) * 80 + 90).astype(np.uint8))
    save(cat / "test" / "good" / "000.png", (rng.random((40, 48)) * 80 + 90).astype(np.uint8))
    save(cat / "test" / "good" / "001.png", (rng.random((52, 52)) * 80 + 90).astype(np.uint8))
    for i, (h, w) in enumerate([(40, 48), (60, 60)]):
        img = (rng.random((h, w)) * 80 + 90).astype(np.uint8)
        img[10:20, 10:20] = 250
        save(cat / "test" / "scratch" / f"{i:03d}.png", img)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[10:20, 10:20] = 1 if i == 0 else 255
        if i == 1:
            mask = np.clip(mask.astype(int) + rng.integers(0, 20, mask.shape), 0, 255).astype(np.uint8)
        save(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    unmasked = (rng.random((44, 44)) * 80 + 90).astype(np.uint8)
    unmasked[5:9, 5:30] = 10
    save(cat / "test" / "scratch" / "002.png", unmasked)
    return root


def train_everything(params, models_root: Path) -> None:
    """Every trained part of the pipeline, as the training stages make them: both autoencoders, their heads and
    banks, and the pretrained banks."""
    from aead.models.memory_bank import build_banks_and_save, build_pretrained_banks_and_save
    from aead.training.loops import train_and_save, train_heads_and_save

    quiet = lambda m: None  # noqa: E731
    for model in ("baseline", "multiscale"):
        train_and_save(params, model, models_root / model, log=quiet)
        train_heads_and_save(params, model, models_root, models_root / "heads" / model, log=quiet)
        build_banks_and_save(params, model, models_root, models_root / "banks" / model, log=quiet)
    build_pretrained_banks_and_save(params, models_root / "pretrained", log=quiet)


def tiny_training(raw: dict) -> dict:
    """Params that train for a step or two: tiny widths, one epoch, few head steps, small pretrained images."""
    raw["model"].update(epochs=1, batch_size=4)
    raw["baseline"]["base_channels"] = 4
    raw["multiscale"]["base_channels"] = 4
    raw["segmentation"].update(steps=3, batch_size=4, base_channels=4)
    raw["memory_bank"].update(feature_size=8)
    # the brightness model on (off by default): the tests of the pretrained map, its export and predict cover it
    raw["pretrained"].update(image_size=32, discriminator_steps=5, brightness_sigma=16.0)
    return raw
