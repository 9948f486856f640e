"""Stage export: one self-contained detector per model and category (params: export.*, evaluate.*, data.*), in each
of export.formats: a torch.export program (`torch.export.load(path).module()` scores uint8 (N, H, W, 3) images with
torch alone) and an ONNX model (ONNX Runtime alone: `aead predict --runtime onnxruntime`)."""

import argparse
import time
from pathlib import Path

from aead import io
from aead.cli import log, run_stage
from aead.deploy.export import export_all
from aead.params import METHODS, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=METHODS, help="default: export.method from the params")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-root", default="models")
    parser.add_argument("--out", default="models/export")
    parser.add_argument("--metrics-dir", default="metrics")
    parser.add_argument("--plot", default="plots/export.csv")
    args = parser.parse_args()
    params = load_params(args.params)
    start = time.perf_counter()
    index = export_all(params, Path(args.models_root), Path(args.out), args.method or params.export.method)
    log(f"exported {len(index['files'])} detectors as {', '.join(index['formats'])} to {args.out}")
    sizes = [{"model_category": key, "format": fmt, "bytes": (Path(args.out) / name).stat().st_size}
             for key, files in index["files"].items() for fmt, name in files.items()]
    io.write_csv(args.plot, sizes, ["model_category", "format", "bytes"])
    io.write_metrics(args.metrics_dir, "export", None,
                     {"method": index["method"], "detectors": len(index["files"]), "files": len(sizes),
                      "total_bytes": sum(r["bytes"] for r in sizes), "export_seconds": round(time.perf_counter() - start, 2)})


if __name__ == "__main__":
    run_stage(main)
