"""The exported detectors (torch.export and ONNX) run without this package's code (the ONNX models without PyTorch)
and match the PyTorch detector."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from aead import io
from aead.data.mvtec import Geometry
from aead.deploy.export import build_detector, export_all
from aead.evaluation.evaluate import calibration_record, evaluate
from test_predict import pipeline  # noqa: F401  (module fixture: a trained, calibrated tiny pipeline)

TRANSISTOR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_transistor_256" / "transistor"


def real_images(root: Path) -> list[Path]:
    """Real images: MVTec AD transistor where ../shared has it, and the test images of the tiny set."""
    found = sorted((TRANSISTOR / "test" / "bent_lead").glob("*.png"))[:2] if TRANSISTOR.is_dir() else []
    return found + sorted((root / "widget" / "test").rglob("*.png"))


def as_batch(path: Path) -> torch.Tensor:
    """A one-image uint8 (1, H, W, 3) batch, the exported detectors' input."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())[None]


def only(params, *formats: str):
    """``params`` exporting only ``formats`` (a test that needs one format saves the other's export time)."""
    return dataclasses.replace(params, export=dataclasses.replace(params.export, formats=formats))


@pytest.mark.parametrize("method", ["ssim", "seg", "knn", "pretrained", "fused"])
def test_exported_detector_matches_pytorch(pipeline, tmp_path, method):  # noqa: F811
    """Both formats give the PyTorch detector's scores and maps on real images of other sizes, one at a time and in
    a batch; the ONNX model in ONNX Runtime to float rounding (its resize is exact, :func:`resize_batch`).
    ``fused``: of all three kinds of part, the segmentation head's, the encoder bank's and the pretrained map (each
    image at its own working shape, the autoencoder's maps resized to it)."""
    from aead.params import load_params

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    models_root = work / "models"
    if method == "fused":  # evaluated (and so calibrated) with these parts, in a copy of the models
        parts = ("seg", "knn", "pretrained")
        params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, fused=parts))
        models_root = tmp_path / "models"
        shutil.copytree(work / "models", models_root)
        ev = evaluate(params, method, models_root, log=lambda m: None)
        io.write_json(models_root / "calibration-fused.json",
                      calibration_record(params, method, ev.calibration, ev.fusion))
    assert params.export.formats == ("pt2", "onnx")
    index = export_all(params, models_root, tmp_path / "export", method)
    models = ["pretrained"] if method == "pretrained" else ["baseline", "multiscale"]
    assert set(index["files"]) == {f"{m}/widget" for m in models}
    assert json.loads((tmp_path / "export" / "index.json").read_text()) == index
    for key, files in index["files"].items():
        model, category = key.split("/")
        assert files == {"pt2": f"{model}-{category}.pt2", "onnx": f"{model}-{category}.onnx"}
        eager = build_detector(params, models_root, model, category, method)
        point = index["operating_points"][key]  # the threshold it applies and the rate it guarantees
        assert point["raw_threshold"] == eager.calibration.threshold and point["normalized_threshold"] == 0.5
        assert point["raw_pixel_threshold"] == point["raw_threshold"]
        geometry = eager.mapper.geometry  # how an input becomes the map's grid, before resizing to the input
        if geometry is None:
            assert tuple(point["map_shape"]) == eager.mapper.out_shape and "geometry" not in point
        else:
            assert Geometry.from_dict(point["geometry"]) == geometry and "map_shape" not in point
        assert point["false_alarm_rate_target"] == params.evaluate.false_alarm_rate
        assert point["guaranteed_false_alarm_rate"] == pytest.approx(1 / (point["n_calibration_good"] + 1))
        assert index["calibrations"][key] == eager.calibration.to_dict()
        scripted = torch.export.load(str(tmp_path / "export" / files["pt2"])).module()
        parts = params.evaluate.fused if method == "fused" else (method,)
        has_head = any(n.startswith("mapper.head.") for n, _ in scripted.named_parameters())
        assert has_head == ("seg" in parts), "the segmentation head is saved only where its map is used"
        has_bank = any(n == "mapper.memory.bank" for n, _ in scripted.named_buffers())
        assert has_bank == ("knn" in parts), "so is the memory bank"
        has_backbone = any(n.startswith("mapper.pretrained.backbone.") for n, _ in scripted.named_parameters())
        assert has_backbone == ("pretrained" in parts), "and the pretrained backbone"
        session = ort.InferenceSession(str(tmp_path / "export" / files["onnx"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        assert [o.name for o in session.get_outputs()] == ["score", "raw_score", "anomaly_map"]
        images = real_images(root)
        batches = [as_batch(p) for p in images]
        batches.append(torch.cat([batches[-1], batches[-1].flip(1), batches[-1].flip(2)]))  # several images at once
        small = min(batches, key=lambda b: b.shape[1] * b.shape[2])  # strips 16 times as wide / tall, of the
        batches += [small.repeat(1, 1, 16, 1), small.repeat(1, 16, 1, 1)]  # smallest image (not 4096 px ones)
        for batch in batches:
            with torch.no_grad():
                a, b = eager(batch), scripted(batch)
            c = session.run(None, {"images": batch.numpy()})
            h, w = batch.shape[1:3]
            expected = eager.mapper.out_shape if geometry is None else geometry.of(h, w)
            assert a[0].dtype == a[1].dtype == torch.float64 and a[2].shape == (len(batch), *expected)
            if geometry is not None and geometry.mode == "scale":  # each side scaled by one factor: the aspect kept
                for side, n in zip(expected, (h, w)):
                    assert abs(side - n * geometry.num / geometry.den) <= geometry.multiple / 2
            # a map of parts put on their validation scales (fused; pretrained: the features' parts and the brightness,
            # in units of their scores' spread) rounds relative to its range; a single map keeps 1e-4
            composite = method in ("fused", "pretrained")
            span = max(1.0, float(a[2].abs().max())) if composite else 1.0
            torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-4)
            torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-4 * span)
            torch.testing.assert_close(b[2], a[2], rtol=1e-3 if composite else 0.0, atol=1e-4 * span)
            np.testing.assert_allclose(c[0], a[0].numpy(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(c[1], a[1].numpy(), rtol=1e-4, atol=1e-4 * span)
            np.testing.assert_allclose(c[2], a[2].numpy(), rtol=1e-3, atol=1e-4 * span)
            assert ((c[1] >= eager.calibration.threshold) == (a[1] >= eager.calibration.threshold).numpy()).all()
            assert ((0.0 <= c[0]) & (c[0] <= 1.0)).all()


def test_exported_detector_carries_the_memory_banks_border_padding(pipeline, tmp_path):  # noqa: F811
    """A bank built with memory_bank.border_padding keeps it in the checkpoint, and the exported file mirrors the
    border as the PyTorch detector does (the maps differ from those without it)."""
    import shutil

    from aead.params import load_params

    work, _, root = pipeline
    params = only(load_params(work / "params.yaml"), "pt2")
    models = tmp_path / "models"
    shutil.copytree(work / "models", models)
    for path in (models / "banks").rglob("*.pt"):
        raw = torch.load(path, weights_only=True)
        raw["meta"]["border_padding"] = 4
        torch.save(raw, path)
    index = export_all(params, models, tmp_path / "export", "knn")
    image = as_batch(real_images(root)[-1])
    for key, files in index["files"].items():
        model, category = key.split("/")
        mirrored = build_detector(params, models, model, category, "knn")
        plain = build_detector(params, work / "models", model, category, "knn")
        assert mirrored.mapper.memory.padding == 4 and plain.mapper.memory.padding == 0
        scripted = torch.export.load(str(tmp_path / "export" / files["pt2"])).module()
        with torch.no_grad():
            a, b, c = mirrored(image), scripted(image), plain(image)
        assert torch.allclose(a[2], b[2], atol=1e-4)
        assert not torch.allclose(a[2], c[2], atol=1e-3)


def test_exported_two_stage_bank_search_matches_pytorch(pipeline, tmp_path):  # noqa: F811
    """A pretrained bank indexed for the two-stage search (pretrained.search_candidates) keeps it in its checkpoint;
    the ONNX model ranks the same candidates as PyTorch, and the maps differ from the exact search's."""
    import shutil

    from aead.params import load_params
    from aead.training.checkpoint import load_pretrained_bank, save_pretrained_bank

    work, _, root = pipeline
    params = only(load_params(work / "params.yaml"), "onnx")
    models = tmp_path / "models"
    shutil.copytree(work / "models", models)
    path = models / "pretrained" / "widget.pt"
    memory, meta = load_pretrained_bank(path)
    assert memory.search_candidates == 0 and memory.bank.shape[0] > 4
    memory.index_bank(1, 1)  # the coarsest search, so that it differs from the exact one
    save_pretrained_bank(path, memory, meta)
    index = export_all(params, models, tmp_path / "export", "pretrained")
    two_stage = build_detector(params, models, "pretrained", "widget", "pretrained")
    exact = build_detector(params, work / "models", "pretrained", "widget", "pretrained")
    assert two_stage.mapper.pretrained.search_candidates == 1
    session = ort.InferenceSession(str(tmp_path / "export" / index["files"]["pretrained/widget"]["onnx"]),
                                   providers=["CPUExecutionProvider"])
    images = real_images(root)
    batch = torch.cat([as_batch(images[-1]), as_batch(images[-1]).flip(1)])
    for x in [as_batch(p) for p in images] + [batch]:
        with torch.no_grad():
            a, b = two_stage(x), exact(x)
        c = session.run(None, {"images": x.numpy()})
        span = max(1.0, float(a[2].abs().max()))  # parts on their validation scales: rounding relative to the range
        np.testing.assert_allclose(c[1], a[1].numpy(), rtol=1e-4, atol=1e-4 * span)
        np.testing.assert_allclose(c[2], a[2].numpy(), rtol=1e-3, atol=1e-4 * span)
    assert not torch.allclose(a[2], b[2], atol=1e-3)


def test_exported_detectors_run_without_the_package_and_onnx_without_torch(pipeline, tmp_path):  # noqa: F811
    """The README's two snippets: the .pt2 file with torch alone, the .onnx file with onnxruntime, numpy and Pillow
    alone (importing torch or this package fails), with the index's threshold; both give the same verdict."""
    from aead.params import load_params

    work, _, root = pipeline
    export_all(load_params(work / "params.yaml"), work / "models", tmp_path / "export", "ssim")
    image = next(iter((root / "widget" / "test" / "scratch").glob("*.png")))
    pt2 = textwrap.dedent(f"""
        import sys
        sys.modules['aead'] = None  # importing this package now fails
        import numpy as np, torch
        from PIL import Image
        detector = torch.export.load({str(tmp_path / 'export' / 'baseline-widget.pt2')!r}).module()
        images = torch.from_numpy(np.asarray(Image.open({str(image)!r}).convert('RGB')).copy())[None]
        score, raw, amap = detector(images)
        print(float(score[0]), float(raw[0]), tuple(amap.shape))
    """)
    onnx = textwrap.dedent(f"""
        import sys
        sys.modules['aead'] = sys.modules['torch'] = None  # importing this package or torch now fails
        import json
        import numpy as np, onnxruntime as ort
        from PIL import Image
        session = ort.InferenceSession({str(tmp_path / 'export' / 'baseline-widget.onnx')!r})
        index = json.load(open({str(tmp_path / 'export' / 'index.json')!r}))
        images = np.asarray(Image.open({str(image)!r}).convert('RGB'))[None]   # uint8 (1, H, W, 3), any size
        score, raw, amap = session.run(None, {{'images': images}})
        print(float(score[0]), float(raw[0]), tuple(amap.shape), raw[0] >= index['operating_points']['baseline/widget']['raw_threshold'])
    """)
    out = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
           for script in (pt2, onnx)]
    assert out[0].returncode == 0, out[0].stderr
    assert out[1].returncode == 0, out[1].stderr
    score, raw, shape = out[0].stdout.split(" ", 2)
    assert 0.0 <= float(score) <= 1.0 and shape.strip() == "(1, 16, 16)"
    onnx_score, onnx_raw, rest = out[1].stdout.split(" ", 2)
    assert float(onnx_raw) == pytest.approx(float(raw), rel=1e-4) and rest.strip().startswith("(1, 16, 16)")
    assert rest.strip().endswith(str(float(onnx_score) >= 0.5))


@pytest.mark.parametrize("method", ["ssim", "seg", "pretrained", "fused"])
def test_exported_detector_scores_equal_aead_predict_in_fp32(pipeline, tmp_path, method):  # noqa: F811
    """Same resize, model, map, score and normalisation: the exported files give `aead predict`'s scores on
    real images of other sizes (exactly up to float rounding when both compute in fp32; in bf16 autocast,
    `model.precision: auto` on CPUs with native bf16, predict differs by the bf16 rounding), and so does
    `aead predict --runtime onnxruntime`, which scores with the ONNX model."""
    from aead.deploy.predict import predict
    from aead.deploy.runtime import predict_onnx
    from aead.params import load_params

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, precision="fp32"))
    export_all(params, work / "models", tmp_path / "export", method)
    model = "pretrained" if method == "pretrained" else "baseline"
    scripted = torch.export.load(str(tmp_path / "export" / f"{model}-widget.pt2")).module()
    images = real_images(root)
    rows = predict(images, model, "widget", method, params, work / "models", tmp_path / "out", log=lambda m: None)
    onnx_rows = predict_onnx(images, "widget", tmp_path / "export", tmp_path / "out-onnx", model, method,
                             log=lambda m: None)
    assert len(rows) == len(onnx_rows) == len(images) and all(not r.error for r in rows + onnx_rows)
    # a map of parts on their validation scales (pretrained: in units of its scores' spread over good images, where
    # scores lie near 0) rounds relative to that unit
    unit = 1e-4 if method in ("pretrained", "fused") else 1e-7
    for path, row, onnx_row in zip(images, rows, onnx_rows):
        with torch.no_grad():
            score, raw, _ = scripted(as_batch(path))
        assert float(raw[0]) == pytest.approx(row.raw_score, rel=1e-5, abs=unit), path
        assert float(score[0]) == pytest.approx(row.score, rel=1e-5, abs=unit), path
        assert onnx_row.raw_score == pytest.approx(row.raw_score, rel=1e-4, abs=max(unit, 1e-6)), path
        assert onnx_row.anomalous == row.anomalous and onnx_row.relative_path == row.relative_path
        for name in ("heatmap", "mask"):
            assert Image.open(getattr(onnx_row, name)).size == Image.open(path).size


