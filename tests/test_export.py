"""The exported TorchScript detector runs without this package's code and matches the PyTorch detector."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aead.export import build_detector, export_all
from test_predict import pipeline  # noqa: F401  (module fixture: a trained, calibrated tiny pipeline)

TRANSISTOR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_transistor_256" / "transistor"


def real_images(root: Path) -> list[Path]:
    """Real images: MVTec AD transistor where ../shared has it, and the test images of the tiny set."""
    found = sorted((TRANSISTOR / "test" / "bent_lead").glob("*.png"))[:2] if TRANSISTOR.is_dir() else []
    return found + sorted((root / "widget" / "test").rglob("*.png"))


@pytest.mark.parametrize("method", ["ssim", "seg", "knn", "fused"])
def test_exported_detector_matches_pytorch(pipeline, tmp_path, method):  # noqa: F811
    from aead.params import load_params

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    index = export_all(params, work / "models", tmp_path / "export", method)
    assert set(index["files"]) == {"baseline/widget", "multiscale/widget"}
    for key, name in index["files"].items():
        model, category = key.split("/")
        eager = build_detector(params, work / "models", model, category, method)
        scripted = torch.jit.load(str(tmp_path / "export" / name))
        has_head = any(n.startswith("head.") for n, _ in scripted.named_parameters())
        assert has_head == (method in ("seg", "fused")), "the segmentation head is saved only where its map is used"
        has_bank = any(n == "memory.bank" for n, _ in scripted.named_buffers())
        assert has_bank == (method in ("knn", "fused")), "so is the memory bank"
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
    for path in models.rglob("*.pt"):
        raw = torch.load(path, weights_only=True)
        raw["meta"]["memory_bank"]["border_padding"] = 4
        torch.save(raw, path)
    index = export_all(params, models, tmp_path / "export", "knn")
    image = torch.from_numpy(np.asarray(Image.open(real_images(root)[-1]).convert("RGB")).copy())
    for key, name in index["files"].items():
        model, category = key.split("/")
        mirrored = build_detector(params, models, model, category, "knn")
        plain = build_detector(params, work / "models", model, category, "knn")
        assert mirrored.memory.padding == 4 and plain.memory.padding == 0
        scripted = torch.jit.load(str(tmp_path / "export" / name))
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
        detector = torch.jit.load({str(tmp_path / 'export' / 'baseline-widget.pt')!r})
        image = torch.from_numpy(np.asarray(Image.open({str(image)!r}).convert('RGB')).copy())
        score, raw, amap = detector(image)
        print(float(score), float(raw), tuple(amap.shape))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    score, raw, shape = out.stdout.split(" ", 2)
    assert 0.0 <= float(score) <= 1.0 and shape.strip() == "(16, 16)"


@pytest.mark.parametrize("method", ["ssim", "seg", "fused"])
def test_exported_detector_scores_equal_aead_predict_in_fp32(pipeline, tmp_path, method):  # noqa: F811
    """Same resize, model, map, score and normalisation: the exported file gives `aead predict`'s scores on
    real images of other sizes (exactly up to float rounding when both compute in fp32; in bf16 autocast,
    `model.precision: auto` on CPUs with native bf16, predict differs by the bf16 rounding)."""
    import dataclasses

    from aead.params import load_params
    from aead.predict import predict

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, precision="fp32"))
    export_all(params, work / "models", tmp_path / "export", method)
    scripted = torch.jit.load(str(tmp_path / "export" / "baseline-widget.pt"))
    images = real_images(root)
    rows = predict(images, "baseline", "widget", method, params, work / "models", tmp_path / "out", log=lambda m: None)
    assert len(rows) == len(images) and all(not r.error for r in rows)
    for path, row in zip(images, rows):
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())
        with torch.no_grad():
            score, raw, _ = scripted(image)
        assert float(raw) == pytest.approx(row.raw_score, rel=1e-5, abs=1e-7), path
        assert float(score) == pytest.approx(row.score, rel=1e-5, abs=1e-7), path
