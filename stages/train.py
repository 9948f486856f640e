"""Stages train-baseline and train-multiscale: train one autoencoder per category (params: model.*,
<model>.*, data.*)."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.params import MODEL_NAMES, load_params
from aead.training import train_and_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-dir", help="default: models/<model>")
    parser.add_argument("--metrics", help="default: metrics/train-<model>.json")
    parser.add_argument("--plot", help="default: plots/train-<model>.csv")
    args = parser.parse_args()
    metrics, rows = train_and_save(load_params(args.params), args.model,
                                   Path(args.models_dir or f"models/{args.model}"), log=log)
    io.write_json(args.metrics or f"metrics/train-{args.model}.json", metrics)
    io.write_csv(args.plot or f"plots/train-{args.model}.csv", rows,
                 ["model", "category", "epoch", "train_loss", "val_loss", "lr"])


if __name__ == "__main__":
    run_stage(main)
