"""The evaluation stages' library on a tiny real run: prepare, train for two epochs, evaluate."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_training, train_everything

from aead.data.mvtec import Sample, read_split
from aead.errors import CheckpointError
from aead.evaluation.evaluate import CategoryResult, TrainedModels, category_inputs, defect_type_metrics, evaluate
from aead.params import parse_params
from aead.data.prepare import prepare_split
from aead.models.scoring import score_inputs
from aead.training.loops import autocast_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory, raw_params_module, odd_dataset_module):
    """Two categories: 'widget' (good and anomalous test images) and 'plain' (only good test images)."""
    root = odd_dataset_module
    plain = root / "plain"
    shutil.copytree(root / "widget" / "train", plain / "train")
    shutil.copytree(root / "widget" / "test" / "good", plain / "test" / "good")
    work = tmp_path_factory.mktemp("eval")
    raw = copy.deepcopy(raw_params_module)
    raw["data"].update(root=str(root), categories=["widget", "plain"], image_size=16,
                       prepared_dir=str(work / "prepared"))
    params = parse_params(tiny_training(raw))
    prepare_split(params.data, log=lambda m: None)
    train_everything(params, work / "models")
    return params, work


def test_metrics_keys_and_undefined_auroc(trained):
    params, work = trained
    lines: list[str] = []
    ev = evaluate(params, "ssim", work / "models", log=lines.append)
    for model in ("baseline", "multiscale"):
        widget = ev.metrics[model]["categories"]["widget"]
        assert widget["image_auroc"] is not None and 0.0 <= widget["image_auroc"] <= 1.0
        assert widget["n_anomalous"] == 3 and widget["n_anomalous_with_mask"] == 2
        assert widget["pixel_auroc"] is not None and widget["aupro"] is not None
        cal = ev.calibration[model]["widget"]
        assert widget["calibrated_threshold"] == cal.threshold and cal.n_good == 1 and cal.n_synthetic == 1  # 15 % of 8 train images
        op = widget["operating_point"]
        assert set(op) >= {"false_alarm_rate", "false_alarm_rate_ci", "recall", "recall_ci", "precision", "f1",
                           "flag_all", "flag_none"}
        assert op["fp"] + op["tn"] == widget["n_good"] and op["tp"] + op["fn"] == widget["n_anomalous"]
        assert op["false_alarm_rate_ci"][0] <= op["false_alarm_rate"] <= op["false_alarm_rate_ci"][1]
        # one validation good image cannot honour evaluate.false_alarm_rate 0.1: it guarantees 1 / 2 and says so
        assert op["guaranteed_false_alarm_rate"] == 0.5 and op["needed_calibration_good"] == 9
        assert widget["calibration_validation"] == {"auroc": cal.validation_auroc, "good_flagged": cal.good_flagged,
                                                    "synthetic_recall": cal.synthetic_recall}
        assert "needs at least 9 validation good images, there are 1" in widget["calibration_warning"]
        assert any(f"{model}/widget: evaluate.false_alarm_rate" in line for line in lines)
        pooled = ev.metrics[model]["operating_point"]
        assert pooled["fp"] == op["fp"] + ev.metrics[model]["categories"]["plain"]["operating_point"]["fp"]
        assert pooled["guaranteed_false_alarm_rate"] == 0.5
        plain = ev.metrics[model]["categories"]["plain"]
        assert plain["image_auroc"] is None and plain["pixel_auroc"] is None and "no anomalous" in plain["note"]
        assert ev.metrics[model]["image_auroc"] == widget["image_auroc"], "overall = mean over defined categories"
        r = ev.results[model]["widget"]
        assert widget["mean_error_good"] == pytest.approx(r.scores["mean"][r.labels == 0].mean())
    assert any("'plain' has no anomalous test images" in line for line in lines)
    assert any("1 of 3 anomalous images have no mask" in line for line in lines)
    assert {r["category"] for r in ev.roc_rows} == {"widget"}
    assert len(ev.score_rows) == 2 * (5 + 2)


def without_timings(obj):
    """The metrics without the times, which differ from run to run."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items()
                if not k.startswith("scoring_") and k not in ("validation_seconds", "metrics_seconds")}
    return obj


