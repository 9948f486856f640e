"""The benchmark is not a timed test: CI only checks that it runs end to end on tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from test_predict import pipeline  # noqa: F401  (module fixture: a trained, calibrated tiny pipeline)


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


def test_pipeline_benchmark_finds_every_stage_details_and_counts_totals_once(repo_root):
    """benchmarks/pipeline.py (a full `dvc repro`, too long for the suite) maps each stage DVC announces to the
    details file the stage writes, and counts a total beside its per-category parts once."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("pipeline_bench", repo_root / "benchmarks" / "pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if name == "check-params":  # its output is a constant stamp; its seconds are all fixed cost
            continue
        for item in stage.get("foreach", [None]):
            body = stage["do"] if item is not None else stage
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in body["outs"]]
            stage_name = f"{name}@{item}" if item is not None else name
            expected = f"metrics/details/{bench.details_file(stage_name)}"
            assert any(o.replace("${item}", str(item)) == expected for o in outs), (stage_name, outs)
    details = {"train_seconds": 10.0, "categories": {"a": {"train_seconds": 4.0}, "b": {"train_seconds": 6.0}}}
    assert bench.recorded_seconds(details) == 10.0
    nested = {"m": {"categories": {"a": {"scoring_seconds": 1.0, "metrics_seconds": 0.5}, "b": {"scoring_seconds": 2.0}}}}
    assert bench.recorded_seconds(nested) == 3.5 and bench.recorded_seconds(nested, bench.NARROW) == 3.0


def test_bank_scale_benchmark_runs_on_tiny_sizes(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bank_scale.py", "--tiny", "--work", str(tmp_path)],
                          cwd=repo_root, check=True, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["images"], r["processes"], r["held"]) for r in rows] == [
        (12, 1, "chunks of 8"), (12, 2, "chunks of 8"), (40, 1, "chunks of 8"), (40, 2, "chunks of 8"),
        (40, 1, "all patches")]
    assert all(r["peak_gb"] > 0 and r["bound_gb"] > 0 for r in rows)
    assert all(r["patches"] == 40 * 16 and r["bank_size"] == 64 for r in rows[2:])
    assert len(list((tmp_path / "images").glob("*.png"))) == 40 + 20


def test_real_data_benchmark_starts_the_bank_stage_with_its_launcher(repo_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_data_bench", repo_root / "benchmarks" / "real_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.bank_launcher({"pretrained": {"launcher": "python3"}}) == [sys.executable]
    assert bench.bank_launcher({"pretrained": {"launcher": "torchrun --standalone --nproc-per-node 2"}}) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_shape_memory_benchmark_reports_resident_memory(repo_root):
    proc = subprocess.run([sys.executable, "benchmarks/shape_memory.py", "--shapes", "many", "--images", "3",
                           "--every", "2"], cwd=repo_root, check=True, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert [line.split(" images")[0] for line in lines] == ["2", "3"], proc.stdout
    assert all(float(line.split("resident ")[1].split(" GB")[0]) > 0 for line in lines)


def test_side_signals_benchmark_scores_the_map_as_the_evaluation_does(repo_root, pipeline):  # noqa: F811
    """benchmarks/side_signals.py on a finished run: its row for the map alone is the evaluation's image AUROC, and
    every signal, alone and fused, gets a row with an image AUROC (and a pixel AUROC for the maps)."""
    from aead.evaluation.evaluate import evaluate
    from aead.params import load_params

    work, _, _ = pipeline
    expected = evaluate(load_params(work / "params.yaml"), "pretrained", work / "models",
                        log=lambda m: None).metrics["pretrained"]["image_auroc"]
    proc = subprocess.run([sys.executable, "benchmarks/side_signals.py", "--run", str(work)], cwd=repo_root,
                          check=True, capture_output=True, text=True)
    rows = {line.split(" image ")[0].strip(): line for line in proc.stdout.splitlines() if " image " in line}
    signals = ("brightness", "shading", "position", "global")
    assert set(rows) == {"pretrained map"} | {f"{s} alone" for s in signals} | {
        f"map {f} {s}" for s in signals for f in ("+0.5", "+1", "max")}, proc.stdout
    assert float(rows["pretrained map"].split(" image ")[1].split()[0]) == round(expected, 3)
    for name, line in rows.items():
        assert 0.0 <= float(line.split(" image ")[1].split()[0]) <= 1.0
        assert ("| pixel " in line) == ("global" not in name), line
