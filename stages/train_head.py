"""Stages train-head@baseline and train-head@multiscale: a DRAEM-style segmentation head on each trained
autoencoder of the model, learning to segment synthetic defects from image + reconstruction (params:
segmentation.*, model.seed, model.device, model.precision, model.num_threads, model.flip_rotate, model.grad_clip)."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.params import MODEL_NAMES, load_params
from aead.training.loops import train_heads_and_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-root", default="models", help="folder with the autoencoders in <model>/")
    parser.add_argument("--out", help="default: <models-root>/heads/<model>")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", help="default: plots/train-head-<model>.csv")
    args = parser.parse_args()
    params = load_params(args.params)
    root = Path(args.models_root)
    metrics, rows = train_heads_and_save(params, args.model, root, Path(args.out or root / "heads" / args.model),
                                         log=log)
    final = metrics.get("final_loss")
    io.write_metrics(args.metrics_dir, f"head-{args.model}", {"loss": None if final is None else round(final, 5)},
                     metrics)
    io.write_csv(args.plot or f"plots/train-head-{args.model}.csv", rows,
                 ["model", "category", "step", "focal_loss", "lr"])


if __name__ == "__main__":
    run_stage(main)
