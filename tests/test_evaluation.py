"""The evaluation stages' library on a tiny real run: prepare, train for two epochs, evaluate."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from aead.checkpoint import load_checkpoint, save_checkpoint
from aead.data import read_split
from aead.errors import CheckpointError
from aead.evaluation import evaluate, score_split, score_split_methods
from aead.params import METHODS, parse_params
from aead.prepare import prepare_split
from aead.training import train_and_save


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
    raw["model"].update(epochs=1, batch_size=4)
    raw["baseline"]["base_channels"] = 4
    raw["multiscale"]["base_channels"] = 4
    raw["segmentation"].update(steps=3, batch_size=4, base_channels=4)
    raw["memory_bank"].update(feature_size=8)
    params = parse_params(raw)
    prepare_split(params.data, log=lambda m: None)
    for model in ("baseline", "multiscale"):
        train_and_save(params, model, work / "models" / model, log=lambda m: None)
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
        assert set(widget["calibrated"]) >= {"precision", "recall", "f1"}
        assert widget["calibration_validation"] == {"auroc": cal.validation_auroc, "good_flagged": cal.good_flagged}
        assert ("calibration_warning" in widget) == (cal.warning() is not None)
        assert any(f"{model}/widget: the threshold flags" in line for line in lines) == (cal.warning() is not None)
        plain = ev.metrics[model]["categories"]["plain"]
        assert plain["image_auroc"] is None and plain["pixel_auroc"] is None and "no anomalous" in plain["note"]
        assert ev.metrics[model]["image_auroc"] == widget["image_auroc"], "overall = mean over defined categories"
        r = ev.results[model]["widget"]
        assert widget["mean_error_good"] == pytest.approx(r.scores["mean"][r.labels == 0].mean())
    assert any("'plain' has no anomalous test images" in line for line in lines)
    assert any("1 of 3 anomalous images have no mask" in line for line in lines)
    assert {r["category"] for r in ev.roc_rows} == {"widget"}
    assert len(ev.score_rows) == 2 * (5 + 2)


def test_scores_are_deterministic(trained):
    params, work = trained
    a = evaluate(params, "l1", work / "models", log=lambda m: None)
    b = evaluate(params, "l1", work / "models", log=lambda m: None)
    assert a.metrics == b.metrics
    r = a.results["baseline"]["widget"]
    assert np.allclose(r.scores["max"], r.maps.reshape(len(r.maps), -1).max(axis=1))


def test_missing_checkpoint_is_named(trained, tmp_path):
    params, work = trained
    shutil.copytree(work / "models", tmp_path / "models")
    (tmp_path / "models" / "multiscale" / "plain.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint for category 'plain'"):
        evaluate(params, "l1", tmp_path / "models", log=lambda m: None)


def test_one_pass_for_both_maps_equals_one_stage_per_map(trained):
    """``score_split_methods`` runs the model once for L1 and SSIM; each result equals the single-method one."""
    params, work = trained
    ck = load_checkpoint(work / "models" / "baseline" / "widget.pt")
    test = read_split(params.data.prepared_dir, "test").select(["widget"])
    both = score_split_methods(ck, test, METHODS, params, torch.device("cpu"))
    for method in METHODS:
        one = score_split(ck, test, method, params, torch.device("cpu"))
        np.testing.assert_array_equal(both[method].maps, one.maps)
        for k in one.scores:
            np.testing.assert_array_equal(both[method].scores[k], one.scores[k])
    assert not np.array_equal(both["l1"].maps, both["ssim"].maps)
    assert not np.array_equal(both["seg"].maps, both["ssim"].maps)
    assert ((both["seg"].maps >= 0) & (both["seg"].maps <= 1)).all()  # smoothed probabilities
    assert (both["knn"].maps >= 0).all() and both["knn"].maps.max() > 0  # smoothed distances
    # smoothing is linear and keeps constants, so the fused map is the smoothed maps, each minus its validation mean
    # and divided by its peak scale, summed
    k_mean, k_scale, s_mean, s_scale = ck.memory.fusion.tolist()
    expected = (both["knn"].maps - k_mean) / k_scale + (both["seg"].maps - s_mean) / s_scale
    np.testing.assert_allclose(both["fused"].maps, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_seg_scores_need_a_segmentation_head(trained, tmp_path):
    """A checkpoint trained with segmentation.steps: 0 has no head: evaluating 'seg' names the file."""
    params, work = trained
    ck = load_checkpoint(work / "models" / "baseline" / "widget.pt")
    assert ck.head is not None and ck.meta["segmentation"]["steps"] == 3
    (tmp_path / "models" / "baseline").mkdir(parents=True)
    shutil.copytree(work / "models" / "multiscale", tmp_path / "models" / "multiscale")
    for cat in ("widget", "plain"):
        save_checkpoint(tmp_path / "models" / "baseline" / f"{cat}.pt", ck.model.state_dict(),
                        {k: v for k, v in ck.meta.items() if k != "segmentation"})
    with pytest.raises(CheckpointError, match=r"baseline/widget\.pt: has no segmentation head"):
        evaluate(params, "seg", tmp_path / "models", log=lambda m: None)
    assert evaluate(params, "ssim", tmp_path / "models", log=lambda m: None).metrics["baseline"]["image_auroc"]


@pytest.mark.parametrize("method", ["knn", "fused"])
def test_knn_and_fused_scores_need_a_memory_bank(trained, tmp_path, method):
    """A checkpoint trained with memory_bank.coreset_ratio: 0 has no bank: evaluating 'knn' or 'fused' names the
    file and the param."""
    params, work = trained
    ck = load_checkpoint(work / "models" / "baseline" / "widget.pt")
    assert ck.memory is not None and ck.meta["memory_bank"]["coreset_ratio"] == params.memory_bank.coreset_ratio
    (tmp_path / "models" / "baseline").mkdir(parents=True)
    shutil.copytree(work / "models" / "multiscale", tmp_path / "models" / "multiscale")
    for cat in ("widget", "plain"):
        save_checkpoint(tmp_path / "models" / "baseline" / f"{cat}.pt", ck.model.state_dict(), ck.meta,
                        head_state_dict=ck.head.state_dict())
    with pytest.raises(CheckpointError, match=r"baseline/widget\.pt: has no memory bank .*coreset_ratio"):
        evaluate(params, method, tmp_path / "models", log=lambda m: None)
