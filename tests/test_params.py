from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from aead.errors import DataError, ParamsError
from aead.params import load_params, parse_params


def test_committed_params_are_valid(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.data.image_size % 8 == 0
    assert params.arch("baseline").base_channels >= 1


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "lrr", 0.1, "model.lrr"),
        ("model", "lr", "fast", "model.lr: expected a number"),
        ("model", "lr", -1.0, "model.lr: expected a positive number"),
        ("model", "epochs", 2.5, "model.epochs: expected a whole number"),
        ("model", "epochs", 0, "model.epochs: expected a whole number >= 1"),
        ("model", "per_category", "yes", "model.per_category: expected true or false"),
        ("model", "device", "tpu", "model.device: expected one of"),
        ("data", "image_size", 100, "data.image_size: expected a positive multiple of 8"),
        ("data", "image_size", 0, "data.image_size: expected a positive multiple of 8"),
        ("data", "image_size", -64, "data.image_size"),
        ("data", "val_fraction", 1.0, "data.val_fraction"),
        ("data", "categories", [], "data.categories"),
        ("data", "categories", "bottle", "data.categories: expected a list"),
        ("data", "categories", ["a", "a"], "more than once"),
        ("evaluate", "image_score", "median", "evaluate.image_score"),
        ("baseline", "base_channels", 0, "baseline.base_channels"),
        ("model", "launcher", "bash -c rm", "model.launcher: expected a Python interpreter"),
        ("model", "launcher", "", "model.launcher"),
        ("pretrained", "launcher", "mpirun -n 2", "pretrained.launcher: expected a Python interpreter"),
        ("pretrained", "chunk_images", 0, "pretrained.chunk_images: expected a whole number >= 1"),
        ("pretrained", "discriminator_patches", 0, "pretrained.discriminator_patches: expected a whole number >= 1"),
        ("segmentation", "steps", -1, "segmentation.steps: expected a whole number >= 0"),
        ("segmentation", "batch_size", 1, "segmentation.batch_size: expected a whole number >= 2"),
        ("segmentation", "corruption", "none", "segmentation.corruption: expected one of"),
        ("segmentation", "corruption_probability", 1.0, "segmentation.corruption_probability"),
        ("memory_bank", "coreset_ratio", -0.1, "memory_bank.coreset_ratio: expected a number from 0"),
        ("memory_bank", "coreset_ratio", 1.5, "memory_bank.coreset_ratio: expected a number from 0"),
        ("memory_bank", "feature_size", 0, "memory_bank.feature_size: expected a whole number >= 1"),
        ("memory_bank", "feature_size", 65, "memory_bank.feature_size: expected at most data.image_size"),
        ("memory_bank", "border_padding", -4, "memory_bank.border_padding: expected a whole number >= 0"),
        ("memory_bank", "border_padding", 6, "memory_bank.border_padding: expected a multiple of 4"),
        ("memory_bank", "border_padding", 64, "memory_bank.border_padding: expected a multiple of 4"),
        ("pretrained", "search_candidates", -1, "pretrained.search_candidates: expected a whole number >= 0"),
        ("pretrained", "search_dim", 0, "pretrained.search_dim: expected a whole number >= 1"),
        ("export", "method", "mean", "export.method: expected one of"),
        ("export", "formats", [], "export.formats: expected one or more of pt2, onnx"),
        ("export", "formats", ["tflite"], "expected one of 'pt2', 'onnx', got 'tflite'"),
        ("export", "formats", ["onnx", "onnx"], "export.formats: format listed more than once"),
        ("model", "flip_rotate", "hazelnut", "model.flip_rotate: expected a list"),
        ("model", "flip_rotate", ["hazelnut", "hazelnut"], "model.flip_rotate: category listed more than once"),
        ("model", "flip_rotate", ["screw"], "model.flip_rotate: 'screw' not in data.categories"),
    ],
)
def test_bad_values_name_the_key(raw_params, section, key, value, message):
    bad = copy.deepcopy(raw_params)
    bad[section][key] = value
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_params(bad)


