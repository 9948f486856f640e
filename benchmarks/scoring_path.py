"""The pretrained detector's scoring path in ONNX Runtime, per bank search, side by side in one run: for each search
(exact, or two-stage with ``k`` candidates ranked in ``d`` principal dimensions: ``pretrained.search_candidates`` and
``pretrained.search_dim``), the category's bank is re-indexed, the detector exported to ONNX, and timed at batch 1
and batched (interleaved rounds, median ms per image), its raw scores on the test images compared with the exact
search's (largest relative difference, verdicts that differ at the exported threshold), and ONNX Runtime's profiler
splits one batch-1 pass into the stages of the path by operator type.

Run it in a project folder after ``dvc repro`` (or a ``benchmarks/real_data.py`` run folder):

    python benchmarks/scoring_path.py --images ../shared/data/mvtec_transistor_256/transistor/test \\
        --category transistor --search exact 16x32 8x32 16x24
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from aead.deploy.export import build_detector, export_program, save_onnx
from aead.deploy.predict import recorded_params
from aead.deploy.runtime import read_index
from deploy_latency import read_folder, same_size  # this folder's script: the timed images

# ONNX operator types by the stage of the scoring path they serve in the pretrained detector's graph
STAGES = {"backbone": {"Conv", "Clip", "Relu", "HardSigmoid", "Sigmoid", "Mul", "Add", "Pad"},
          "bank search": {"MatMul", "Gemm", "TopK", "ReduceMin", "ArgMin", "GatherElements", "GatherND", "Gather",
                          "ReduceL2", "Sqrt", "Sub", "ReduceSum", "Pow", "Min", "Less", "Where"},
          "resize, pooling, upsampling, smoothing": {"Resize", "AveragePool", "Round", "Floor", "Div", "Cast",
                                                     "ScatterND", "Slice", "Concat", "Transpose", "Reshape",
                                                     "Unsqueeze", "Squeeze", "Expand", "Range", "Tile"},
          "image score": {"ReduceMean", "Sort", "ReduceMax"}}


def stage_of(op_type: str) -> str:
    for stage, ops in STAGES.items():
        if op_type in ops:
            return stage
    return "other"


def parse_search(text: str) -> tuple[int, int]:
    """``exact`` -> (0, 0); ``KxD`` -> (K candidates, D dimensions)."""
    if text == "exact":
        return 0, 0
    k, _, d = text.partition("x")
    return int(k), int(d)


def session(path: Path, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = profile
    options.profile_file_prefix = str(path.with_suffix(""))  # beside the model, not in the working directory
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_stages(path: Path, image: np.ndarray, calls: int) -> dict[str, float]:
    """Milliseconds per call of each stage over ``calls`` profiled batch-1 calls (after a warm-up)."""
    sess = session(path, profile=True)
    sess.run(None, {"images": image})
    for _ in range(calls):
        sess.run(None, {"images": image})
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_stage: dict[str, float] = defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start_count = len(runs) - calls
    first = runs[start_count]["ts"] if runs else 0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first:
            per_stage[stage_of(e["args"].get("op_name", ""))] += e["dur"] / 1000 / calls
    per_stage["whole call"] = sum(r["dur"] for r in runs[start_count:]) / 1000 / calls
    return dict(per_stage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of test images (searched recursively)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--models-root", type=Path, default=Path("models"))
    parser.add_argument("--search", nargs="+", default=["exact", "16x32"], help="exact or KxD, the first the reference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--count", type=int, default=16, help="images timed per round and batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile-calls", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    index = read_index(args.models_root / "export")
    params = recorded_params(args.models_root, index["method"])
    found = read_folder(args.images)
    sizes = {im.shape for im in found}
    tmp = Path(tempfile.mkdtemp(prefix="scoring-path-"))
    sessions, raw, threshold = {}, {}, None
    for name in args.search:
        k, d = parse_search(name)
        detector = build_detector(params, args.models_root, args.model, args.category, index["method"])
        detector.mapper.pretrained.index_bank(d, k)
        threshold = detector.calibration.threshold
        path = tmp / f"{name}.onnx"
        with torch.no_grad():
            save_onnx(export_program(detector, params.data.image_size), params.data.image_size, path)
        sessions[name] = session(path)
        raw[name] = np.array([sessions[name].run(None, {"images": im[None]})[1][0] for im in found])
    images = same_size(found, args.count)
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for name, sess in sessions.items():
            for batch in args.batch_sizes:
                start = time.perf_counter()
                for s in range(0, len(images), batch):
                    sess.run(None, {"images": images[s : s + batch]})
                times[(name, batch)].append((time.perf_counter() - start) / len(images))
    profiles = {name: profile_stages(tmp / f"{name}.onnx", images[:1], args.profile_calls) for name in sessions}
    reference = args.search[0]
    print(f"{args.model}/{args.category}: {len(found)} test images ({len(sizes)} sizes), timed on "
          f"{images.shape[2]}x{images.shape[1]}, median of {args.rounds} rounds of {len(images)} images; scores "
          f"against '{reference}'")
    print("| search | " + " | ".join(f"batch {b}: ms/image | images/s" for b in args.batch_sizes)
          + " | raw score: max relative difference | verdicts that differ |")
    print("|---|" + "---|---|" * len(args.batch_sizes) + "---|---|")
    table: dict[str, dict] = {}
    for name in sessions:
        rel = np.abs(raw[name] - raw[reference]) / np.abs(raw[reference])
        flips = int(((raw[name] >= threshold) != (raw[reference] >= threshold)).sum())
        cells = []
        row: dict = {"max_relative_difference": float(rel.max()), "verdicts_differ": flips, "profile_ms": profiles[name]}
        for b in args.batch_sizes:
            ms = 1000 * statistics.median(times[(name, b)])
            row[f"batch {b}"] = {"ms_per_image": ms, "images_per_second": 1000 / ms}
            cells += [f"{ms:.1f}", f"{1000 / ms:.1f}"]
        table[name] = row
        print(f"| {name} | " + " | ".join(cells) + f" | {rel.max():.1e} | {flips} of {len(found)} |")
    stages = [s for s in [*STAGES, "other"] if any(s in p for p in profiles.values())]
    print(f"\nONNX Runtime's profiler, batch 1, ms per call (mean of {args.profile_calls} calls):")
    print("| search | " + " | ".join(stages) + " | whole call |")
    print("|---|" + "---|" * (len(stages) + 1))
    for name, p in profiles.items():
        print(f"| {name} | " + " | ".join(f"{p.get(s, 0.0):.1f}" for s in stages) + f" | {p['whole call']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
