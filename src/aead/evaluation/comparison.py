"""``aead compare``: two runs' headline metrics side by side, and their difference with a paired bootstrap interval.

A run is the workspace or any revision DVC resolves (a commit, a branch, a tag, a ``dvc exp`` name). Each
evaluation stage keeps, per model and category, its metrics on the same seeded bootstrap resamples of the test
images (``metrics/resamples/evaluate-<method>.npz``). Two runs on the same test images drew the same resamples,
so the difference of a metric is taken resample by resample: the interval of those differences is the paired
bootstrap interval, far narrower than the two runs' own intervals when both score the same images alike.
"""

from __future__ import annotations

import io as _io
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from aead.evaluation import uncertainty
from aead.errors import DataError
from aead.params import METHODS

WORKSPACE = "workspace"
# the headline metrics, in the order printed: key in the details, label, where its interval is
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
           ("false_alarm_rate", "false-alarm rate"), ("recall", "recall"))
RATES = ("false_alarm_rate", "recall")


@dataclass
class Run:
    """One run's evaluation results: per method, the details JSON and the bootstrap resamples."""

    name: str
    label: str
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    resamples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def read_run(repo: str, rev: str, metrics_dir: str = "metrics") -> Run:
    """The evaluation results of ``rev`` (``'workspace'``: the files as they are) in the DVC repository ``repo``;
    outputs DVC caches are read from its cache."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev

    if rev == WORKSPACE:
        sha, label = None, WORKSPACE
    else:
        with Repo(repo) as dvc_repo:
            try:
                sha = resolve_rev(dvc_repo.scm, rev)
            except RevError as exc:
                raise DataError(f"{rev}: not a commit, branch, tag or experiment of {repo} ({exc})") from None
        label = f"{rev} ({sha[:7]})"
    fs = DVCFileSystem(repo, rev=sha)
    run = Run(rev, label)
    root = PurePosixPath(metrics_dir)
    for method in METHODS:
        details_path = str(root / "details" / f"evaluate-{method}.json")
        if not fs.exists(details_path):
            continue
        details = json.loads(fs.read_text(details_path))
        if "note" in details:  # the map is not computed with these params
            continue
        resamples_path = str(root / "resamples" / f"evaluate-{method}.npz")
        try:
            with fs.open(resamples_path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, DvcException) as exc:
            raise DataError(f"{resamples_path} of {label}: cannot read it ({exc}); an evaluation from before "
                            "`aead compare` existed has none (rerun it), and another machine's run needs "
                            "`dvc pull` or `dvc exp pull` first") from None
        with np.load(_io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        run.details[method] = details
        run.resamples[method] = arrays
    if not run.details:
        raise DataError(f"{label}: no evaluation results under {metrics_dir}/details/")
    return run


def _split(arrays: dict[str, np.ndarray], model: str) -> dict[str, dict[str, np.ndarray]]:
    """``<model>/<category>/<name>`` arrays grouped by category."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        m, category, name = key.split("/", 2)
        if m == model:
            out.setdefault(category, {})[name] = value
    return out


def check_paired(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]], where: str) -> None:
    """Both runs scored the same test images with the same resamples, or a DataError says what differs."""
    if sorted(a) != sorted(b):
        raise DataError(f"{where}: the runs evaluated different categories ({', '.join(sorted(a))} against "
                        f"{', '.join(sorted(b))}); a paired comparison needs the same test images")
    for category in a:
        x, y = a[category], b[category]
        if not (np.array_equal(x["paths"], y["paths"]) and np.array_equal(x["labels"], y["labels"])):
            raise DataError(f"{where}/{category}: the runs scored different test images; a paired comparison "
                            "needs the same ones (same data.* params and data)")
        sizes = {v.shape[0] for k, v in {**x, **y}.items() if k not in ("paths", "labels")}
        if len(sizes) > 1:
            raise DataError(f"{where}/{category}: the runs drew different numbers of bootstrap resamples "
                            "(evaluate.bootstrap_resamples); a paired comparison needs the same")


