"""The benchmark is not a timed test: CI only checks that it runs end to end on tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image


def test_benchmark_runs_on_tiny_sizes(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/benchmark.py", "--tiny", "--out", str(out)], cwd=repo_root,
                   check=True, capture_output=True, text=True)
    results = json.loads(out.read_text())
    assert results["machine_conv_gflops"] > 0
    for key in ("train_baseline_32", "train_multiscale_32", "evaluate_32"):
        assert results[key]["ours_img_s"] > 0 and results[key]["reference_img_s"] > 0
        assert results[key]["ratio"] > 0
    assert results["evaluate_32"]["decode_only_img_s"] > 0


def test_determinism_benchmark_runs_on_tiny_sizes(repo_root, tmp_path):
    out = tmp_path / "determinism.csv"
    proc = subprocess.run([sys.executable, "benchmarks/determinism.py", "--tiny", "--out", str(out)], cwd=repo_root,
                          check=True, capture_output=True, text=True)
    assert "pinned" in proc.stdout and out.read_text().count("\n") == 1 + 3 + 1
    assert "pinned      " in proc.stdout and proc.stdout.splitlines()[1].endswith("yes"), proc.stdout


def test_memory_benchmark_runs_on_tiny_sizes(repo_root, tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, "benchmarks/memory.py", "--sizes", "16", "48", "--image-size", "32",
                    "--out", str(out)],
                   cwd=repo_root, check=True, capture_output=True, text=True)
    results = json.loads(out.read_text())
    assert set(results) == {"16", "48"}
    for r in results.values():
        assert r["peak_anon_mib"] > 0 and r["peak_rss_mib"] >= r["peak_anon_mib"]
    assert results["48"]["train_npy_mib"] > results["16"]["train_npy_mib"]


def test_scaling_benchmark_runs_on_tiny_sizes(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/scaling.py", "--tiny", "--out", str(tmp_path)], cwd=repo_root,
                          check=True, capture_output=True, text=True)
    rows = (tmp_path / "scaling.csv").read_text().splitlines()
    assert rows[0].startswith("method,patches,bank_size,build_seconds") and len(rows) == 1 + 4
    assert (tmp_path / "scaling.png").stat().st_size > 0 and "build time ~ patches^" in proc.stdout


def test_aspect_ratio_benchmark_runs_on_tiny_sizes(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/aspect_ratio.py", "--work", str(tmp_path / "w"),
                           "--train-strips", "8", "--test-good-strips", "4", "--defect-strips", "2"],
                          cwd=repo_root, check=True, capture_output=True, text=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| kept |", "| squashed |"))]
    assert len(rows) == 2, proc.stdout
    shapes = {name: Image.open(next((tmp_path / "w" / f"data-{name}" / "strip" / "test" / "good").iterdir())).size
              for name in ("kept", "squashed")}
    assert shapes == {"kept": (384, 128), "squashed": (128, 128)}
