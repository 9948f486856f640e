"""Command line: ``aead predict`` scores new images with a model trained by the pipeline; ``aead results`` prints the
results table of the last run; ``aead compare`` puts two runs side by side with paired intervals; ``aead seeds`` runs
the pipeline over training seeds and summarises the spread."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aead.cli import log, run_stage
from aead.errors import ParamsError
from aead.params import METHODS, MODEL_NAMES, PRETRAINED, load_params, models_of

if TYPE_CHECKING:
    from aead.deploy.outputs import Prediction

# aead predict's exit code when some images could not be read and the others were scored: neither 1 (an error,
# nothing scored) nor 2 (argparse's code for a bad command line, nothing run)
PARTIAL_FAILURE = 3
RUNTIMES = ("torch", "onnxruntime")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aead", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="score images or folders of images with a trained model",
                       description="Writes <out>/predictions.csv (path, relative path, category, normalised score, "
                                   "verdict, raw score, files, error) and per image a heatmap overlay and a defect "
                                   "mask PNG at the image's size, as <out>/<relative path>_heatmap.png and _mask.png. Exit code 0: all "
                                   "images scored; 3: some could not be read (listed in the CSV, the others "
                                   "scored); 1: bad params, model or input path, nothing scored; 2: bad command "
                                   "line, nothing run.")
    p.add_argument("inputs", nargs="+", help="image files, or folders searched recursively for images (outputs keep "
                                             "each image's path relative to its folder)")
    p.add_argument("--model", choices=(*MODEL_NAMES, PRETRAINED),
                   help="whose map: an autoencoder's (default baseline), or 'pretrained' for --method pretrained")
    p.add_argument("--category", required=True, help="which category's model to use")
    p.add_argument("--method", choices=METHODS,
                   help="anomaly map (default: that of the exported detectors, models/export/index.json; with "
                        "--params, its export.method)")
    p.add_argument("--params", help="params to score with, which must be those the models were evaluated with "
                                    "(default: the ones recorded with them in <models-root>/calibration-<method>.json, "
                                    "so that an edited params.yaml or a failed experiment does not change predictions)")
    p.add_argument("--models-root", default="models", help="folder with <model>/ checkpoints and calibration files, "
                                                           "and the exported detectors in export/")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch (default): the trained models in PyTorch, any --method; onnxruntime: the exported ONNX "
                        "models (<models-root>/export) in ONNX Runtime, without importing PyTorch")
    p.add_argument("--out", required=True, help="output folder")
    r = sub.add_parser("results", help="the results table of the last run (Markdown), from metrics/",
                       description="One row per anomaly map and model: image AUROC, pixel AUROC and AUPRO with their "
                                   "bootstrap confidence intervals (mean over categories), and the F1 of the "
                                   "calibrated threshold. The README's results table is this command's output.")
    r.add_argument("--metrics-dir", default="metrics")
    r.add_argument("--params", default="params.yaml")
    c = sub.add_parser("compare", help="two runs' headline metrics and their differences, with paired intervals",
                       description="Per anomaly map evaluated in both runs: image AUROC, pixel AUROC, AUPRO, and the "
                                   "false-alarm rate and recall at the calibrated threshold, each with its interval, "
                                   "and B - A with a paired bootstrap interval over the same test images (the "
                                   "evaluation's own resamples); '*' marks a difference whose interval excludes 0. "
                                   "A run is 'workspace' or any revision DVC knows: a commit, branch, tag or "
                                   "`dvc exp` name.")
    c.add_argument("a", metavar="A", help="the reference run, e.g. HEAD, main or workspace")
    c.add_argument("b", metavar="B", nargs="?", default="workspace",
                   help="the run compared with it (default: workspace)")
    c.add_argument("--method", choices=METHODS, action="append",
                   help="only this anomaly map (repeat for several; default: every map evaluated in both runs)")
    c.add_argument("--repo", default=".", help="the DVC repository (default: the current folder)")
    c.add_argument("--metrics-dir", default="metrics")
    c.add_argument("--params", default="params.yaml", help="evaluate.confidence sets the intervals' level")
    s_ = sub.add_parser("seeds", help="run the pipeline with other training seeds as DVC experiments, and summarise",
                        description="'run' runs `dvc exp run --temp -S model.seed=N -S pretrained.seed=N` for each "
                                    "seed, one after the other (or queues them: --queue); 'summary' reads `dvc exp show --json` and prints mean ± standard deviation "
                                    "of every headline metric over the runs that differ from the workspace only in "
                                    "those seeds (the workspace's own run included).")
    s_.add_argument("action", choices=("run", "summary"))
    s_.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds to run (default: 1 2)")
    s_.add_argument("--queue", action="store_true", help="queue the experiments (start them with dvc queue start)")
    args = parser.parse_args(argv)
    if args.command == "results":
        run_stage(lambda: print(_results(args.metrics_dir, args.params)))
        return
    if args.command == "compare":
        run_stage(lambda: print(_compare(args), end=""))
        return
    if args.command == "seeds":
        run_stage(lambda: _seeds(args.action, args.seeds, args.queue))
        return
    failed: list[int] = []

    def run() -> None:
        results = _predict_onnx(args) if args.runtime == "onnxruntime" else _predict_torch(args)
        bad = [r for r in results if r.error]
        for r in bad:
            print(f"error: {r.error}", file=sys.stderr)
        log(f"{len(results) - len(bad)} scored, {len(bad)} failed; see {Path(args.out) / 'predictions.csv'}")
        failed.append(len(bad))

    run_stage(run)
    if failed and failed[0]:
        sys.exit(PARTIAL_FAILURE)


def _predict_onnx(args: argparse.Namespace) -> list[Prediction]:
    from aead.deploy.runtime import predict_onnx

    if args.params:
        raise ParamsError("--params: the ONNX models carry their params; it applies to --runtime torch only")
    return predict_onnx(args.inputs, args.category, Path(args.models_root) / "export", Path(args.out), args.model,
                        args.method, log=log)


def _predict_torch(args: argparse.Namespace) -> list[Prediction]:
    from aead.deploy.predict import exported_method, predict, recorded_params

    models_root = Path(args.models_root)
    if args.params:
        params = load_params(args.params)
        method = args.method or params.export.method
    else:
        method = args.method or exported_method(models_root)
        params = recorded_params(models_root, method)
    valid = models_of(method, params.evaluate)
    model = args.model or valid[0]
    if model not in valid:
        raise ParamsError(f"--model {model}: method '{method}' is computed for {', '.join(valid)}")
    return predict(args.inputs, model, args.category, method, params, models_root, Path(args.out), log=log)


def _results(metrics_dir: str, params_path: str) -> str:
    from aead.evaluation.results import results_markdown

    return results_markdown(Path(metrics_dir), load_params(params_path).evaluate.confidence)


def _compare(args: argparse.Namespace) -> str:
    from aead.evaluation.comparison import compare

    confidence = load_params(args.params).evaluate.confidence
    return compare(args.repo, args.a, args.b, confidence, args.metrics_dir, tuple(args.method or METHODS))


def _seeds(action: str, seeds: list[int], queue: bool) -> None:
    from aead.evaluation.results import exp_show, run_seed_experiments, seed_summary, seeds_markdown

    if action == "run":
        run_seed_experiments(seeds, queue)
    else:
        print(seeds_markdown(seed_summary(exp_show())))


if __name__ == "__main__":
    main()
