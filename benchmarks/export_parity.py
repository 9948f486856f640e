"""How far the exported detectors' scores are from the pipeline's (``aead predict``) on the test images of the
data set in params.yaml, after ``dvc repro``.

The exported graph computes in fp32; ``aead predict`` and the evaluation stages compute in the precision
``model.precision`` picks (fp32 on CPUs with ``model.deterministic``, bf16 autocast on GPUs). In fp32 on both sides
the differences are float rounding.

    python benchmarks/export_parity.py                  # as the pipeline runs (model.precision)
    python benchmarks/export_parity.py --precision fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from aead.data.mvtec import read_image, scan_category
from aead.params import METHODS, load_params, models_of
from aead.deploy.predict import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--models-root", type=Path, default=Path("models"))
    parser.add_argument("--method", choices=METHODS,
                        help="the method that was exported (default: export.method)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="default: model.precision")
    args = parser.parse_args()
    params = load_params(args.params)
    method = args.method or params.export.method
    if args.precision:
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, precision=args.precision))
    print(f"exported (fp32) vs aead predict (model.precision={params.model.precision}), normalised scores:")
    for model in models_of(method, params.evaluate):
        for category in params.data.categories:
            _, test = scan_category(Path(params.data.root), category)
            paths = [Path(s.path) for s in test]
            detector = torch.export.load(str(args.models_root / "export" / f"{model}-{category}.pt2")).module()
            with torch.no_grad():
                exported = np.array([float(detector(torch.from_numpy(read_image(p).copy()))[0]) for p in paths])
            with tempfile.TemporaryDirectory() as out:  # predict also writes heatmaps and masks
                rows = predict(paths, model, category, method, params, args.models_root, Path(out),
                               log=lambda m: None)
            ours = np.array([r.score for r in rows])
            diff = np.abs(ours - exported)
            flips = int(((ours > 0.5) != (exported > 0.5)).sum())
            print(f"  {model:10s} {category:10s} {len(paths):4d} images: max |diff| {diff.max():.4f}, "
                  f"median {np.median(diff):.4f}, verdicts that differ: {flips}")


if __name__ == "__main__":
    main()
