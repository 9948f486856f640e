"""aead compare: paired bootstrap differences between two runs' evaluations (the e2e test runs the command itself
on real DVC experiments)."""

from __future__ import annotations

import numpy as np
import pytest

from aead.evaluation import metrics, uncertainty
from aead.evaluation.comparison import Run, check_paired, compare_runs, format_comparison, resampled_headline
from aead.data.mvtec import Sample
from aead.errors import DataError
from aead.evaluation.evaluate import CategoryResult, bootstrap, resample_record

RESAMPLES = 400


def category_result(category: str, scores: np.ndarray, labels: np.ndarray, rng: np.random.Generator
                    ) -> CategoryResult:
    """A category's test images: masks with a defect square on the defective ones, maps that are the image's score
    over the square plus noise."""
    n = labels.size
    masks = np.zeros((n, 8, 8), dtype=bool)
    masks[labels == 1, 2:5, 2:5] = True
    maps = rng.normal(0.0, 0.3, size=(n, 8, 8)).astype(np.float32) + masks * scores[:, None, None]
    samples = [Sample(f"{category}/test/{'bad' if y else 'good'}/{i:03d}.png", category, "bad" if y else "good",
                      int(y)) for i, y in enumerate(labels)]
    return CategoryResult(samples, labels, {"max": scores}, maps, masks, np.ones(n, dtype=bool))


def make_run(name: str, results: dict[str, CategoryResult], threshold: float) -> Run:
    """A run as read back from disk: the summary the evaluation writes and its resample arrays."""
    arrays: dict[str, np.ndarray] = {}
    resampled = {}
    for category, result in results.items():
        resampled[category] = bootstrap(result, "max", category, RESAMPLES, threshold)
        arrays.update(resample_record("m", category, result, resampled[category]))
    labels = np.concatenate([r.labels for r in results.values()])
    scores = np.concatenate([r.scores["max"] for r in results.values()])
    summary = {
        key: float(np.mean([getattr(metrics, fn)(*args(r)) for r in results.values()]))
        for key, fn, args in (("image_auroc", "auroc", lambda r: (r.labels, r.scores["max"])),
                              ("pixel_auroc", "pixel_auroc", lambda r: (r.masks, r.maps)),
                              ("aupro", "aupro", lambda r: (r.masks, r.maps)))
    }
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        summary[f"{key}_ci"] = list(uncertainty.mean_interval([resampled[c][key] for c in results]))
    summary["operating_point"] = metrics.operating_point(labels, scores, threshold)
    return Run(name, name, {"pretrained": {"m": summary}}, {"pretrained": arrays})


@pytest.fixture(scope="module")
def runs() -> tuple[Run, Run, Run]:
    """A, the same run again, and B: A's scores with every defective image's score raised by 0.5 (a better map)."""
    rng = np.random.default_rng(0)
    a, b = {}, {}
    for category in ("bottle", "tile"):
        labels = np.r_[np.zeros(30, dtype=np.int64), np.ones(20, dtype=np.int64)]
        scores = rng.normal(0.0, 1.0, labels.size) + 1.0 * labels
        a[category] = category_result(category, scores, labels, np.random.default_rng(1))
        b[category] = category_result(category, scores + 0.5 * labels, labels, np.random.default_rng(1))
    return make_run("A", a, 1.0), make_run("A again", a, 1.0), make_run("B", b, 1.0)


def test_a_run_against_itself_differs_by_nothing(runs):
    a, again, _ = runs
    table = compare_runs(a, again)
    rows = table["pretrained / m"]
    assert [r.metric for r in rows] == ["image AUROC", "pixel AUROC", "AUPRO", "false-alarm rate", "recall"]
    for r in rows:
        assert r.diff == 0.0 and r.diff_ci == (0.0, 0.0) and not r.significant, r
    text = format_comparison(a, again, table, 0.95, RESAMPLES)
    assert "*" not in text.split("\n", 3)[3]


def test_a_better_map_is_marked_and_its_paired_interval_is_narrower(runs):
    a, _, b = runs
    rows = {r.metric: r for r in compare_runs(a, b)["pretrained / m"]}
    auroc = rows["image AUROC"]
    assert auroc.diff > 0 and auroc.significant and auroc.diff_ci[0] > 0
    # the two runs' own intervals overlap; pairing removes what the test images share
    assert auroc.b_ci[0] < auroc.a_ci[1]
    assert auroc.diff_ci[1] - auroc.diff_ci[0] < auroc.a_ci[1] - auroc.a_ci[0]
    assert rows["recall"].diff > 0 and rows["recall"].significant
    fa = rows["false-alarm rate"]  # the good images' scores did not change
    assert fa.diff == 0.0 and not fa.significant
    lines = format_comparison(a, b, compare_runs(a, b), 0.95, RESAMPLES).splitlines()
    assert max(map(len, lines)) <= 120
    assert any(line.lstrip().startswith("image AUROC") and line.endswith(" *") for line in lines)


def test_resampled_rates_centre_on_the_reported_ones(runs):
    a, _, _ = runs
    per_category: dict[str, dict[str, np.ndarray]] = {}
    for key, value in a.resamples["pretrained"].items():
        _, category, name = key.split("/", 2)
        per_category.setdefault(category, {})[name] = value
    headline = resampled_headline(per_category)
    op = a.details["pretrained"]["m"]["operating_point"]
    assert headline["false_alarm_rate"].mean() == pytest.approx(op["false_alarm_rate"], abs=0.01)
    assert headline["recall"].mean() == pytest.approx(op["recall"], abs=0.01)
    assert headline["image_auroc"].shape == (RESAMPLES,)


def test_runs_on_other_test_images_are_not_paired(runs):
    a, _, _ = runs
    per_category = {"tile": {"paths": np.array(["x.png", "y.png"]), "labels": np.array([0, 1], dtype=np.int8)}}
    other = {"tile": {"paths": np.array(["x.png", "z.png"]), "labels": np.array([0, 1], dtype=np.int8)}}
    with pytest.raises(DataError, match="different test images"):
        check_paired(per_category, other, "pretrained/m")
    with pytest.raises(DataError, match="different categories"):
        check_paired(per_category, {}, "pretrained/m")
