"""Stages build-bank@baseline and build-bank@multiscale: the PatchCore-style memory bank of each trained
autoencoder's encoder over the training images (params: memory_bank.*, model.seed, model.device,
model.num_threads)."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.models.memory_bank import build_banks_and_save
from aead.params import MODEL_NAMES, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-root", default="models", help="folder with the autoencoders in <model>/")
    parser.add_argument("--out", help="default: <models-root>/banks/<model>")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", help="default: plots/build-bank-<model>.csv")
    args = parser.parse_args()
    params = load_params(args.params)
    root = Path(args.models_root)
    metrics = build_banks_and_save(params, args.model, root, Path(args.out or root / "banks" / args.model), log=log)
    io.write_metrics(args.metrics_dir, f"bank-{args.model}", {"bank_size": metrics.get("bank_size")}, metrics)
    rows = [{"model": args.model, "category": c, **m} for c, m in metrics.get("categories", {}).items()]
    io.write_csv(args.plot or f"plots/build-bank-{args.model}.csv", rows,
                 ["model", "category", "images", "patches", "bank_size", "build_seconds", "build_images_per_second"])


if __name__ == "__main__":
    run_stage(main)
