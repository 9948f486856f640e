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

from conftest import tiny_training, train_everything

from aead import io
from aead.evaluation.evaluate import calibration_record, evaluate
from aead.params import parse_params
from aead.data.prepare import prepare_split


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, raw_params_module, odd_dataset_module):
    work = tmp_path_factory.mktemp("predict")
    raw = copy.deepcopy(raw_params_module)
    raw["data"].update(root=str(odd_dataset_module), categories=["widget"], image_size=16,
                       prepared_dir=str(work / "prepared"))
    raw = tiny_training(raw)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    prepare_split(params.data, log=lambda m: None)
    train_everything(params, work / "models")
    for method in ("seg", "knn", "pretrained", "fused", "ssim"):  # ssim last: the tests below compare with it
        ev = evaluate(params, method, work / "models", log=lambda m: None)
        io.write_json(work / "models" / f"calibration-{method}.json",
                      calibration_record(params, method, ev.calibration, ev.fusion))
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
    score = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]["image_score"]
    expected = {s.path: result.scores[score][i] for i, s in enumerate(result.samples)}
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
    assert proc.returncode == 3  # not 2: argparse's code for a bad command line, when nothing ran
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(work / "out" / "predictions.csv"))}
    assert rows["fine.png"]["verdict"] in ("good", "anomalous") and not rows["fine.png"]["error"]
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["verdict"] == ""
    assert "broken.png" in proc.stderr


def test_the_guaranteed_false_alarm_rate_is_stated(pipeline, tmp_path):
    """predict says which false-alarm rate its threshold guarantees, and warns when there were too few validation
    good images for the rate asked for; a calibration of the earlier max-F1 rule still loads, with its warning."""
    work, _, root = pipeline
    record = json.loads((work / "models" / "calibration-ssim.json").read_text())
    widget = record["models"]["baseline"]["widget"]
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(root / "widget" / "test" / "good"),
                           "--category", "widget", "--model", "baseline", "--method", "ssim",
                           "--params", str(work / "params.yaml"), "--models-root", str(work / "models"),
                           "--out", str(tmp_path / "out0")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert f"threshold from {widget['n_good']} validation good images: false-alarm rate at most" in said
    assert (f"needs at least 9 validation good images, there are {widget['n_good']}" in said) == (widget["n_good"] < 9)
    shutil.copytree(work / "models", tmp_path / "models")
    path = tmp_path / "models" / "calibration-ssim.json"
    old = {k: widget[k] for k in ("threshold", "low", "high", "n_good", "n_synthetic")}
    record["models"]["baseline"]["widget"] = {**old, "good_flagged": 1.0, "validation_auroc": 0.4}
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
    assert proc.returncode == 1 and "gizmo" in proc.stderr and "not found" in proc.stderr, proc.stderr
    categories = yaml.safe_load((work / "params.yaml").read_text())["data"]["categories"]
    assert f"trained for {', '.join(categories)}" in proc.stderr, "the error lists the categories there are"


def test_folders_are_searched_recursively_and_outputs_keep_relative_paths(pipeline, tmp_path):
    """An MVTec-style tree (test/good, test/scratch, ...) given as one folder: every image in its subfolders is
    scored, the CSV keeps each path relative to the folder, and the outputs mirror it."""
    work, _, root = pipeline
    tree = root / "widget" / "test"
    expected = sorted(p.relative_to(tree.parent) for p in tree.rglob("*.png"))  # test/good/000.png, ...
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(tree), "--category", "widget", "--model",
                           "baseline", "--method", "ssim", "--params", str(work / "params.yaml"), "--models-root",
                           str(work / "models"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert sorted(Path(r["relative_path"]) for r in rows) == expected and len(expected) > 4
    for row in rows:
        stem = Path(row["relative_path"]).with_suffix("")
        assert Path(row["heatmap"]) == tmp_path / "out" / f"{stem}_heatmap.png" and Path(row["heatmap"]).is_file()
    assert f"{len(expected)} images from" in proc.stdout


def test_two_inputs_with_the_same_name_get_outputs_of_their_own(pipeline, tmp_path):
    work, _, root = pipeline
    for name, source in (("a", "good/000.png"), ("b", "scratch/000.png")):
        (tmp_path / name).mkdir()
        shutil.copy(root / "widget" / "test" / source, tmp_path / name / "x.png")
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(tmp_path / "a" / "x.png"),
                           str(tmp_path / "b" / "x.png"), "--category", "widget", "--model", "baseline", "--method",
                           "ssim", "--params", str(work / "params.yaml"), "--models-root", str(work / "models"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    a, b = rows[str(tmp_path / "a" / "x.png")], rows[str(tmp_path / "b" / "x.png")]
    assert (a["relative_path"], b["relative_path"]) == ("x.png", "x~2.png")
    assert Path(a["heatmap"]).is_file() and Path(b["heatmap"]).is_file() and a["heatmap"] != b["heatmap"]


def test_exit_codes_tell_a_bad_command_line_from_unreadable_images(tmp_path):
    """A bad command line is argparse's 2 with nothing written; 3 (partly scored) and 1 (nothing scored) are the
    others (the tests above)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--category" in proc.stderr and not out.exists()


def test_without_params_it_scores_with_the_params_recorded_with_the_models(pipeline, tmp_path):
    """No --params: the params of the models' evaluation, from their calibration file, so that an invalid
    params.yaml in the working folder (a failed `dvc exp run -S ...` leaves one) changes nothing."""
    work, _, root = pipeline
    images = str(root / "widget" / "test" / "scratch")
    assert run_predict(work, images).returncode == 0
    expected = (work / "out" / "predictions.csv").read_text()
    (tmp_path / "params.yaml").write_text("pretrained:\n  backbone: nonexistent\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", images, "--category", "widget", "--model",
                           "baseline", "--method", "ssim", "--models-root", str(work / "models"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "predictions.csv").read_text() == expected.replace(str(work / "out"), str(out))
    proc = subprocess.run([sys.executable, "-m", "aead", "predict", images, "--category", "widget",
                           "--models-root", str(work / "models"), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "index.json: not found, so no default map; pass --method" in proc.stderr
