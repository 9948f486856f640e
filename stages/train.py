"""Stages train-baseline and train-multiscale: train one autoencoder per category (params: model.*, <model>.*,
data.image_size, data.categories, data.prepared_dir). Runs as one process, or data-parallel under ``torchrun``
(``model.launcher``), where only the main process writes the outputs."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.training.distributed import barrier, init_distributed, shutdown
from aead.params import MODEL_NAMES, load_params
from aead.training.loops import clear_resume, select_device, train_and_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-dir", help="default: models/<model>")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", help="default: plots/train-<model>.csv")
    parser.add_argument("--resume-dir", help="per-epoch training state of an unfinished run (default: "
                        "models/.resume-<model>); removed when the stage completes")
    args = parser.parse_args()
    params = load_params(args.params)
    ctx = init_distributed(select_device(params.model.device))
    try:
        resume_dir = Path(args.resume_dir or f"models/.resume-{args.model}")
        metrics, rows = train_and_save(params, args.model, Path(args.models_dir or f"models/{args.model}"),
                                       log=log, resume_dir=resume_dir, dist_ctx=ctx)
        if ctx.is_main:
            io.write_metrics(args.metrics_dir, f"train-{args.model}", {"loss": round(metrics["best_val_loss"], 5)},
                             metrics)
            io.write_csv(args.plot or f"plots/train-{args.model}.csv", rows,
                         ["model", "category", "epoch", "train_loss", "val_loss", "lr"])
            clear_resume(resume_dir)
        barrier(ctx)
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    run_stage(main)