def test_aead_predict_with_onnxruntime_imports_no_torch(pipeline, tmp_path):  # noqa: F811
    """`aead predict --runtime onnxruntime` with torch made unimportable: the same verdicts as the PyTorch runtime,
    the models' map by default; asking for another map, or for a format not exported, is a clear error."""
    from aead.params import load_params

    work, _, root = pipeline
    params = load_params(work / "params.yaml")
    models = tmp_path / "models"  # the exported detectors only: no checkpoints, calibrations or params
    export_all(params, work / "models", models / "export", "ssim")
    folder = str(root / "widget" / "test")
    cli = ("import sys; sys.modules['torch'] = None; from aead.__main__ import main; main()",)

    def run(*args: str, out: str = "out") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", *cli, "predict", folder, "--category", "widget", *args,
                               "--models-root", str(models), "--out", str(tmp_path / out)],
                              capture_output=True, text=True)

    proc = run("--runtime", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    assert "ONNX Runtime" in proc.stderr + proc.stdout
    torch_proc = subprocess.run([sys.executable, "-m", "aead", "predict", folder, "--category", "widget",
                                 "--models-root", str(work / "models"), "--method", "ssim",
                                 "--out", str(tmp_path / "out-torch")], capture_output=True, text=True)
    assert torch_proc.returncode == 0, torch_proc.stderr
    onnx_rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    torch_rows = list(csv.DictReader(open(tmp_path / "out-torch" / "predictions.csv")))
    assert [r["relative_path"] for r in onnx_rows] == [r["relative_path"] for r in torch_rows] and onnx_rows
    for a, b in zip(onnx_rows, torch_rows):
        assert a["verdict"] == b["verdict"] and float(a["raw_score"]) == pytest.approx(float(b["raw_score"]), rel=1e-4)
    wrong = run("--runtime", "onnxruntime", "--method", "knn", out="wrong")
    assert wrong.returncode == 1 and "map 'ssim'" in wrong.stderr and not (tmp_path / "wrong").exists()
    export_all(only(params, "pt2"), work / "models", models / "export", "ssim")
    missing = run("--runtime", "onnxruntime", out="missing")
    assert missing.returncode == 1 and "export.formats" in missing.stderr
