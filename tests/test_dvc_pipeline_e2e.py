"""End to end: the real `dvc repro`, `dvc exp run`, `dvc metrics diff` and `dvc plots show` on tiny params,
in a temporary git repository holding a copy of this project."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvc/plots", ".dvc/.gitignore"]
METHODS = ("l1", "ssim", "seg", "knn", "pretrained", "fused")
STAGES = ("check-params", "synthesize", "prepare-split", "train-baseline", "train-multiscale", "train-head@baseline",
          "train-head@multiscale", "build-bank@baseline", "build-bank@multiscale", "build-pretrained-bank",
          *(f"evaluate-{m}" for m in METHODS), "export")


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def tiny_params(raw: dict) -> dict:
    raw["synthetic"].update(image_size=32, n_train=6, n_test_good=2, n_test_defect=1, categories=["tile"])
    raw["data"].update(image_size=32, categories=["tile"])
    raw["model"].update(epochs=2, batch_size=4)
    raw["baseline"]["base_channels"] = 4
    raw["multiscale"]["base_channels"] = 4
    raw["segmentation"].update(steps=3, batch_size=4, base_channels=4)
    raw["pretrained"].update(image_size=32, discriminator_steps=5)
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


def details(project: Path, name: str) -> dict:
    return json.loads((project / "metrics" / "details" / f"{name}.json").read_text())


def headline(project: Path, name: str) -> dict:
    return json.loads((project / "metrics" / f"{name}.json").read_text())


def test_repro_runs_every_stage_then_nothing(project, tmp_path):
    out = run(["dvc", "repro"], project)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    for method in ("seg", "knn", "pretrained", "fused"):
        m = details(project, f"evaluate-{method}")
        model = "pretrained" if method == "pretrained" else "baseline"
        assert m["method"] == method and 0.0 <= m[model]["pixel_auroc"] <= 1.0
        assert list((project / "plots" / f"evaluate-{method}" / "heatmaps").rglob("*.png"))
    low, value, high = (headline(project, "pretrained")[k] for k in ("image_auroc_low", "image_auroc",
                                                                      "image_auroc_high"))
    assert low <= value <= high, "the headline image AUROC comes with its bootstrap interval"
    assert set(headline(project, "l1-baseline")) == {
        "image_auroc", "image_auroc_low", "image_auroc_high", "pixel_auroc", "aupro", "false_alarm_rate",
        "false_alarm_rate_low", "false_alarm_rate_high", "recall", "recall_low", "recall_high",
        "guaranteed_false_alarm_rate", "calibration_good"}
    op = headline(project, "pretrained")
    assert op["false_alarm_rate_low"] <= op["false_alarm_rate"] <= op["false_alarm_rate_high"]
    assert op["recall_low"] <= op["recall"] <= op["recall_high"] and op["calibration_good"] >= 1
    export = details(project, "export")["method"]
    assert export == yaml.safe_load((project / "params.yaml").read_text())["export"]["method"]
    index = json.loads((project / "models" / "export" / "index.json").read_text())
    for files in index["files"].values():  # every detector in both formats, the ONNX model scored below
        assert set(files) == {"pt2", "onnx"} and all((project / "models" / "export" / f).is_file()
                                                     for f in files.values())
    image = sorted((project / "data" / "synthetic" / "tile" / "test").rglob("*.png"))[0]
    rows = []
    for runtime in ("torch", "onnxruntime"):
        run([sys.executable, "-m", "aead", "predict", str(image), "--category", "tile", "--runtime", runtime,
             "--out", str(tmp_path / runtime)], project)
        rows.append(next(csv.DictReader(open(tmp_path / runtime / "predictions.csv"))))
    assert rows[0]["verdict"] == rows[1]["verdict"]
    assert float(rows[0]["raw_score"]) == pytest.approx(float(rows[1]["raw_score"]), rel=1e-4)
    assert details(project, "head-baseline")["categories"]["tile"]["steps"] == 3
    bank = details(project, "bank-baseline")["categories"]["tile"]
    ratio = yaml.safe_load((project / "params.yaml").read_text())["memory_bank"]["coreset_ratio"]
    assert bank["patches"] == 5 * 32 * 32 and bank["bank_size"] == round(ratio * bank["patches"])  # 5 of 6 train
    l1 = details(project, "evaluate-l1")
    for model in ("baseline", "multiscale"):
        for key in ("image_auroc", "image_auroc_ci", "image_auroc_pooled", "pr_auc", "pixel_auroc", "aupro"):
            assert key in l1[model]
        for key in ("image_auroc", "pr_auc", "pixel_auroc", "aupro", "f1_max", "threshold", "scoring_images_per_second"):
            assert key in l1[model]["categories"]["tile"]
    assert details(project, "evaluate-pretrained")["pretrained"]["scoring_images_per_second"] > 0
    tile = details(project, "evaluate-pretrained")["pretrained"]["categories"]["tile"]
    assert sum(t["n"] for t in tile["by_defect_type"].values()) == tile["n_anomalous"]
    assert (project / "models" / "baseline" / "tile.pt").is_file()
    shown = run(["dvc", "metrics", "show"], project)
    assert "test_anomalous" in shown, "prepare-split's counts are DVC metrics"
    assert "seconds" not in shown, "timings stay out of the listed metrics"
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "default run"], project)


def changed_stages(project: Path, key: str, value) -> set[str]:
    """The stages `dvc status` says are out of date after ``key`` is set to ``value`` in params.yaml (restored after)."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    section, name = key.split(".")
    raw[section][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        return set(json.loads(run(["dvc", "status", "--json"], project)))
    finally:
        run(["git", "checkout", "-q", "HEAD", "--", "params.yaml"], project)


def test_a_change_reruns_what_reads_it_and_nothing_else(project):
    if not (project / "dvc.lock").is_file():
        run(["dvc", "repro"], project)
    """`dvc status` lists the stages whose own params changed (their dependants follow when their outputs change):
    the heads, not the autoencoders, for segmentation.*; the pretrained bank alone for its image size. check-params
    reads all of params.yaml, so it reruns for every change; its output does not change, so nothing reruns for it."""
    heads = changed_stages(project, "segmentation.steps", 4)
    assert heads == {"check-params", "train-head@baseline", "train-head@multiscale", "evaluate-seg",
                     "evaluate-fused"}, heads
    assert changed_stages(project, "pretrained.image_size", 48) == {"check-params", "build-pretrained-bank"}
    banks = changed_stages(project, "memory_bank.coreset_ratio", 0.5)
    assert banks == {"check-params", "build-bank@baseline", "build-bank@multiscale", "evaluate-knn",
                     "evaluate-fused"}, banks


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
    assert not (clone / "models" / "baseline" / "tile.pt").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models" / "baseline" / "tile.pt").is_file()
    assert "up to date" in run(["dvc", "status"], clone)
    assert "Running stage" not in run(["dvc", "repro"], clone)


def test_plots_show_writes_declared_plots(project, tmp_path):
    run(["dvc", "plots", "show", "-o", str(tmp_path / "html")], project)
    html = (tmp_path / "html" / "index.html").read_text()
    for title in ("Autoencoder validation loss", "ROC, L1 reconstruction error",
                  "Image AUROC per category, SSIM reconstruction error"):
        assert title in html
    assert list((tmp_path / "html" / "static").glob("*comparison.png"))


def test_exp_run_on_another_mvtec_folder(project, odd_dataset):
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    out = run(["dvc", "exp", "run", "-S", f"data.root={odd_dataset}", "-S", "data.categories=[widget]",
               "evaluate-l1"], project)
    assert "Running stage 'prepare-split'" in out
    split = details(project, "prepare-split")
    assert split["categories"]["widget"]["test_with_mask"] == 2
    l1 = details(project, "evaluate-l1")
    assert l1["baseline"]["categories"]["widget"]["n_anomalous_with_mask"] == 2
    assert l1["baseline"]["categories"]["widget"]["n_anomalous"] == 3


def test_seed_recipe_runs_without_a_segmentation_head_or_memory_bank(project):
    """segmentation.steps: 0 and memory_bank.coreset_ratio: 0 (part of the seed recipe) train neither; the
    evaluation stages of the maps that need them say so instead of failing."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    out = run(["dvc", "exp", "run", "-S", "segmentation.steps=0", "-S", "memory_bank.coreset_ratio=0",
               "-S", "export.method=ssim", "evaluate-seg", "evaluate-knn", "evaluate-fused", "export"], project)
    assert "Running stage 'evaluate-seg'" in out and "Running stage 'export'" in out
    seg = details(project, "evaluate-seg")
    assert "no segmentation head" in seg["note"] and "baseline" not in seg
    assert headline(project, "seg-baseline")["image_auroc"] is None
    knn = details(project, "evaluate-knn")
    assert "no memory bank" in knn["note"] and "baseline" not in knn
    assert "nothing to score" in details(project, "evaluate-fused")["note"]
    assert "no segmentation head" in details(project, "head-baseline")["note"]
    assert not list((project / "models" / "heads" / "baseline").iterdir())
    assert details(project, "export")["method"] == "ssim"
    assert (project / "plots" / "evaluate-seg" / "roc.csv").read_text().strip() == "model,category,fpr,tpr"


def committed_run(project: Path) -> None:
    """The workspace back at the last commit, with a committed `dvc repro` (made here when this test runs alone)."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    if (project / "dvc.lock").is_file():
        run(["dvc", "checkout", "--force"], project)
    else:
        run(["dvc", "repro"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "default run"], project)


# README, What happens when: the one command that puts the workspace back at the last commit after a failed run
RECOVER = "git rm -rq --cached params.yaml dvc.lock metrics plots && git checkout HEAD -- params.yaml dvc.lock metrics plots && dvc checkout --force"


def same_as_head(project: Path) -> list[str]:
    """The git-tracked files whose content differs from the last commit's, by content: after a failed `dvc exp run`
    in the workspace, git's index can hold stale stat data, and `git status` then misses a file of unchanged size."""
    tracked = run(["git", "ls-files", "params.yaml", "dvc.lock", "metrics", "plots"], project).split()
    return [f for f in tracked if not (project / f).is_file() or run(["git", "hash-object", f], project).strip()
            != run(["git", "rev-parse", f"HEAD:{f}"], project).strip()]


def results_snapshot(project: Path) -> dict[str, bytes]:
    """Every file under models/ and metrics/, by path."""
    return {str(p.relative_to(project)): p.read_bytes() for d in ("models", "metrics") for p in (project / d).rglob("*")
            if p.is_file()}


def predict_one(project: Path, out: Path) -> str:
    """`aead predict` of one test image with the exported map: the CSV row it writes (output folder left out)."""
    image = sorted((project / "data" / "synthetic" / "tile" / "test").rglob("*.png"))[0]
    run([sys.executable, "-m", "aead", "predict", str(image), "--category", "tile", "--out", str(out)], project)
    return (out / "predictions.csv").read_text().splitlines()[1].replace(str(out), "<out>")


def test_an_invalid_param_stops_the_experiment_before_any_output_is_removed(project, tmp_path):
    """check-params, upstream of every stage, fails first: models/, metrics/ and `aead predict` are as before, and the
    recovery command leaves nothing changed. `dvc exp run --temp` leaves the workspace untouched."""
    committed_run(project)
    before, predicted = results_snapshot(project), predict_one(project, tmp_path / "before")
    for setting, message in (("pretrained.backbone=nonexistent", "pretrained.backbone: expected one of"),
                             ("data.image_size=100", "data.image_size: expected a positive multiple of 8")):
        proc = subprocess.run(["dvc", "exp", "run", "-S", setting], cwd=project, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and message in out, out
        assert out.count("Running stage") == 1 and "Running stage 'check-params'" in out, out
        assert results_snapshot(project) == before
        assert predict_one(project, tmp_path / setting) == predicted
        run(["bash", "-c", RECOVER], project)
        assert run(["git", "status", "--porcelain"], project).strip() == "" and same_as_head(project) == []
        assert "up to date" in run(["dvc", "status"], project)
    missing = tmp_path / "no-such-folder"
    proc = subprocess.run(["dvc", "exp", "run", "--temp", "-S", f"data.root={missing}"], cwd=project,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and str(missing) in proc.stdout + proc.stderr
    assert run(["git", "status", "--porcelain"], project).strip() == ""
    assert "up to date" in run(["dvc", "status"], project)


def test_a_run_that_fails_midway_is_undone_by_the_recovery_command_also_after_exp_apply(project, tmp_path):
    """An experiment applied with `dvc exp apply`, then a run that fails in prepare-split (a damaged image) after DVC
    removed that stage's outputs: the recovery command restores the last commit exactly, and `dvc exp apply`
    brings the applied experiment back."""
    committed_run(project)
    run(["dvc", "exp", "run", "--temp", "-n", "sigma2", "-S", "pretrained.smooth_sigma=2.0"], project)
    run(["dvc", "exp", "apply", "sigma2"], project)
    applied = results_snapshot(project)
    assert "params.yaml" in run(["git", "status", "--porcelain"], project)
    damaged = tmp_path / "damaged"
    shutil.copytree(project / "data" / "synthetic", damaged)
    bad = sorted((damaged / "tile" / "train" / "good").glob("*.png"))[0]
    bad.write_bytes(b"not a png")
    proc = subprocess.run(["dvc", "exp", "run", "-S", f"data.root={damaged}"], cwd=project, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "cannot decode image" in proc.stdout + proc.stderr
    assert not (project / "data" / "prepared").exists(), "DVC's behaviour changed: update the README"
    run(["bash", "-c", RECOVER], project)
    assert run(["git", "status", "--porcelain"], project).strip() == "" and same_as_head(project) == []
    assert "up to date" in run(["dvc", "status"], project)
    run(["dvc", "exp", "apply", "sigma2"], project)
    assert results_snapshot(project) == applied


TIMING_KEYS = {"train_seconds", "images_per_second", "build_seconds", "build_images_per_second", "scoring_seconds",
               "scoring_images_per_second", "validation_seconds", "metrics_seconds", "generate_seconds",
               "prepare_seconds", "export_seconds", "discriminator_seconds", "part_scales_seconds"}
TOLERANCE = 0.01  # the agreement promised for every metric on another x86 CPU (README, Reproducibility)


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return obj


def numbers(obj, prefix=""):
    """Every number of a metrics file, by its flattened key."""
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in numbers(item, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, item in enumerate(obj) for k, v in numbers(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def other_cpu_env(isa: str | None, threads: int) -> dict:
    """The environment of a run on another CPU: oneDNN limited to ``isa`` (None: this CPU's own), ``threads`` threads,
    and none of the pins the test process itself starts with, so that the stages pin (or not) by themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    return env


def test_another_cpu_reproduces_the_metrics(project):
    """The committed run (this CPU's instruction set, 2 threads) rerun as on another x86 CPU (oneDNN limited to AVX2,
    one thread): the trained autoencoders and heads are identical byte for byte (model.deterministic pins the
    training numerics) and every metric agrees within the tolerance promised (the forward passes, and so the memory
    banks, use each CPU's fastest kernels)."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    if (project / "dvc.lock").is_file():  # the committed run: its outputs back in place of the last experiment's
        run(["dvc", "checkout", "--force"], project)
    run(["dvc", "repro"], project, env=other_cpu_env(None, 2))  # a first run when this test runs alone
    files = sorted((project / "metrics").rglob("*.json"))
    before = {p: json.loads(p.read_text()) for p in files}
    trained = [project / "models" / d for d in ("baseline", "multiscale", "heads")]
    models = {p: p.read_bytes() for d in trained for p in d.rglob("*.pt")}
    run(["dvc", "repro", "--force"], project, env=other_cpu_env("AVX2", 1))
    assert models == {p: p.read_bytes() for p in models}, "a training stage gave other weights on the other CPU"
    worst = (0.0, "")
    for path, old in before.items():
        new = json.loads(path.read_text())
        a, b = numbers(without_timing(old)), numbers(without_timing(new))
        assert a.keys() == b.keys(), path
        for key in a:
            worst = max(worst, (abs(a[key] - b[key]), f"{path.name}: {key}"))
    assert worst[0] <= TOLERANCE, f"largest difference {worst[0]:.4f} at {worst[1]}"


def test_queued_experiments_run_concurrently(project):
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    if not (project / "dvc.lock").is_file():  # run alone: commit a first run, as the first test does
        run(["dvc", "repro"], project)
        run(["git", "add", "-A"], project)
        run(["git", "commit", "-qm", "default run"], project)
    # a two-point sweep of a param that only the pretrained map's evaluations (and the export) read
    run(["dvc", "exp", "run", "--queue", "-S", "pretrained.smooth_sigma=2.0,8.0"], project)
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
        assert "Running stage 'evaluate-pretrained'" in log and "Running stage 'evaluate-l1'" not in log, log
        assert "Running stage 'build-pretrained-bank'" not in log, log
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True, check=True)
    shown = json.loads(proc.stdout)
    sigmas = set()

    def walk(node):
        if isinstance(node, dict):
            params = node.get("params", {}).get("params.yaml", {}).get("data", {})
            if "pretrained" in params and node.get("metrics", {}).get("metrics/pretrained.json"):
                sigmas.add(params["pretrained"]["smooth_sigma"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    assert {2.0, 8.0} <= sigmas, f"queued experiments with their metrics not found: {sigmas}"


def test_torchrun_launcher_is_one_param_away(project):
    """model.launcher turns the training stages into data-parallel runs (gloo on CPU, 2 processes). Like any
    change of a model param, the experiment retrains the models without regenerating or resplitting the data,
    and `dvc metrics diff` shows what changed."""
    run(["git", "checkout", "-q", "HEAD", "--", "."], project)
    out = run(["dvc", "exp", "run", "-S", "model.launcher=torchrun --standalone --nproc-per-node 2", "train-baseline",
               "train-multiscale"], project)
    assert "Running stage 'train-baseline'" in out and "Running stage 'train-multiscale'" in out
    assert "Running stage 'synthesize'" not in out and "Running stage 'prepare-split'" not in out
    for model in ("baseline", "multiscale"):
        assert details(project, f"train-{model}")["world_size"] == 2
    changed = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], project))
    assert "loss" in changed["metrics/train-baseline.json"]
    assert headline(project, "ssim-baseline")["image_auroc"] is not None


def test_results_table_and_seed_spread(project):
    """`aead results` prints the README's table from the committed run's metrics; `aead seeds run` runs another
    seed as a DVC experiment in a temporary copy (the workspace stays as it was) and `aead seeds summary` gives
    mean ± std over it and the workspace's run."""
    committed_run(project)
    aead = [sys.executable, "-m", "aead"]
    table = run([*aead, "results"], project).splitlines()
    assert table[0].startswith("| map | model | image AUROC [95% CI] |") and len(table) == 2 + 11, table
    value = headline(project, "pretrained")["image_auroc"]
    assert any(line.startswith(f"| pretrained | pretrained | {value:.3f} [") for line in table), table
    run([*aead, "seeds", "run", "--seeds", "1"], project)
    assert run(["git", "status", "--porcelain"], project).strip() == "", "the seed run changed the workspace"
    summary = run([*aead, "seeds", "summary"], project)
    row = next(line for line in summary.splitlines() if line.startswith("| pretrained | pretrained |"))
    # image AUROC, pixel AUROC, AUPRO and the operating point's false-alarm rate and recall, each over the two seeds
    assert row.count("(n=2)") == 5 and "±" in row, summary
    # aead compare: the seed experiment against the committed run, and the committed run against itself
    compared = run([*aead, "compare", "HEAD", "seed-1"], project)
    assert max(map(len, compared.splitlines())) <= 120, compared
    for name in ("pretrained / pretrained", "l1 / baseline", "fused / multiscale"):
        assert name in compared, compared
    assert "seed-1 (" in compared and "paired bootstrap interval" in compared
    itself = run([*aead, "compare", "HEAD", "workspace"], project)
    body = itself.split("\n\n", 1)[1]
    rows = [line for line in body.splitlines() if line.startswith("  ") and not line.lstrip().startswith("metric")]
    assert rows and all(line.endswith("+0.0000 [+0.0000, +0.0000]") for line in rows), itself
