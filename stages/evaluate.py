"""Stages evaluate-l1 and evaluate-ssim: score the test split with both trained models
(params: evaluate.*, data.*, model.device, model.num_threads)."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.evaluation import SCORE_NAMES, calibration_record, evaluate, heatmap_picker
from aead.params import load_params
from aead.plots import comparison_figure
from aead.report import write_heatmaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=("l1", "ssim"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-root", default="models")
    parser.add_argument("--metrics", help="default: metrics/evaluate-<method>.json")
    parser.add_argument("--plots-dir", help="default: plots/evaluate-<method>")
    parser.add_argument("--calibration", help="default: models/calibration-<method>.json")
    args = parser.parse_args()
    params = load_params(args.params)
    plots_dir = Path(args.plots_dir or f"plots/evaluate-{args.method}")
    per_type = params.evaluate.heatmaps_per_type if args.method == "ssim" else 0
    ev = evaluate(params, args.method, Path(args.models_root), log=log,
                  heatmap_indices=heatmap_picker(per_type) if per_type else None)
    io.write_csv(plots_dir / "roc.csv", ev.roc_rows, ["model", "category", "fpr", "tpr"])
    io.write_csv(plots_dir / "pr.csv", ev.pr_rows, ["model", "category", "recall", "precision"])
    io.write_csv(plots_dir / "category_auroc.csv", ev.category_rows,
                 ["model", "category", "image_auroc", "pr_auc", "pixel_auroc", "aupro"])
    io.write_csv(plots_dir / "scores.csv", ev.score_rows,
                 ["path", "category", "defect_type", "label", "model", *SCORE_NAMES, "normalized", "anomalous"])
    comparison_figure(plots_dir / "comparison.png", ev.metrics, ev.results, params.evaluate.image_score,
                      f"{args.method.upper()} reconstruction error, '{params.evaluate.image_score}' image score")
    if per_type:
        write_heatmaps(plots_dir / "heatmaps", ev.results, params.data.prepared_dir, log=log)
    io.write_json(args.calibration or f"models/calibration-{args.method}.json",
                  calibration_record(params, args.method, ev.calibration))
    io.write_json(args.metrics or f"metrics/evaluate-{args.method}.json", ev.metrics)


if __name__ == "__main__":
    run_stage(main)
