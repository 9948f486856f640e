"""End to end: the real `dvc repro`, `dvc exp run`, `dvc metrics diff` and `dvc plots show` on tiny params,
in a temporary git repository holding a copy of this project."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvc/plots", ".dvc/.gitignore"]


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def tiny_params(raw: dict) -> dict:
    raw["synthetic"].update(image_size=32, n_train=6, n_test_good=2, n_test_defect=1, categories=["bottle", "tile"])
    raw["data"].update(image_size=32, categories=["bottle", "tile"])
    raw["model"].update(epochs=2, batch_size=4)
    raw["baseline"]["base_channels"] = 4
    raw["multiscale"]["base_channels"] = 4
    raw["segmentation"].update(steps=3, batch_size=4, base_channels=4)
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Path:
    repo = Path(request.config.rootpath)
    work = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src = repo / name
        dst = work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    run(["git", "config", "user.email", "test@example.com"], work)
    run(["git", "config", "user.name", "test"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "tiny project"], work)
    return work


def test_repro_runs_every_stage_then_nothing(project):
    out = run(["dvc", "repro"], project)
    for stage in ("synthesize", "prepare-split", "train-baseline", "train-multiscale", "evaluate-l1", "evaluate-ssim",
                  "evaluate-seg", "evaluate-knn", "evaluate-fused", "export"):
        assert f"Running stage '{stage}'" in out
    for name in ("synthesize", "prepare-split", "train-baseline", "train-multiscale", "evaluate-l1", "evaluate-ssim",
                 "evaluate-seg", "evaluate-knn", "evaluate-fused"):
        assert (project / "metrics" / f"{name}.json").is_file()
    for method in ("seg", "knn", "fused"):
        m = json.loads((project / "metrics" / f"evaluate-{method}.json").read_text())
        assert m["method"] == method and 0.0 <= m["baseline"]["pixel_auroc"] <= 1.0
        assert list((project / "plots" / f"evaluate-{method}" / "heatmaps").rglob("*.png"))
    assert json.loads((project / "metrics" / "export.json").read_text())["method"] == "fused"
    trained = json.loads((project / "metrics" / "train-baseline.json").read_text())
    assert trained["categories"]["tile"]["segmentation"]["steps"] == 3
    bank = trained["categories"]["tile"]["memory_bank"]
    ratio = yaml.safe_load((project / "params.yaml").read_text())["memory_bank"]["coreset_ratio"]
    assert bank["patches"] == 5 * 32 * 32 and bank["bank_size"] == round(ratio * bank["patches"])  # 5 of 6 train
    l1 = json.loads((project / "metrics" / "evaluate-l1.json").read_text())
    for model in ("baseline", "multiscale"):
        for key in ("image_auroc", "image_auroc_pooled", "pr_auc", "pixel_auroc", "aupro"):
            assert key in l1[model]
        for key in ("image_auroc", "pr_auc", "pixel_auroc", "aupro", "f1_max", "threshold"):
            assert key in l1[model]["categories"]["tile"]
    assert list((project / "plots" / "evaluate-ssim" / "heatmaps").rglob("*.png"))
    assert (project / "models" / "baseline" / "bottle.pt").is_file()
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "default run"], project)


def test_pushed_cache_pulled_into_another_clone_leaves_nothing_to_reproduce(project, tmp_path):
    """A shared DVC remote (here a local folder, the same commands as for S3, GCS, Azure or SSH)."""
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], project)
    run(["git", "add", ".dvc/config"], project)
    run(["git", "commit", "-qm", "shared remote"], project)
    run(["dvc", "push"], project)
    assert any(remote.rglob("*")), "nothing was pushed"
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models" / "baseline" / "bottle.pt").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models" / "baseline" / "bottle.pt").is_file()
    assert "up to date" in run(["dvc", "status"], clone)
    assert "Running stage" not in run(["dvc", "repro"], clone)


def test_plots_show_writes_declared_plots(project, tmp_path):
    run(["dvc", "plots", "show", "-o", str(tmp_path / "html")], project)
    html = (tmp_path / "html" / "index.html").read_text()
    for title in ("Training and validation loss (baseline)", "ROC, L1 score", "Image AUROC per category, SSIM"):
        assert title in html
    assert list((tmp_path / "html" / "static").glob("*comparison.png"))


def test_exp_run_on_another_mvtec_folder(project, odd_dataset):
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    out = run(["dvc", "exp", "run", "-S", f"data.root={odd_dataset}", "-S", "data.categories=[widget]"], project)
    assert "Running stage 'prepare-split'" in out
    split = json.loads((project / "metrics" / "prepare-split.json").read_text())
    assert split["categories"]["widget"]["test_with_mask"] == 2
    l1 = json.loads((project / "metrics" / "evaluate-l1.json").read_text())
    assert l1["baseline"]["categories"]["widget"]["n_anomalous_with_mask"] == 2
    assert l1["baseline"]["categories"]["widget"]["n_anomalous"] == 3


def test_seed_recipe_runs_without_a_segmentation_head_or_memory_bank(project):
    """segmentation.steps: 0 and memory_bank.coreset_ratio: 0 (part of the seed recipe) train neither; the
    evaluation stages of the maps that need them say so instead of failing."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    out = run(["dvc", "exp", "run", "-S", "segmentation.steps=0", "-S", "memory_bank.coreset_ratio=0",
               "-S", "export.method=ssim"], project)
    assert "Running stage 'evaluate-seg'" in out and "Running stage 'export'" in out
    seg = json.loads((project / "metrics" / "evaluate-seg.json").read_text())
    assert "no segmentation head" in seg["note"] and "baseline" not in seg
    knn = json.loads((project / "metrics" / "evaluate-knn.json").read_text())
    assert "no memory bank" in knn["note"] and "baseline" not in knn
    assert "nothing to score" in json.loads((project / "metrics" / "evaluate-fused.json").read_text())["note"]
    tile = json.loads((project / "metrics" / "train-baseline.json").read_text())["categories"]["tile"]
    assert "segmentation" not in tile and "memory_bank" not in tile
    assert json.loads((project / "metrics" / "export.json").read_text())["method"] == "ssim"
    assert (project / "plots" / "evaluate-seg" / "roc.csv").read_text().strip() == "model,category,fpr,tpr"


