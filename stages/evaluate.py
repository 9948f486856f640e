"""Stages evaluate-l1, evaluate-ssim, evaluate-seg, evaluate-knn, evaluate-pretrained and evaluate-fused: score
the test split with the trained models (params: evaluate.*, data.*, model.device, model.precision,
model.num_threads, model.seed; the stages of maps that need a head, a bank or the pretrained bank also read what says
whether it exists and how it is smoothed)."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.evaluation.evaluate import (calibration_record, evaluate, headline, headline_name, heatmap_picker,
                             not_trained_record)
from aead.params import METHODS, load_params, models_of
from aead.models.scoring import SCORE_NAMES
from aead.evaluation.plots import comparison_figure, note_figure
from aead.evaluation.report import write_heatmaps

CSV_COLUMNS = {
    "roc.csv": ["model", "category", "fpr", "tpr"],
    "pr.csv": ["model", "category", "recall", "precision"],
    "category_auroc.csv": ["model", "category", "image_auroc", "image_auroc_low", "image_auroc_high", "pr_auc",
                           "pixel_auroc", "aupro"],
    "scores.csv": ["path", "category", "defect_type", "label", "model", *SCORE_NAMES, "normalized", "anomalous"],
}
CSV_ROWS = {"roc.csv": "roc_rows", "pr.csv": "pr_rows", "category_auroc.csv": "category_rows",
            "scores.csv": "score_rows"}
TITLES = {"l1": "L1 reconstruction error", "ssim": "SSIM reconstruction error",
          "seg": "Segmentation head (image + reconstruction)", "knn": "Nearest-patch distance (encoder memory bank)",
          "pretrained": "Nearest-patch distance + feature discriminator (pretrained backbone)",
          "fused": "Fused map"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-root", default="models")
    parser.add_argument("--metrics-dir", default="metrics", help="headline metrics: <dir>/<method>-<model>.json, "
                        "and all metrics: <dir>/details/evaluate-<method>.json")
    parser.add_argument("--plots-dir", help="default: plots/evaluate-<method>")
    parser.add_argument("--calibration", help="default: models/calibration-<method>.json")
    parser.add_argument("--resamples", help="the bootstrap resamples `aead compare` pairs runs with; default: "
                        "metrics/resamples/evaluate-<method>.npz")
    args = parser.parse_args()
    params = load_params(args.params)
    plots_dir = Path(args.plots_dir or f"plots/evaluate-{args.method}")
    per_type = params.evaluate.heatmaps_per_type if args.method != "l1" else 0
    calibration_path = args.calibration or f"models/calibration-{args.method}.json"
    metrics_dir = Path(args.metrics_dir)
    details_path = metrics_dir / "details" / f"evaluate-{args.method}.json"
    resamples_path = Path(args.resamples or metrics_dir / "resamples" / f"evaluate-{args.method}.npz")
    models = models_of(args.method, params.evaluate)
    record = not_trained_record(params, args.method)
    if record is not None:
        log(f"[{args.method}] {record['note']}; writing empty results")
        for name, columns in CSV_COLUMNS.items():
            io.write_csv(plots_dir / name, [], columns)
        note_figure(plots_dir / "comparison.png", record["note"])
        if per_type:
            write_heatmaps(plots_dir / "heatmaps", {}, {}, params.evaluate.image_score, TITLES[args.method], log=log)
        io.write_json(calibration_path, {**calibration_record(params, args.method, {}), "note": record["note"]})
        for model in models:
            io.write_json(metrics_dir / headline_name(args.method, model), headline(None))
        io.write_npz(resamples_path, {})
        io.write_json(details_path, record)
        return
    ev = evaluate(params, args.method, Path(args.models_root), log=log,
                  heatmap_indices=heatmap_picker(per_type) if per_type else None)
    for name, columns in CSV_COLUMNS.items():
        io.write_csv(plots_dir / name, getattr(ev, CSV_ROWS[name]), columns)
    comparison_figure(plots_dir / "comparison.png", ev.metrics, ev.results, params.evaluate.image_score,
                      f"{TITLES[args.method]}, '{params.evaluate.image_score}' image score")
    if per_type:
        write_heatmaps(plots_dir / "heatmaps", ev.results, ev.calibration, params.evaluate.image_score,
                       f"{args.method} map: {TITLES[args.method]}", log=log)
    io.write_json(calibration_path, calibration_record(params, args.method, ev.calibration, ev.fusion))
    for model in models:
        io.write_json(metrics_dir / headline_name(args.method, model), headline(ev.metrics[model]))
    io.write_npz(resamples_path, ev.resamples)
    io.write_json(details_path, ev.metrics)


if __name__ == "__main__":
    run_stage(main)
