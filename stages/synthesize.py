"""Stage synthesize: generate the embedded synthetic MVTec-layout data set (params: synthetic.*)."""

import argparse
import time

from aead import io
from aead.cli import log, run_stage
from aead.params import load_params
from aead.data.synthetic import generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", default="plots/synthesize-counts.csv")
    args = parser.parse_args()
    p = load_params(args.params).synthetic
    start = time.perf_counter()
    counts = generate_dataset(p.root, p.categories, p.image_size, p.n_train, p.n_test_good, p.n_test_defect, p.seed,
                              progress=log)
    images = sum(v for per in counts.values() for v in per.values())
    io.write_metrics(args.metrics_dir, "synthesize", None,
                     {"image_size": p.image_size, "images": images, "categories": counts,
                      "generate_seconds": round(time.perf_counter() - start, 2)})
    rows = [{"category": c, "folder": k, "count": v} for c, per in counts.items() for k, v in per.items()]
    io.write_csv(args.plot, rows, ["category", "folder", "count"])


if __name__ == "__main__":
    run_stage(main)
