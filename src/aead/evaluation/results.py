"""Results tables: the README's table from the metrics a run wrote (``aead results``), and the spread of every
headline metric over training seeds run as DVC experiments (``aead seeds``)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from aead.errors import AeadError, DataError
from aead.params import METHODS, PRETRAINED, models_of, parse_params

HEADLINE = ("image_auroc", "pixel_auroc", "aupro")  # in the evaluation stages' details, with intervals
OPERATING_POINT = ("false_alarm_rate", "recall")  # in the details' pooled operating point, with intervals
SEED_METRICS = ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "recall")  # in their headline files
SEED_KEYS = ("model.seed", "pretrained.seed")  # what `aead seeds` varies, together


def read_details(metrics_dir: Path, method: str) -> dict[str, Any]:
    """The detailed metrics an evaluation stage wrote (``<metrics_dir>/details/evaluate-<method>.json``)."""
    path = Path(metrics_dir) / "details" / f"evaluate-{method}.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the evaluation stages first (dvc repro)")
    return json.loads(path.read_text())


def results_frame(metrics_dir: Path, methods: Sequence[str] = METHODS) -> pd.DataFrame:
    """One row per map and model: each headline metric and its interval (mean over categories), and the operating
    point's false-alarm rate and recall with their intervals (all categories' test images together)."""
    rows = []
    for method in methods:
        details = read_details(metrics_dir, method)
        for model, summary in details.items():
            if not isinstance(summary, dict):
                continue
            row: dict[str, Any] = {"map": method, "model": model}
            for key in HEADLINE:
                row[key] = summary.get(key)
                ci = summary.get(f"{key}_ci") or [None, None]
                row[f"{key}_low"], row[f"{key}_high"] = ci
            op = summary.get("operating_point") or {}
            for key in OPERATING_POINT:
                row[key] = op.get(key)
                row[f"{key}_low"], row[f"{key}_high"] = op.get(f"{key}_ci") or [None, None]
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: Any, low: Any = None, high: Any = None) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    if low is None or pd.isna(low):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def markdown(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    """A Markdown table of ``frame``'s ``columns`` (name -> header), cells already formatted as text."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)


def results_markdown(metrics_dir: Path, confidence: float) -> str:
    """The results table of the run whose metrics are in ``metrics_dir``, as Markdown."""
    frame = results_frame(metrics_dir)
    text = pd.DataFrame({"map": frame["map"], "model": frame["model"]})
    for key in HEADLINE + OPERATING_POINT:
        text[key] = [_cell(v, lo, hi) for v, lo, hi in zip(frame[key], frame[f"{key}_low"], frame[f"{key}_high"])]
    level = f"{confidence:.0%}"
    return markdown(text, {"map": "map", "model": "model", "image_auroc": f"image AUROC [{level} CI]",
                           "pixel_auroc": f"pixel AUROC [{level} CI]", "aupro": f"AUPRO [{level} CI]",
                           "false_alarm_rate": f"good flagged [{level} CI]",
                           "recall": f"defects caught [{level} CI]"})


def _nodes(tree: Any) -> Iterator[dict[str, Any]]:
    """Every experiment record in ``dvc exp show --json`` output (the workspace, commits and experiments)."""
    if isinstance(tree, dict):
        if "params" in tree and "metrics" in tree:
            yield tree
        for value in tree.values():
            yield from _nodes(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _nodes(value)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def experiment_records(shown: Any) -> list[dict[str, Any]]:
    """(name, flat params, flat headline metrics by file) of each record of ``dvc exp show --json`` output."""
    records = []
    for node in _nodes(shown):
        raw = node["params"].get("params.yaml", {}).get("data", {})
        metrics = {path: entry.get("data", {}) for path, entry in node["metrics"].items() if isinstance(entry, dict)}
        records.append({"name": node.get("name") or node.get("rev"), "raw": raw, "params": _flatten(raw),
                        "metrics": metrics})
    return records


def seed_summary(shown: Any) -> pd.DataFrame:
    """Mean, standard deviation and count of each headline evaluation metric over the runs that differ from the
    workspace's params in the seeds alone (the workspace's own run included)."""
    records = experiment_records(shown)
    base = next((r for r in records if r["name"] == "workspace"), None)
    if base is None:
        raise DataError("dvc exp show --json: no workspace record")
    fixed = {k: v for k, v in base["params"].items() if k not in SEED_KEYS}
    runs, seen = [], set()
    for record in records:
        same = {k: v for k, v in record["params"].items() if k not in SEED_KEYS} == fixed
        seed = tuple(record["params"].get(k) for k in SEED_KEYS)
        if same and seed not in seen and record["metrics"]:
            seen.add(seed)
            runs.append(record)
    rows = []
    for method in METHODS:
        for model in models_of(method, parse_params(base["raw"]).evaluate):
            name = f"metrics/{method}.json" if model == PRETRAINED else f"metrics/{method}-{model}.json"
            for key in SEED_METRICS:
                values = [r["metrics"].get(name, {}).get(key) for r in runs]
                values = [v for v in values if v is not None]
                if values:
                    s = pd.Series(values, dtype=float)
                    rows.append({"map": method, "model": model, "metric": key, "mean": s.mean(),
                                 "std": s.std(ddof=1) if len(s) > 1 else float("nan"), "runs": len(s)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise DataError("dvc exp show --json: no runs with evaluation metrics; run `aead seeds run` first")
    return frame


def seeds_markdown(frame: pd.DataFrame) -> str:
    """The seed summary as a Markdown table, one row per map and model, ``mean ± std (runs)`` per metric."""
    table = frame.pivot_table(index=["map", "model"], columns="metric", values=["mean", "std", "runs"], sort=False)
    rows = []
    for (method, model), row in table.iterrows():
        cells = {"map": method, "model": model}
        for key in SEED_METRICS:
            if ("mean", key) in row and not pd.isna(row[("mean", key)]):
                std = row[("std", key)]
                cells[key] = (f"{row[('mean', key)]:.3f} ± {std:.3f} (n={int(row[('runs', key)])})"
                              if not pd.isna(std) else f"{row[('mean', key)]:.3f} (n=1)")
            else:
                cells[key] = "n/a"
        rows.append(cells)
    return markdown(pd.DataFrame(rows), {"map": "map", "model": "model", "image_auroc": "image AUROC",
                                          "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
                                          "false_alarm_rate": "good flagged", "recall": "defects caught"})


def run_seed_experiments(seeds: Sequence[int], queue: bool = False) -> None:
    """``dvc exp run`` of the workspace's params with each seed (``model.seed`` and ``pretrained.seed`` set to it),
    one after the other, each in a temporary copy (``--temp``: the workspace keeps its params and outputs, and a failed
    run leaves it untouched), or queued (run them with ``dvc queue start``)."""
    for seed in seeds:
        cmd = ["dvc", "exp", "run", "-n", f"seed-{seed}", "--queue" if queue else "--temp",
               *sum((["-S", f"{k}={seed}"] for k in SEED_KEYS), [])]
        if subprocess.run(cmd).returncode != 0:
            raise AeadError(f"{' '.join(cmd)} failed (its output is above); the workspace is unchanged")


def exp_show() -> Any:
    """``dvc exp show --json`` of the repository in the working directory."""
    proc = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"dvc exp show --json failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)
