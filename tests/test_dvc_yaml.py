"""dvc.yaml declares exactly what each stage reads, so `dvc repro` reruns exactly what changed."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aead.params import load_params

STAGE_SCRIPTS = {
    "synthesize": "stages/synthesize.py",
    "prepare-split": "stages/prepare_split.py",
    "train-baseline": "stages/train.py",
    "train-multiscale": "stages/train.py",
    "evaluate-l1": "stages/evaluate.py",
    "evaluate-ssim": "stages/evaluate.py",
    "export": "stages/export.py",
}

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
    declared = {d for d in stages[stage]["deps"] if d.endswith(".py")}
    assert imported | {script} == declared, f"{stage}: declared deps differ from what it imports"


def test_declared_params_exist(stages, repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    load_params(repo_root / "params.yaml")
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} is not in params.yaml"
                node = node[part]


def test_metrics_and_plots_are_not_cached(stages):
    for name, stage in stages.items():
        for kind in ("metrics", "plots"):
            for entry in stage.get(kind, []):
                (path, opts), = entry.items()
                assert opts == {"cache": False}, f"{name}: {path} should have cache: false"
        assert stage.get("metrics"), f"{name} writes no metrics"
        assert any(str(next(iter(p))).endswith(".csv") for p in stage.get("plots", [])), f"{name}: no CSV plot"