def test_bad_param_fails_with_the_key(project):
    proc = subprocess.run(["dvc", "exp", "run", "-S", "data.image_size=100"], cwd=project, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "data.image_size: expected a positive multiple of 8" in proc.stdout + proc.stderr


TIMING_KEYS = {"train_seconds", "images_per_second", "build_seconds"}


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return obj


def test_repro_force_gives_identical_metrics(project):
    """A forced rerun of every stage reproduces the metrics of the run committed by the first test (or, when this
    test runs alone, of a first run made here)."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    if (project / "dvc.lock").is_file():  # the committed run: its outputs back in place of the last experiment's
        run(["dvc", "checkout", "--force"], project)
    run(["dvc", "repro"], project)  # nothing to run after that checkout; a first run when this test runs alone
    before = {p.name: json.loads(p.read_text()) for p in (project / "metrics").glob("*.json")}
    run(["dvc", "repro", "--force"], project)
    after = {p.name: json.loads(p.read_text()) for p in (project / "metrics").glob("*.json")}
    assert before.keys() == after.keys()
    for name in before:
        assert without_timing(before[name]) == without_timing(after[name]), f"{name} differs between runs"


def test_queued_experiments_run_concurrently(project):
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    if not (project / "dvc.lock").is_file():  # run alone: commit a first run, as the first test does
        run(["dvc", "repro"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "default run"], project)
    # a two-point sweep of an evaluation param: the models come from the cache, only the evaluations run
    run(["dvc", "exp", "run", "--queue", "-S", "evaluate.smooth_sigma=0.5,2.0"], project)
    # the workers `dvc queue start` leaves behind inherit its stdout and stderr: captured, the call would wait for
    # them to exit (one DVC worker was once seen to stay idle after the queue drained, and the suite hung)
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=project, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], project)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert "Failed" not in status, status
    names = [line.split()[1] for line in status.splitlines() if line.split()[-1:] == ["Success"]]
    assert len(names) == 2, status
    for name in names:
        log = run(["dvc", "queue", "logs", name], project)
        assert "Running stage 'evaluate-l1'" in log and "Running stage 'train-baseline'" not in log, log
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True, check=True)
    shown = json.loads(proc.stdout)
    sigmas = set()

    def walk(node):
        if isinstance(node, dict):
            params = node.get("params", {}).get("params.yaml", {}).get("data", {})
            if "evaluate" in params and node.get("metrics", {}).get("metrics/evaluate-l1.json"):
                sigmas.add(params["evaluate"]["smooth_sigma"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    assert {0.5, 2.0} <= sigmas, f"queued experiments with their metrics not found: {sigmas}"


def test_torchrun_launcher_is_one_param_away(project):
    """model.launcher turns the training stages into data-parallel runs (gloo on CPU, 2 processes). Like any
    change of a model param, the experiment retrains the models without regenerating or resplitting the data,
    and `dvc metrics diff` shows what changed."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    out = run(["dvc", "exp", "run", "-S", "model.launcher=torchrun --standalone --nproc-per-node 2"], project)
    assert "Running stage 'train-baseline'" in out and "Running stage 'train-multiscale'" in out
    assert "Running stage 'synthesize'" not in out and "Running stage 'prepare-split'" not in out
    for model in ("baseline", "multiscale"):
        assert json.loads((project / "metrics" / f"train-{model}.json").read_text())["world_size"] == 2
    changed = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], project))
    assert changed["metrics/train-baseline.json"]["world_size"] == {"old": 1, "new": 2, "diff": 1}
    assert "best_val_loss" in changed["metrics/train-baseline.json"]
    assert json.loads((project / "metrics" / "evaluate-ssim.json").read_text())["baseline"]["image_auroc"] is not None
