"""dvc.yaml declares exactly what each stage reads, so `dvc repro` reruns exactly what changed."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aead.params import PretrainedParams, load_params

STAGE_SCRIPTS = {
    "check-params": "stages/check_params.py",
    "synthesize": "stages/synthesize.py",
    "prepare-split": "stages/prepare_split.py",
    "train-baseline": "stages/train.py",
    "train-multiscale": "stages/train.py",
    "train-head": "stages/train_head.py",
    "build-bank": "stages/build_bank.py",
    "build-pretrained-bank": "stages/build_pretrained_bank.py",
    **{f"evaluate-{method}": "stages/evaluate.py" for method in ("l1", "ssim", "seg", "knn", "pretrained", "fused")},
    "export": "stages/export.py",
}


def stage_body(stage: dict) -> dict:
    """A stage's definition, also for a ``foreach`` stage (its ``do`` part)."""
    return stage.get("do", stage)

IMPORTS = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location('stage', sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for name, mod in sorted(sys.modules.items()):
    if name == 'aead' or name.startswith('aead.'):
        print(mod.__file__)
"""


@pytest.fixture(scope="module")
def stages(repo_root) -> dict:
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


@functools.cache
def imported_modules(script: str, repo_root: Path) -> frozenset[str]:
    """The package's source files a fresh interpreter imports when it loads ``script``."""
    out = subprocess.run([sys.executable, "-c", IMPORTS, script], cwd=repo_root, capture_output=True, text=True,
                         check=True).stdout.split()
    return frozenset(str(Path(f).resolve().relative_to(repo_root)) for f in out)


@pytest.mark.parametrize("stage", list(STAGE_SCRIPTS))
def test_code_deps_cover_every_imported_module(stage, stages, repo_root):
    script = STAGE_SCRIPTS[stage]
    imported = imported_modules(script, repo_root)
    declared = {d for d in stage_body(stages[stage])["deps"] if d.endswith(".py")}
    assert imported | {script} == declared, f"{stage}: declared deps differ from what it imports"


def test_declared_params_exist(stages, repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    load_params(repo_root / "params.yaml")
    for name, stage in stages.items():
        for key in stage_body(stage).get("params", []):
            node = raw
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} is not in params.yaml"
                node = node[part]


def test_the_pretrained_bank_reruns_for_every_key_that_shapes_it(stages):
    """`dvc exp run -S pretrained.<key>=...` must rebuild the bank for every key the bank stage reads: all of
    ``pretrained`` but the map's smoothing, which only the scoring stages read."""
    declared = {k.split(".", 1)[1] for k in stage_body(stages["build-pretrained-bank"])["params"]
                if k.startswith("pretrained.")}
    assert declared == {f.name for f in dataclasses.fields(PretrainedParams)} - {"smooth_sigma"}


def test_metrics_and_plots_are_not_cached(stages):
    for name, stage in stages.items():
        stage = stage_body(stage)
        for entry in stage.get("metrics", []):
            (path, opts), = entry.items()
            assert opts == {"cache": False}, f"{name}: {path} should have cache: false"
        for entry in stage.get("outs", []):
            if isinstance(entry, dict):
                (path, opts), = entry.items()
                assert opts == {"cache": False} and path.startswith(("plots/", "metrics/details/")), f"{name}: {path}"
        if name == "check-params":  # a constant stamp that every stage depends on: nothing to diff
            continue
        if name not in ("synthesize", "export"):  # these describe data and files, not results
            assert stage.get("metrics"), f"{name} writes no metrics"
        assert any(isinstance(o, dict) for o in stage["outs"]), f"{name}: writes nothing under plots/"


def test_each_plot_is_drawn_once_with_a_title_and_axis_labels(repo_root, stages):
    """Stage-level ``plots:`` would make DVC draw every CSV a second time with its default template; the plots are
    declared once, at the top level, each titled and with labelled axes, and each reads a stage's output."""
    top = yaml.safe_load((repo_root / "dvc.yaml").read_text())["plots"]
    outputs = set()
    for stage in stages.values():
        stage = stage_body(stage)
        assert "plots" not in stage
        for entry in stage.get("outs", []):
            outputs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    titles = []
    for entry in top:
        if isinstance(entry, str):  # an image or a folder of images
            assert entry in outputs or any(entry.startswith(o.replace("${key}", "")) for o in outputs), entry
            continue
        (title, spec), = entry.items()
        titles.append(title)
        assert {"x", "y", "x_label", "y_label", "template"} <= set(spec), title
        for path in spec["y"]:
            assert any(path == o or ("${item}" in o and path.startswith(o.split("${item}")[0])) for o in outputs), path
    assert len(titles) == len(set(titles))
