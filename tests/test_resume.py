"""Kill a real training run and resume it: no half-written outputs, and the same result as a run that
was never interrupted."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aead.params import parse_params
from aead.data.prepare import prepare_split


def make_setup(work: Path, raw_params: dict, dataset: Path, flip_rotate: bool = False) -> Path:
    """Params of a 40-epoch run on the small odd data set in ``work``, and its prepared split."""
    raw = copy.deepcopy(raw_params)
    raw["data"].update(root=str(dataset), categories=["widget"], image_size=48, prepared_dir=str(work / "prepared"))
    raw["model"].update(epochs=40, patience=40, batch_size=4, flip_rotate=["widget"] if flip_rotate else [])
    raw["baseline"]["base_channels"] = 8
    raw["segmentation"].update(steps=150, batch_size=4, base_channels=4)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    prepare_split(parse_params(raw).data, log=lambda m: None)
    return work


@pytest.fixture
def setup(tmp_path, raw_params, odd_dataset, repo_root):
    return make_setup(tmp_path, raw_params, odd_dataset), repo_root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, raw_params_module, odd_dataset_module, repo_root):
    """One uninterrupted run (tag "whole"), shared by the tests that compare an interrupted run with it; each
    test trains under its own tag. Its images are flipped and turned (model.flip_rotate), so a resumed run
    must also restore that random stream; the head test below runs without."""
    work = make_setup(tmp_path_factory.mktemp("resume"), raw_params_module, odd_dataset_module, flip_rotate=True)
    subprocess.run(train_cmd(work, repo_root, "whole"), check=True, capture_output=True)
    return work, repo_root


def train_cmd(work: Path, repo: Path, tag: str) -> list[str]:
    return [sys.executable, str(repo / "stages" / "train.py"), "--model", "baseline",
            "--params", str(work / "params.yaml"), "--models-dir", str(work / f"models-{tag}"),
            "--metrics-dir", str(work / f"metrics-{tag}"), "--plot", str(work / f"train-{tag}.csv"),
            "--resume-dir", str(work / f"resume-{tag}")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_training_resumes_to_the_same_result(trained, sig):
    work, repo = trained
    cut = f"cut-{sig.name}"
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps it ignored:
    # give the child the default disposition, so that it sees the interrupt as a user's Ctrl-C
    proc = subprocess.Popen(train_cmd(work, repo, cut), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = work / f"resume-{cut}" / "widget.pt"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                if torch.load(state, weights_only=True)["epoch"] >= 2:
                    break
            except Exception:  # being replaced at this very moment: look again
                pass
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before the test could interrupt it: make it longer"
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    for out in (f"models-{cut}", f"metrics-{cut}", f"train-{cut}.csv"):
        assert not (work / out).exists(), f"{out} written by a killed run"
    if sig != signal.SIGKILL:  # SIGKILL cannot be caught: a temporary file may stay (removed on the next run)
        left = [p for p in work.rglob("*.tmp") if cut in str(p.relative_to(work))]
        assert not left, f"temporary files left behind: {left}"

    again = subprocess.run(train_cmd(work, repo, cut), check=True, capture_output=True, text=True)
    assert "resuming after epoch" in again.stdout
    assert (work / f"train-{cut}.csv").read_text() == (work / "train-whole.csv").read_text()
    a = torch.load(work / "models-whole" / "widget.pt", weights_only=True)["state_dict"]
    b = torch.load(work / f"models-{cut}" / "widget.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (work / f"resume-{cut}").exists(), "resume state removed once the stage completed"


def head_cmd(work: Path, repo: Path, tag: str) -> list[str]:
    return [sys.executable, str(repo / "stages" / "train_head.py"), "--model", "baseline",
            "--params", str(work / "params.yaml"), "--models-root", str(work / "models"),
            "--out", str(work / f"heads-{tag}"), "--metrics-dir", str(work / f"metrics-head-{tag}"),
            "--plot", str(work / f"head-{tag}.csv")]


def test_a_killed_head_stage_writes_nothing_and_its_rerun_gives_the_same_head(setup):
    """The segmentation head is its own stage: killed while it trains, it leaves no head, metrics or plot behind,
    and the rerun (from the head's seed) ends with the uninterrupted run's weights."""
    work, repo = setup
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["model"].update(epochs=2, patience=2)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    train = train_cmd(work, repo, "ae")
    train[train.index("--models-dir") + 1] = str(work / "models" / "baseline")
    subprocess.run(train, check=True, capture_output=True)
    subprocess.run(head_cmd(work, repo, "whole"), check=True, capture_output=True)
    proc = subprocess.Popen(head_cmd(work, repo, "cut"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "segmentation head step 50/150" in line:
            os.kill(proc.pid, signal.SIGTERM)
            break
    proc.wait(timeout=30)
    assert proc.returncode != 0, "the head finished before the test could interrupt it: make it longer"
    for out in ("heads-cut", "metrics-head-cut", "head-cut.csv"):
        assert not (work / out).exists(), f"{out} written by a killed run"
    subprocess.run(head_cmd(work, repo, "cut"), check=True, capture_output=True)
    a = torch.load(work / "heads-whole" / "widget.pt", weights_only=True)["state_dict"]
    b = torch.load(work / "heads-cut" / "widget.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_state_of_other_params_is_ignored(trained):
    work, repo = trained
    (work / "resume-b").mkdir()
    raw = yaml.safe_load((work / "params.yaml").read_text())
    stale = {"fingerprint": "other", "epoch": 5}
    torch.save(stale, work / "resume-b" / "widget.pt")
    out = subprocess.run(train_cmd(work, repo, "b"), check=True, capture_output=True, text=True).stdout
    assert "from other params or data; starting over" in out
    assert (work / "train-b.csv").read_text() == (work / "train-whole.csv").read_text()
    assert raw["model"]["epochs"] == 40
