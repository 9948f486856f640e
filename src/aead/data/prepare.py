"""The prepare-split stage: scan the MVTec-layout root, split train/val, cache resized arrays (written through
memory maps, so a data set larger than memory can be prepared)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aead import io
from aead.data.mvtec import Sample, load_split, scan_category, split_train_val, write_manifest
from aead.errors import DataError
from aead.params import DataParams


def prepare_split(data: DataParams, log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write train/val/test manifests and arrays into ``data.prepared_dir`` (replaced whole, atomically).

    Validation images come only from ``train/good``; the test split is exactly ``test/``.
    Returns the metrics (counts per category and split) and the rows of the counts plot.
    """
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist (expected an MVTec AD-layout data set)")
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    counts: dict[str, dict[str, int]] = {}
    for category in data.categories:
        train_all, test = scan_category(root, category)
        train, val = split_train_val(train_all, data.val_fraction, data.seed)
        splits["train"] += train
        splits["val"] += val
        splits["test"] += test
        anomalous = [s for s in test if s.label == 1]
        counts[category] = {
            "train": len(train),
            "val": len(val),
            "test_good": len(test) - len(anomalous),
            "test_anomalous": len(anomalous),
            "test_with_mask": sum(s.mask_path is not None for s in anomalous),
            "defect_types": len({s.defect_type for s in anomalous}),
        }
        log(f"{category}: {counts[category]}")
    out = Path(data.prepared_dir)
    with io.atomic_dir(out) as tmp:
        for name, samples in splits.items():
            log(f"decoding {len(samples)} {name} images at {data.image_size} px")
            load_split(samples, data.image_size, with_masks=(name == "test"), folder=tmp, name=name)
            write_manifest(tmp, name, samples)
    totals = {k: sum(c[k] for c in counts.values()) for k in ("train", "val", "test_good", "test_anomalous", "test_with_mask")}
    metrics = {"image_size": data.image_size, "total": totals, "categories": counts}
    rows = [
        {"category": cat, "split": split, "count": c[split]}
        for cat, c in counts.items()
        for split in ("train", "val", "test_good", "test_anomalous", "test_with_mask")
    ]
    return metrics, rows
