"""`aead predict` on a model trained and evaluated by the real pipeline code."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from aead import io
from aead.evaluation import calibration_record, evaluate
from aead.params import parse_params
from aead.prepare import prepare_split
from aead.training import train_and_save


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, raw_params_module, odd_dataset_module):
    work = tmp_path_factory.mktemp("predict")
    raw = copy.deepcopy(raw_params_module)
    raw["data"].update(root=str(odd_dataset_module), categories=["widget"], image_size=16,
                       prepared_dir=str(work / "prepared"))
    raw["model"].update(epochs=1, batch_size=4)
    raw["baseline"]["base_channels"] = 4
    raw["multiscale"]["base_channels"] = 4
    raw["segmentation"].update(steps=4, batch_size=4, base_channels=4)
    raw["memory_bank"].update(feature_size=8)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    prepare_split(params.data, log=lambda m: None)
    for model in ("baseline", "multiscale"):
        train_and_save(params, model, work / "models" / model, log=lambda m: None)
    for method in ("seg", "knn", "fused", "ssim"):  # ssim last: the tests below compare with its evaluation
        ev = evaluate(params, method, work / "models", log=lambda m: None)
        io.write_json(work / "models" / f"calibration-{method}.json", calibration_record(params, method, ev.calibration))
    return work, ev, odd_dataset_module


def run_predict(work: Path, *inputs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aead", "predict", *inputs, "--category", "widget",
                           "--model", "baseline", "--method", "ssim", "--params", str(work / "params.yaml"),
                           "--models-root", str(work / "models"), "--out", str(work / "out")],
                          capture_output=True, text=True)


def test_predict_matches_evaluation_and_writes_maps(pipeline):
    work, ev, root = pipeline
    proc = run_predict(work, str(root / "widget" / "test" / "scratch"), str(root / "widget" / "test" / "good"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(work / "out" / "predictions.csv")))
    result = ev.results["baseline"]["widget"]
    expected = {s.path: result.scores["max"][i] for i, s in enumerate(result.samples)}
    assert len(rows) == len(expected) == 5
    for row in rows:
        assert float(row["raw_score"]) == pytest.approx(expected[row["path"]], rel=1e-4, abs=1e-6)
        assert 0.0 <= float(row["score"]) <= 1.0
        assert row["verdict"] == ("anomalous" if float(row["score"]) >= 0.5 else "good")
        size = Image.open(row["path"]).size
        assert Image.open(row["heatmap"]).size == size and Image.open(row["mask"]).size == size
        assert set(np.unique(np.asarray(Image.open(row["mask"])))) <= {0, 255}


def test_unreadable_files_are_listed_and_do_not_stop_the_others(pipeline, tmp_path):
    work, _, root = pipeline
    shutil.copy(root / "widget" / "test" / "good" / "000.png", tmp_path / "fine.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    proc = run_predict(work, str(tmp_path))
    assert proc.returncode == 2
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(work / "out" / "predictions.csv"))}
    assert rows["fine.png"]["verdict"] in ("good", "anomalous") and not rows["fine.png"]["error"]
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["verdict"] == ""
    assert "broken.png" in proc.stderr


def test_an_unreliable_threshold_is_warned_about(pipeline, tmp_path):
    work, _, root = pipeline
    shutil.copytree(work / "models", tmp_path / "models")
    path = tmp_path / "models" / "calibration-ssim.json"
    record = json.loads(path.read_text())
    record["models"]["baseline"]["widget"].update(good_flagged=1.0, validation_auroc=0.4)
    path.write_text(json.dumps(record))
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(root / "widget" / "test" / "good"),
                           "--category", "widget", "--model", "baseline", "--method", "ssim",
                           "--params", str(work / "params.yaml"), "--models-root", str(tmp_path / "models"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    n_good = record["models"]["baseline"]["widget"]["n_good"]
    assert f"the threshold flags {n_good} of {n_good} validation good images" in proc.stdout + proc.stderr
    assert "0.40" in proc.stdout + proc.stderr


def test_unknown_category_is_a_clear_error(pipeline):
    work, _, root = pipeline
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(root), "--category", "gizmo",
                           "--params", str(work / "params.yaml"), "--models-root", str(work / "models"),
                           "--out", str(work / "out2")], capture_output=True, text=True)
    assert proc.returncode == 1 and "no checkpoint for category 'gizmo'" in proc.stderr
