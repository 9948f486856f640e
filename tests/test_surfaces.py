"""Surfaces of mixed sizes and long strips through the pretrained map: the real stage functions (prepare-split,
build-pretrained-bank, evaluate-pretrained) and `aead predict`, on a category whose images range from 16:1 strips to
1:4 portraits. Every image is scored, and predict's maps come back at each image's own size."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import save

from aead import io
from aead.data.mvtec import Geometry
from aead.evaluation.evaluate import calibration_record, evaluate
from aead.models.memory_bank import build_pretrained_banks_and_save
from aead.params import parse_params
from aead.data.prepare import prepare_split

# (height, width): 16:1 strips dominate the training set, so the category's working shape is a long strip too
TRAIN_SHAPES = [(16, 256)] * 5 + [(20, 320), (24, 300), (12, 200)]
TEST_SHAPES = [(16, 256), (32, 512), (40, 180), (128, 32)]  # a strip, a larger strip, a wide crop, a tall crop


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grayscale stripes with noise: a brushed-metal-like surface."""
    x = np.arange(w)[None, :]
    base = 120 + 30 * np.sin(x / 3.0) + rng.normal(0, 6, (h, w))
    return base.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def strips(tmp_path_factory, raw_params_module):
    rng = np.random.default_rng(3)
    work = tmp_path_factory.mktemp("surfaces")
    cat = work / "data" / "strip"
    for i, (h, w) in enumerate(TRAIN_SHAPES):
        save(cat / "train" / "good" / f"{i:03d}.png", _texture(rng, h, w))
    for i, (h, w) in enumerate(TEST_SHAPES):
        save(cat / "test" / "good" / f"{i:03d}.png", _texture(rng, h, w))
        img = _texture(rng, h, w)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 4 + max(2, h // 8), w // 3 : w // 3 + max(8, w // 6)] = 255
        img[mask > 0] = 250
        save(cat / "test" / "scratch" / f"{i:03d}.png", img)
        save(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    raw = copy.deepcopy(raw_params_module)
    raw["data"].update(root=str(work / "data"), categories=["strip"], image_size=16,
                       prepared_dir=str(work / "prepared"))
    raw["memory_bank"].update(feature_size=8)
    raw["pretrained"].update(image_size=32, max_bank_size=512, discriminator_steps=20)
    raw["evaluate"].update(bootstrap_resamples=0, heatmaps_per_type=0)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    prepare_split(params.data, log=lambda m: None)
    built = build_pretrained_banks_and_save(params, work / "models" / "pretrained", log=lambda m: None)
    ev = evaluate(params, "pretrained", work / "models", log=lambda m: None)
    io.write_json(work / "models" / "calibration-pretrained.json",
                  calibration_record(params, "pretrained", ev.calibration, ev.fusion))
    return work, built, ev


def test_a_category_of_strips_keeps_its_aspect_ratio(strips):
    _, built, ev = strips
    height, width = built["categories"]["strip"]["shape"]
    assert height == 32 and width == 512  # 16:1 at short side 32, not squashed to a square
    result = ev.results["pretrained"]["strip"]
    assert result.maps.shape == (2 * len(TEST_SHAPES), 32, 512)
    for scores in result.scores.values():
        assert np.isfinite(scores).all()


def test_predict_scores_every_size_with_maps_at_their_own_size(strips, tmp_path):
    work, _, _ = strips
    rng = np.random.default_rng(9)
    sizes = [(16, 256), (24, 4096 // 8), (256, 16), (33, 97), (300, 300)]  # 16:1, 21:1, 1:16, odd sides, square
    inputs = [save(tmp_path / "in" / f"{h}x{w}.png", _texture(rng, h, w)) for h, w in sizes]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(tmp_path / "in"), "--category", "strip",
                           "--model", "pretrained", "--method", "pretrained", "--params", str(work / "params.yaml"),
                           "--models-root", str(work / "models"), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert sorted(rows) == sorted(p.name for p in inputs)
    for (h, w), path in zip(sizes, inputs):
        row = rows[path.name]
        assert row["error"] == "" and np.isfinite(float(row["raw_score"]))
        assert Image.open(row["heatmap"]).size == (w, h)
        assert Image.open(row["mask"]).size == (w, h)


def test_at_one_pixel_scale_every_image_is_scored_on_its_own_map(strips, tmp_path):
    """The training strips come in several working shapes at one scale (not stretched to one), and `aead predict` gives
    each test image the raw score the evaluation stage gave it: both score each image on its own map."""
    work, built, ev = strips
    record = built["categories"]["strip"]
    assert record["images"] == len(TRAIN_SHAPES) - 1  # one held out for validation
    assert record["working_shapes"] >= 3  # (16, 256) x 5 and three others, one of which may be the validation image
    result = ev.results["pretrained"]["strip"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(work / "data" / "strip" / "test"),
                           "--category", "strip", "--model", "pretrained", "--method", "pretrained",
                           "--params", str(work / "params.yaml"), "--models-root", str(work / "models"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    raw = {Path(r["path"]).resolve(): float(r["raw_score"]) for r in csv.DictReader(open(out / "predictions.csv"))}
    params = parse_params(yaml.safe_load((work / "params.yaml").read_text()))
    for sample, score in zip(result.samples, result.scores[params.evaluate.image_score]):
        assert raw[Path(sample.path).resolve()] == pytest.approx(score, rel=1e-5)


def test_the_onnx_detector_scores_mixed_sizes_as_the_evaluation_did(strips, tmp_path):
    """The exported ONNX model at one pixel scale: `aead predict --runtime onnxruntime` gives every test image of the
    category (strips, crops, a portrait) the evaluation stage's raw score, and a 4096 x 256 scan its own-size map."""
    import dataclasses

    from aead.deploy.export import export_all
    from aead.deploy.runtime import OnnxDetector, predict_onnx

    work, _, ev = strips
    params = parse_params(yaml.safe_load((work / "params.yaml").read_text()))
    params = dataclasses.replace(params, export=dataclasses.replace(params.export, formats=("onnx",)))
    index = export_all(params, work / "models", tmp_path / "export", "pretrained")
    assert index["operating_points"]["pretrained/strip"]["geometry"]["mode"] == "scale"
    result = ev.results["pretrained"]["strip"]
    rows = predict_onnx([s.path for s in result.samples], "strip", tmp_path / "export", tmp_path / "out",
                        log=lambda m: None)
    for row, score in zip(rows, result.scores[params.evaluate.image_score]):
        assert not row.error and row.raw_score == pytest.approx(score, rel=1e-4, abs=1e-5), row.path
    scan = _texture(np.random.default_rng(4), 256, 4096)
    raw, maps = OnnxDetector(tmp_path / "export", "strip").score_images([np.repeat(scan[..., None], 3, axis=2)])
    geometry = index["operating_points"]["pretrained/strip"]["geometry"]
    expected = Geometry.from_dict(geometry).of(256, 4096)
    assert np.isfinite(raw).all() and maps[0].shape == expected and expected[1] > 8 * expected[0]
