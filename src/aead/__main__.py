"""Command line: ``aead predict`` scores new images with a model trained by the pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aead.cli import log, run_stage
from aead.params import METHODS, MODEL_NAMES, load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aead", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="score images or folders of images with a trained model",
                       description="Writes <out>/predictions.csv (path, category, normalised score, verdict, raw "
                                   "score, files, error) and per image a heatmap overlay and a defect mask PNG at "
                                   "the image's size. Exit code 0: all images scored; 2: some could not be read "
                                   "(listed in the CSV); 1: bad arguments, params or model.")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--model", choices=MODEL_NAMES, default="baseline")
    p.add_argument("--category", required=True, help="which category's model to use")
    p.add_argument("--method", choices=METHODS,
                   help="anomaly map (default: export.method from the params, as in the exported detectors)")
    p.add_argument("--params", default="params.yaml", help="the params the model was trained and evaluated with")
    p.add_argument("--models-root", default="models", help="folder with <model>/ checkpoints and calibration files")
    p.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    failed: list[int] = []

    def run() -> None:
        from aead.predict import predict

        params = load_params(args.params)
        results = predict(args.inputs, args.model, args.category, args.method or params.export.method, params,
                          Path(args.models_root), Path(args.out), log=log)
        bad = [r for r in results if r.error]
        for r in bad:
            print(f"error: {r.error}", file=sys.stderr)
        log(f"{len(results) - len(bad)} scored, {len(bad)} failed; see {Path(args.out) / 'predictions.csv'}")
        failed.append(len(bad))

    run_stage(run)
    if failed and failed[0]:
        sys.exit(2)


if __name__ == "__main__":
    main()