def test_scores_are_deterministic(trained):
    params, work = trained
    a = evaluate(params, "l1", work / "models", log=lambda m: None)
    b = evaluate(params, "l1", work / "models", log=lambda m: None)
    assert without_timings(a.metrics) == without_timings(b.metrics)
    assert a.metrics["baseline"]["categories"]["widget"]["scoring_images_per_second"] > 0
    r = a.results["baseline"]["widget"]
    assert np.allclose(r.scores["max"], r.maps.reshape(len(r.maps), -1).max(axis=1))


def test_missing_checkpoint_is_named(trained, tmp_path):
    params, work = trained
    shutil.copytree(work / "models", tmp_path / "models")
    (tmp_path / "models" / "multiscale" / "plain.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint for category 'plain'"):
        evaluate(params, "l1", tmp_path / "models", log=lambda m: None)


def test_fused_map_is_the_parts_each_put_on_one_scale(trained):
    """Each part's map minus its validation mean, divided by its peak scale, summed; the statistics come from the
    validation images and are recorded for the deployed detectors."""
    params, work = trained
    device = torch.device("cpu")
    models = TrainedModels(params, work / "models", device)
    test = read_split(params.data.prepared_dir, "test").select(["widget"])
    ev = evaluate(params, "fused", work / "models", log=lambda m: None)
    fusion = ev.fusion["baseline"]["widget"]
    assert len(fusion) == len(params.evaluate.fused) and all(scale > 0 for _, scale in fusion)
    autocast, _ = autocast_for(device, params.model.precision, params.model.deterministic)  # as the evaluation does
    expected = 0.0
    for (mean, scale), part in zip(fusion, params.evaluate.fused):
        mapper = models.mapper(part, "baseline", "widget")
        inputs, _ = category_inputs(mapper, test)
        expected = expected + (score_inputs(mapper, inputs, 8, device, autocast).maps - mean) / scale
    np.testing.assert_allclose(ev.results["baseline"]["widget"].maps, expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_maps_have_the_values_their_kind_promises(trained):
    params, work = trained
    device = torch.device("cpu")
    models = TrainedModels(params, work / "models", device)
    test = read_split(params.data.prepared_dir, "test").select(["widget"])
    out = {}
    for method in ("l1", "ssim", "seg", "knn", "pretrained"):
        model = "pretrained" if method == "pretrained" else "baseline"
        mapper = models.mapper(method, model, "widget")
        inputs, _ = category_inputs(mapper, test)
        out[method] = score_inputs(mapper, inputs, 8, device).maps
    assert not np.array_equal(out["l1"], out["ssim"])
    assert ((out["seg"] >= 0) & (out["seg"] <= 1)).all()  # smoothed probabilities
    assert (out["knn"] >= 0).all() and out["knn"].max() > 0  # smoothed distances
    # distances plus discriminator scores, each less its validation mean: above it somewhere, finite everywhere
    assert np.isfinite(out["pretrained"]).all() and out["pretrained"].max() > 0
    assert out["l1"].shape[1:] == (16, 16)


def test_pretrained_map_keeps_the_aspect_ratio_of_the_category(trained):
    """The odd data set's training images are a little wider than high (median width/height 1.2): at short side
    32 the pretrained bank works at 32 x 32 (a multiple of the stride-16 layer), and its maps have that shape."""
    params, work = trained
    ev = evaluate(params, "pretrained", work / "models", log=lambda m: None)
    assert list(ev.metrics) == ["method", "image_score", "pretrained"]
    maps = ev.results["pretrained"]["widget"].maps
    masks = ev.results["pretrained"]["widget"].masks
    assert maps.shape[1:] == masks.shape[1:] and min(maps.shape[1:]) == 32


def test_a_missing_head_or_bank_is_named(trained, tmp_path):
    params, work = trained
    shutil.copytree(work / "models", tmp_path / "models")
    (tmp_path / "models" / "heads" / "baseline" / "widget.pt").unlink()
    with pytest.raises(CheckpointError, match=r"heads/baseline: no checkpoint for category 'widget'"):
        evaluate(params, "seg", tmp_path / "models", log=lambda m: None)
    (tmp_path / "models" / "pretrained" / "plain.pt").unlink()
    with pytest.raises(CheckpointError, match=r"pretrained/plain\.pt: pretrained bank not found"):
        evaluate(params, "pretrained", tmp_path / "models", log=lambda m: None)
    assert evaluate(params, "ssim", tmp_path / "models", log=lambda m: None).metrics["baseline"]["image_auroc"]


def test_panels_show_a_reconstruction_only_for_maps_built_on_it(trained, tmp_path):
    """The knn map reads the encoder alone, so its panels have no reconstruction tile; ssim's and the fused
    [seg, knn] map's do."""
    from PIL import Image

    from aead.evaluation.evaluate import heatmap_picker
    from aead.evaluation.report import write_heatmaps

    params, work = trained
    kept = {}
    for method in ("knn", "ssim", "fused"):
        ev = evaluate(params, method, work / "models", log=lambda m: None, heatmap_indices=heatmap_picker(1))
        result = ev.results["baseline"]["widget"]
        assert result.images, method
        kept[method] = bool(result.recon)
        out = tmp_path / method
        assert write_heatmaps(out, {"baseline": ev.results["baseline"]}, {"baseline": ev.calibration["baseline"]},
                              "top1", f"{method} map", log=lambda m: None) > 0
        widths = {Image.open(p).size[0] for p in out.rglob("*.png")}
        kept[f"{method}_width"] = max(widths)
    assert kept == {"knn": False, "ssim": True, "fused": True, **{k: v for k, v in kept.items() if k.endswith("width")}}
    assert kept["knn_width"] < kept["ssim_width"] == kept["fused_width"], "one tile fewer without a reconstruction"


def test_defect_types_are_each_ranked_against_all_the_good_images():
    kinds = ["good"] * 4 + ["crack"] * 2 + ["uneven"] * 2
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 0.5, 2.5])
    labels = np.array([k != "good" for k in kinds], dtype=np.int64)
    samples = [Sample(f"c/test/{k}/{i}.png", "c", k, int(y)) for i, (k, y) in enumerate(zip(kinds, labels))]
    result = CategoryResult(samples, labels, {"top1": scores}, np.zeros((8, 2, 2)), None, np.ones(8, dtype=bool))
    types = defect_type_metrics(result, "top1", "c", threshold=2.5, resamples=200)
    assert list(types) == ["crack", "uneven"]
    assert types["crack"]["n"] == 2 and types["crack"]["image_auroc"] == 1.0 and types["crack"]["recall"] == 1.0
    # 0.5 beats one good score of four, 2.5 three of four: (1 + 3) / 8
    assert types["uneven"]["image_auroc"] == 0.5 and types["uneven"]["recall"] == 0.5
    low, high = types["uneven"]["image_auroc_ci"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert types["crack"]["image_auroc_ci"] == [1.0, 1.0]
    lo, hi = types["uneven"]["recall_ci"]
    assert 0.0 < lo < 0.5 < hi < 1.0
    bare = defect_type_metrics(result, "top1", "c", threshold=None, resamples=0)
    assert bare["uneven"] == {"n": 2, "image_auroc": 0.5, "image_auroc_ci": None}
    only_bad = CategoryResult(samples[4:], labels[4:], {"top1": scores[4:]}, np.zeros((4, 2, 2)), None,
                              np.ones(4, dtype=bool))
    assert defect_type_metrics(only_bad, "top1", "c", threshold=2.5, resamples=10) == {}
