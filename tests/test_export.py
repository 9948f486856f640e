"""The exported detector (torch.export) runs without this package's code and matches the PyTorch detector."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aead.deploy.export import build_detector, export_all
from test_predict import pipeline  # noqa: F401  (module fixture: a trained, calibrated tiny pipeline)

TRANSISTOR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_transistor_256" / "transistor"


def real_images(root: Path) -> list[Path]:
    """Real images: MVTec AD transistor where ../shared has it, and the test images of the tiny set."""
    found = sorted((TRANSISTOR / "test" / "bent_lead").glob("*.png"))[:2] if TRANSISTOR.is_dir() else []
    return found + sorted((root / "widget" / "test").rglob("*.png"))


@pytest.mark.parametrize("method", ["ssim", "seg", "knn", "pretrained", "fused"])
def test_exported_detector_matches_pytorch(pipeline, tmp_path, method):  # noqa: F811
    from aead.params import load_params

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    index = export_all(params, work / "models", tmp_path / "export", method)
    models = ["pretrained"] if method == "pretrained" else ["baseline", "multiscale"]
    assert set(index["files"]) == {f"{m}/widget" for m in models}
    assert json.loads((tmp_path / "export" / "index.json").read_text()) == index
    for key, name in index["files"].items():
        model, category = key.split("/")
        eager = build_detector(params, work / "models", model, category, method)
        point = index["operating_points"][key]  # the threshold it applies and the rate it guarantees
        assert point["raw_threshold"] == eager.calibration.threshold and point["normalized_threshold"] == 0.5
        assert point["raw_pixel_threshold"] == point["raw_threshold"]
        assert tuple(point["map_shape"]) == eager.mapper.out_shape  # the map's shape, before resizing to the input
        assert point["false_alarm_rate_target"] == params.evaluate.false_alarm_rate
        assert point["guaranteed_false_alarm_rate"] == pytest.approx(1 / (point["n_calibration_good"] + 1))
        scripted = torch.export.load(str(tmp_path / "export" / name)).module()
        parts = params.evaluate.fused if method == "fused" else (method,)
        has_head = any(n.startswith("mapper.head.") for n, _ in scripted.named_parameters())
        assert has_head == ("seg" in parts), "the segmentation head is saved only where its map is used"
        has_bank = any(n == "mapper.memory.bank" for n, _ in scripted.named_buffers())
        assert has_bank == ("knn" in parts), "so is the memory bank"
        has_backbone = any(n.startswith("mapper.pretrained.backbone.") for n, _ in scripted.named_parameters())
        assert has_backbone == ("pretrained" in parts), "and the pretrained backbone"
        for path in real_images(root):
            image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
            with torch.no_grad():
                a, b = eager(image), scripted(image)
            assert abs(float(a[0]) - float(b[0])) < 1e-4 and abs(float(a[1]) - float(b[1])) < 1e-4
            assert torch.allclose(a[2], b[2], atol=1e-4)
            assert 0.0 <= float(b[0]) <= 1.0


def test_exported_detector_carries_the_memory_banks_border_padding(pipeline, tmp_path):  # noqa: F811
    """A bank built with memory_bank.border_padding keeps it in the checkpoint, and the exported file mirrors the
    border as the PyTorch detector does (the maps differ from those without it)."""
    import shutil

    from aead.params import load_params

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    models = tmp_path / "models"
    shutil.copytree(work / "models", models)
    for path in (models / "banks").rglob("*.pt"):
        raw = torch.load(path, weights_only=True)
        raw["meta"]["border_padding"] = 4
        torch.save(raw, path)
    index = export_all(params, models, tmp_path / "export", "knn")
    image = torch.from_numpy(np.asarray(Image.open(real_images(root)[-1]).convert("RGB")).copy())
    for key, name in index["files"].items():
        model, category = key.split("/")
        mirrored = build_detector(params, models, model, category, "knn")
        plain = build_detector(params, work / "models", model, category, "knn")
        assert mirrored.mapper.memory.padding == 4 and plain.mapper.memory.padding == 0
        scripted = torch.export.load(str(tmp_path / "export" / name)).module()
        with torch.no_grad():
            a, b, c = mirrored(image), scripted(image), plain(image)
        assert torch.allclose(a[2], b[2], atol=1e-4)
        assert not torch.allclose(a[2], c[2], atol=1e-3)


def test_exported_detector_loads_without_the_package(pipeline, tmp_path):  # noqa: F811
    from aead.params import load_params

    work, _, root = pipeline
    export_all(load_params(work / "params.yaml"), work / "models", tmp_path / "export", "ssim")
    image = next(iter((root / "widget" / "test" / "scratch").glob("*.png")))
    script = textwrap.dedent(f"""
        import sys
        sys.modules['aead'] = None  # importing this package now fails
        import numpy as np, torch
        from PIL import Image
        detector = torch.export.load({str(tmp_path / 'export' / 'baseline-widget.pt2')!r}).module()
        image = torch.from_numpy(np.asarray(Image.open({str(image)!r}).convert('RGB')).copy())
        score, raw, amap = detector(image)
        print(float(score), float(raw), tuple(amap.shape))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    score, raw, shape = out.stdout.split(" ", 2)
    assert 0.0 <= float(score) <= 1.0 and shape.strip() == "(16, 16)"


@pytest.mark.parametrize("method", ["ssim", "seg", "pretrained", "fused"])
def test_exported_detector_scores_equal_aead_predict_in_fp32(pipeline, tmp_path, method):  # noqa: F811
    """Same resize, model, map, score and normalisation: the exported file gives `aead predict`'s scores on
    real images of other sizes (exactly up to float rounding when both compute in fp32; in bf16 autocast,
    `model.precision: auto` on CPUs with native bf16, predict differs by the bf16 rounding)."""
    import dataclasses

    from aead.params import load_params
    from aead.deploy.predict import predict

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, precision="fp32"))
    export_all(params, work / "models", tmp_path / "export", method)
    model = "pretrained" if method == "pretrained" else "baseline"
    scripted = torch.export.load(str(tmp_path / "export" / f"{model}-widget.pt2")).module()
    images = real_images(root)
    rows = predict(images, model, "widget", method, params, work / "models", tmp_path / "out", log=lambda m: None)
    assert len(rows) == len(images) and all(not r.error for r in rows)
    for path, row in zip(images, rows):
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
        with torch.no_grad():
            score, raw, _ = scripted(image)
        assert float(raw) == pytest.approx(row.raw_score, rel=1e-5, abs=1e-7), path
        assert float(score) == pytest.approx(row.score, rel=1e-5, abs=1e-7), path