def test_flip_rotate_of_a_joint_model_lists_every_category_or_none(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["model"].update(per_category=False, flip_rotate=["hazelnut"])
    with pytest.raises(ParamsError, match="model.flip_rotate: with model.per_category false"):
        parse_params(raw)
    for listed in ([], list(raw["data"]["categories"])):
        raw["model"]["flip_rotate"] = listed
        assert parse_params(raw).model.flip_rotate == tuple(listed)


def test_missing_key_and_unknown_section(raw_params):
    bad = copy.deepcopy(raw_params)
    del bad["model"]["lr"]
    with pytest.raises(ParamsError, match=r"missing key 'model\.lr'"):
        parse_params(bad)
    bad = copy.deepcopy(raw_params)
    bad["modle"] = {}
    with pytest.raises(ParamsError, match="unknown section"):
        parse_params(bad)


def test_scientific_notation_string_is_a_float(raw_params):
    ok = copy.deepcopy(raw_params)
    ok["model"]["lr"] = "1e-4"
    assert parse_params(ok).model.lr == pytest.approx(1e-4)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "p.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


@pytest.mark.parametrize("launcher", ["python", "python3", "/opt/venv/bin/python3.11",
                                      "torchrun --standalone --nproc-per-node 2"])
def test_launchers_accepted(raw_params, launcher):
    raw = copy.deepcopy(raw_params)
    raw["model"]["launcher"] = launcher
    raw["pretrained"]["launcher"] = launcher
    params = parse_params(raw)
    assert params.model.launcher == params.pretrained.launcher == launcher


def test_exporting_seg_without_a_head_is_refused(raw_params):
    raw = copy.deepcopy(raw_params)
    raw["segmentation"]["steps"] = 0
    raw["export"]["method"] = "seg"
    with pytest.raises(ParamsError, match="export.method is 'seg' but segmentation.steps is 0"):
        parse_params(raw)
    raw["export"]["method"] = "ssim"
    assert parse_params(raw).segmentation.steps == 0


@pytest.mark.parametrize(("method", "section", "key", "zero", "message"), [
    ("knn", "memory_bank", "coreset_ratio", 0, "export.method is 'knn' but memory_bank.coreset_ratio is 0"),
    ("fused", "memory_bank", "coreset_ratio", 0, "export.method is 'fused' but memory_bank.coreset_ratio is 0"),
    ("fused", "segmentation", "steps", 0, "export.method is 'fused' but segmentation.steps is 0"),
])
def test_exporting_a_map_whose_parts_are_not_trained_is_refused(raw_params, method, section, key, zero, message):
    raw = copy.deepcopy(raw_params)
    raw["export"]["method"] = method
    raw[section][key] = zero
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        parse_params(raw)
    raw["export"]["method"] = "l1"
    assert getattr(parse_params(raw), section) is not None


def test_preflight_checks_what_the_params_name(raw_params, tmp_path, monkeypatch):
    """Stage check-params: a launcher that is not installed, or a backbone whose weights are not in the hub cache,
    stops the run before any stage (the README's table of what happens when)."""
    import yaml

    from aead.preflight import preflight

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params))
    assert preflight(path).pretrained.backbone == raw_params["pretrained"]["backbone"]
    bad = copy.deepcopy(raw_params)
    bad["model"]["launcher"] = "python9.99"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match="model.launcher: 'python9.99' is not on the PATH"):
        preflight(path)
    bad = copy.deepcopy(raw_params)
    bad["pretrained"]["launcher"] = "python9.99 -u"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match="pretrained.launcher: 'python9.99' is not on the PATH"):
        preflight(path)
    bad = copy.deepcopy(raw_params)
    bad["pretrained"].update(backbone="wide_resnet50_2", layers=["layer2", "layer3"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match="pretrained.backbone wide_resnet50_2: its ImageNet weights"):
        preflight(path)
    bad = copy.deepcopy(raw_params)
    bad["data"]["root"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match="data.root: .*nowhere is not a folder"):
        preflight(path)
    (tmp_path / "nowhere" / bad["data"]["categories"][0] / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no training images"):
        preflight(path)
    path.write_text(yaml.safe_dump(raw_params))  # ONNX asked for, its exporter not importable: refused up front
    script = ("import sys; sys.modules['onnxscript'] = None; from aead.preflight import preflight; "
              f"preflight({str(path)!r})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1 and "export.formats: onnx needs the packages onnxscript" in proc.stderr
    only_pt2 = copy.deepcopy(raw_params)
    only_pt2["export"]["formats"] = ["pt2"]
    path.write_text(yaml.safe_dump(only_pt2))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