def resampled_headline(per_category: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each headline metric on every resample, as the evaluation reports it: AUROCs and AUPRO as the mean over
    categories (NaN in a resample where a category that has the metric is NaN), false-alarm rate and recall over
    all categories' test images together."""
    out: dict[str, np.ndarray] = {}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        rows = [np.asarray(c[key], dtype=np.float64) for c in per_category.values()
                if key in c and np.isfinite(c[key]).any()]
        if rows:
            out[key] = np.mean(rows, axis=0)
    if per_category and all("false_alarms" in c for c in per_category.values()):
        good = sum(int((c["labels"] == 0).sum()) for c in per_category.values())
        bad = sum(int((c["labels"] == 1).sum()) for c in per_category.values())
        if good:
            out["false_alarm_rate"] = sum(c["false_alarms"] for c in per_category.values()) / good
        if bad:
            out["recall"] = sum(c["detections"] for c in per_category.values()) / bad
    return out


@dataclass
class Row:
    """One metric of one map in both runs: values, their own intervals, the difference and its paired interval."""

    metric: str
    a: float | None
    a_ci: list[float] | None
    b: float | None
    b_ci: list[float] | None
    diff_ci: tuple[float, float] | None

    @property
    def diff(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def significant(self) -> bool:
        """The paired interval excludes zero."""
        return self.diff_ci is not None and (self.diff_ci[0] > 0 or self.diff_ci[1] < 0)


def _value(summary: dict[str, Any], key: str) -> tuple[float | None, list[float] | None]:
    if key in RATES:
        op = summary.get("operating_point") or {}
        return op.get(key), op.get(f"{key}_ci")
    return summary.get(key), summary.get(f"{key}_ci")


def compare_runs(a: Run, b: Run, confidence: float = 0.95, methods: tuple[str, ...] = METHODS
                 ) -> dict[str, list[Row]]:
    """Per map (``<method> / <model>``) of ``methods`` computed in both runs, a :class:`Row` per headline metric."""
    out: dict[str, list[Row]] = {}
    for method in methods:
        if method not in a.details or method not in b.details:
            continue
        for model, summary_a in a.details[method].items():
            summary_b = b.details[method].get(model)
            if not isinstance(summary_a, dict) or not isinstance(summary_b, dict):
                continue
            where = f"{method}/{model}"
            cats_a, cats_b = _split(a.resamples[method], model), _split(b.resamples[method], model)
            check_paired(cats_a, cats_b, where)
            ra, rb = resampled_headline(cats_a), resampled_headline(cats_b)
            rows = []
            for key, label in METRICS:
                (va, ca), (vb, cb) = _value(summary_a, key), _value(summary_b, key)
                diff_ci = None
                if va is not None and vb is not None and key in ra and key in rb:
                    diff_ci = uncertainty.interval(rb[key] - ra[key], confidence)
                rows.append(Row(label, va, ca, vb, cb, diff_ci))
            out[f"{method} / {model}"] = rows
    if not out:
        raise DataError(f"{a.label} and {b.label} have no anomaly map of {', '.join(methods)} evaluated in both")
    return out


def _with_interval(value: float | None, ci: Any, signed: bool = False) -> str:
    """``value [low, high]``: 3 decimals, differences signed with 4 (a significant one never reads +0.000)."""
    if value is None:
        return "n/a"
    fmt = "{:+.4f}" if signed else "{:.3f}"
    text = fmt.format(value)
    if ci is None:
        return text
    return f"{text} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def format_comparison(a: Run, b: Run, table: dict[str, list[Row]], confidence: float, resamples: int) -> str:
    """The comparison as plain text, within 120 columns."""
    level = f"{confidence:.0%}"
    lines = [f"A: {a.label}", f"B: {b.label}",
             f"B - A with its {level} paired bootstrap interval ({resamples} resamples of the same test images); "
             "* the interval excludes 0", ""]
    head = f"  {'metric':<18}{'A':<24}{'B':<24}B - A"
    for name, rows in table.items():
        lines += [name, head]
        for r in rows:
            mark = " *" if r.significant else ""
            lines.append(f"  {r.metric:<18}{_with_interval(r.a, r.a_ci):<24}{_with_interval(r.b, r.b_ci):<24}"
                         f"{_with_interval(r.diff, r.diff_ci, signed=True)}{mark}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def resample_count(run: Run) -> int:
    """How many bootstrap resamples the run's evaluations drew (0 when none)."""
    for arrays in run.resamples.values():
        for key, value in arrays.items():
            if not key.endswith(("/paths", "/labels")):
                return int(value.shape[0])
    return 0


def compare(repo: str, rev_a: str, rev_b: str, confidence: float, metrics_dir: str = "metrics",
            methods: tuple[str, ...] = METHODS) -> str:
    """``aead compare``'s output for two revisions of ``repo`` (the maps of ``methods``)."""
    a, b = read_run(repo, rev_a, metrics_dir), read_run(repo, rev_b, metrics_dir)
    if resample_count(a) == 0 or resample_count(b) == 0:
        raise DataError("a paired comparison needs bootstrap resamples: evaluate.bootstrap_resamples is 0 in "
                        f"{a.label if resample_count(a) == 0 else b.label}")
    return format_comparison(a, b, compare_runs(a, b, confidence, methods), confidence, resample_count(a))
