"""Stage build-pretrained-bank: PatchCore on a frozen ImageNet backbone, the memory bank of each category's
training images at its own image shape, and SimpleNet's feature discriminator trained on the same patch features
(params: pretrained.*, data.categories, data.prepared_dir, model.device, model.num_threads, model.deterministic). The
backbone is not trained. Runs as one process, or under ``torchrun`` (``pretrained.launcher``), where each process
streams a share of the training images and only the main process writes the outputs."""

import argparse
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.models.memory_bank import build_pretrained_banks_and_save
from aead.params import load_params
from aead.training.distributed import barrier, init_distributed, shutdown
from aead.training.loops import select_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="models/pretrained")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", default="plots/build-pretrained-bank.csv")
    args = parser.parse_args()
    params = load_params(args.params)
    ctx = init_distributed(select_device(params.model.device))
    try:
        metrics = build_pretrained_banks_and_save(params, Path(args.out), log=log, ctx=ctx)
        if ctx.is_main:
            io.write_metrics(args.metrics_dir, "pretrained-bank", {"bank_size": metrics["bank_size"]}, metrics)
            rows = [{"category": c, "height": m["shape"][0], "width": m["shape"][1], "discriminator_seconds": "",
                     "discriminator_final_loss": "", **{k: v for k, v in m.items() if k != "shape"}}
                    for c, m in metrics["categories"].items()]
            io.write_csv(args.plot, rows, ["category", "height", "width", "images", "patches", "bank_size",
                                           "build_seconds", "build_images_per_second", "discriminator_seconds",
                                           "discriminator_final_loss"])
        barrier(ctx)
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    run_stage(main)
