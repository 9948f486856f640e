"""Stage prepare-split: manifests and cached arrays for train / val / test (params: data.*). Its metrics are the
images in each split, so that `dvc metrics diff` shows when a data change changed the split; per category they are in
metrics/details/prepare-split.json and plots/split-counts.csv."""

import argparse
import time

from aead import io
from aead.cli import log, run_stage
from aead.params import load_params
from aead.data.prepare import prepare_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", default="plots/split-counts.csv")
    args = parser.parse_args()
    start = time.perf_counter()
    metrics, rows = prepare_split(load_params(args.params).data, log=log)
    metrics["prepare_seconds"] = round(time.perf_counter() - start, 2)
    counts = {k: metrics["total"][k] for k in ("train", "val", "test_good", "test_anomalous")}
    io.write_metrics(args.metrics_dir, "prepare-split", counts, metrics)
    io.write_csv(args.plot, rows, ["category", "split", "count"])


if __name__ == "__main__":
    run_stage(main)
