"""Read and validate params.yaml once, into typed, frozen sections.

Every key is checked: an unknown key (a typo), a missing key, a value of the wrong type or out of range
stops with a :class:`ParamsError` that names the key as ``section.key`` and says what was expected.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aead.errors import ParamsError

ModelName = Literal["baseline", "multiscale"]
MODEL_NAMES: tuple[str, ...] = ("baseline", "multiscale")
PartName = Literal["l1", "ssim", "seg", "knn", "pretrained"]
PARTS: tuple[str, ...] = typing.get_args(PartName)  # the single maps; 'fused' sums some of them
MethodName = Literal["l1", "ssim", "seg", "knn", "pretrained", "fused"]
ExportFormat = Literal["pt2", "onnx"]
EXPORT_FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
METHODS: tuple[str, ...] = typing.get_args(MethodName)  # the anomaly maps (one evaluation stage each)
AUTOENCODER_PARTS: tuple[str, ...] = ("l1", "ssim", "seg", "knn")  # the maps computed from an autoencoder
PRETRAINED = "pretrained"  # the model name under which the pretrained map's results are reported
CoresetMethod = Literal["greedy", "random"]
# The pretrained backbones and the layers a user may choose (aead.models.backbones builds them; a test checks they agree)
BACKBONE_LAYERS: dict[str, tuple[str, ...]] = {
    "efficientnet_lite0": tuple(f"blocks.{i}" for i in range(16)),
    "efficientnet_lite1": tuple(f"blocks.{i}" for i in range(21)),
    "efficientnet_lite2": tuple(f"blocks.{i}" for i in range(21)),
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3", "layer4"),
}


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded synthetic data set (stage ``synthesize``)."""

    root: str
    categories: tuple[str, ...]
    image_size: int
    n_train: int
    n_test_good: int
    n_test_defect: int
    seed: int

    def check(self) -> None:
        _positive_multiple_of_8("synthetic.image_size", self.image_size)
        _at_least("synthetic.n_train", self.n_train, 2)
        _at_least("synthetic.n_test_good", self.n_test_good, 1)
        _at_least("synthetic.n_test_defect", self.n_test_defect, 1)
        _non_empty_unique("synthetic.categories", self.categories)


@dataclass(frozen=True)
class DataParams:
    """Where the MVTec-layout data lives and how it is split and resized (stage ``prepare-split``)."""

    root: str
    categories: tuple[str, ...]
    image_size: int
    val_fraction: float
    seed: int
    prepared_dir: str

    def check(self) -> None:
        _positive_multiple_of_8("data.image_size", self.image_size)
        if not 0.0 < self.val_fraction < 1.0:
            raise ParamsError(f"data.val_fraction: expected a number strictly between 0 and 1, got {self.val_fraction!r}")
        _non_empty_unique("data.categories", self.categories)


@dataclass(frozen=True)
class ModelParams:
    """Training hyperparameters shared by both training stages."""

    per_category: bool
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    lr_factor: float
    lr_patience: int
    grad_clip: float
    corruption: Literal["none", "perlin", "cutpaste", "erase", "mixed"]
    corruption_probability: float
    ssim_weight: float
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16"]
    deterministic: bool
    num_threads: int
    launcher: str
    flip_rotate: tuple[str, ...]

    def check(self) -> None:
        _at_least("model.epochs", self.epochs, 1)
        _at_least("model.batch_size", self.batch_size, 1)
        _at_least("model.patience", self.patience, 1)
        _at_least("model.lr_patience", self.lr_patience, 0)
        _at_least("model.num_threads", self.num_threads, 0)
        if not self.lr > 0:
            raise ParamsError(f"model.lr: expected a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ParamsError(f"model.weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ParamsError(f"model.lr_factor: expected a number strictly between 0 and 1, got {self.lr_factor!r}")
        if not 0.0 <= self.corruption_probability <= 1.0:
            raise ParamsError(
                f"model.corruption_probability: expected a number from 0 to 1, got {self.corruption_probability!r}"
            )
        if self.ssim_weight < 0:
            raise ParamsError(f"model.ssim_weight: expected a number >= 0, got {self.ssim_weight!r}")
        if self.grad_clip < 0:
            raise ParamsError(f"model.grad_clip: expected a number >= 0 (0 turns clipping off), got {self.grad_clip!r}")
        _check_launcher("model.launcher", self.launcher)


@dataclass(frozen=True)
class ArchParams:
    """Architecture width of one autoencoder."""

    base_channels: int

    def check(self, section: str) -> None:
        _at_least(f"{section}.base_channels", self.base_channels, 1)


@dataclass(frozen=True)
class SegmentationParams:
    """The DRAEM-style segmentation head trained on top of each autoencoder (both training stages)."""

    steps: int
    batch_size: int
    lr: float
    base_channels: int
    corruption: Literal["perlin", "cutpaste", "erase", "mixed"]
    corruption_probability: float

    def check(self) -> None:
        _at_least("segmentation.steps", self.steps, 0)
        _at_least("segmentation.batch_size", self.batch_size, 2)
        _at_least("segmentation.base_channels", self.base_channels, 1)
        if not self.lr > 0:
            raise ParamsError(f"segmentation.lr: expected a positive number, got {self.lr!r}")
        if not 0.0 < self.corruption_probability < 1.0:
            raise ParamsError("segmentation.corruption_probability: expected a number strictly between 0 and 1 "
                              f"(the head needs images with and without defects), got {self.corruption_probability!r}")


def _check_launcher(key: str, launcher: str) -> None:
    """A launcher is a Python interpreter or a ``torchrun`` command line (what dvc.yaml puts before a stage script)."""
    program = Path(launcher.split()[0]).name if launcher.split() else ""
    if not (program.startswith("python") or program == "torchrun"):
        raise ParamsError(f"{key}: expected a Python interpreter (python, python3, a venv's python) or "
                          f"a 'torchrun ...' command line, got {launcher!r}")


def _check_coreset(section: str, ratio: float, max_bank_size: int, allow_zero: bool) -> None:
    """A coreset ratio in [0, 1] (0 only where it means "no bank") and a positive bank size bound."""
    if allow_zero and not 0.0 <= ratio <= 1.0:
        raise ParamsError(f"{section}.coreset_ratio: expected a number from 0 (no memory bank) to 1 (keep every "
                          f"patch), got {ratio!r}")
    if not allow_zero and not 0.0 < ratio <= 1.0:
        raise ParamsError(f"{section}.coreset_ratio: expected a number above 0 and at most 1, got {ratio!r}")
    _at_least(f"{section}.max_bank_size", max_bank_size, 1)


@dataclass(frozen=True)
class MemoryBankParams:
    """The PatchCore-style memory bank of encoder patch features (stages ``build-bank@<model>``)."""

    coreset_ratio: float
    coreset_method: CoresetMethod
    max_bank_size: int
    feature_size: int
    border_padding: int

    def check(self, image_size: int) -> None:
        _check_coreset("memory_bank", self.coreset_ratio, self.max_bank_size, allow_zero=True)
        _at_least("memory_bank.feature_size", self.feature_size, 1)
        if self.feature_size > image_size:
            raise ParamsError(f"memory_bank.feature_size: expected at most data.image_size ({image_size}), "
                              f"got {self.feature_size}")
        _at_least("memory_bank.border_padding", self.border_padding, 0)
        if self.border_padding % 4 or self.border_padding >= image_size:
            raise ParamsError("memory_bank.border_padding: expected a multiple of 4 (the encoder's deepest level is "
                              f"at a quarter of the resolution) below data.image_size ({image_size}), "
                              f"got {self.border_padding}")


@dataclass(frozen=True)
class PretrainedParams:
    """PatchCore on a frozen ImageNet backbone (stage ``build-pretrained-bank``, map ``pretrained``)."""

    backbone: str
    layers: tuple[str, ...]
    image_size: int
    geometry: Literal["scale", "shape"]
    border_padding: int
    neighbourhood: int
    coreset_ratio: float
    coreset_method: CoresetMethod
    max_bank_size: int
    search_dim: int
    search_candidates: int
    smooth_sigma: float
    batch_size: int
    seed: int
    discriminator_steps: int
    discriminator_hidden: int
    discriminator_batch_size: int
    discriminator_noise: float
    discriminator_lr: float
    discriminator_patches: int
    discriminator_defects: int
    discriminator_corruption: Literal["perlin", "cutpaste", "erase", "mixed"]
    brightness_sigma: float
    chunk_images: int
    launcher: str

    def check(self) -> None:
        if self.backbone not in BACKBONE_LAYERS:
            raise ParamsError(f"pretrained.backbone: expected one of {', '.join(BACKBONE_LAYERS)}, "
                              f"got {self.backbone!r}")
        if not self.layers:
            raise ParamsError("pretrained.layers: expected a non-empty list of layer names")
        valid = BACKBONE_LAYERS[self.backbone]
        unknown = [name for name in self.layers if name not in valid]
        if unknown:
            raise ParamsError(f"pretrained.layers: {', '.join(map(repr, unknown))} not a layer of {self.backbone}; "
                              f"expected some of {', '.join(valid)}")
        _unique("pretrained.layers", self.layers, what="layer")
        _at_least("pretrained.image_size", self.image_size, 32)
        _at_least("pretrained.border_padding", self.border_padding, 0)
        if self.border_padding >= self.image_size:
            raise ParamsError(f"pretrained.border_padding: expected less than pretrained.image_size "
                              f"({self.image_size}) (a mirrored border cannot be wider than the image), "
                              f"got {self.border_padding}")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ParamsError(f"pretrained.neighbourhood: expected an odd whole number >= 1 (patches averaged over "
                              f"k x k around each position), got {self.neighbourhood}")
        _check_coreset("pretrained", self.coreset_ratio, self.max_bank_size, allow_zero=False)
        _at_least("pretrained.search_dim", self.search_dim, 1)
        _at_least("pretrained.search_candidates", self.search_candidates, 0)
        for key in ("smooth_sigma", "brightness_sigma"):
            if getattr(self, key) < 0:
                raise ParamsError(f"pretrained.{key}: expected a number >= 0, got {getattr(self, key)!r}")
        _at_least("pretrained.batch_size", self.batch_size, 1)
        _at_least("pretrained.discriminator_steps", self.discriminator_steps, 0)
        _at_least("pretrained.discriminator_hidden", self.discriminator_hidden, 1)
        _at_least("pretrained.discriminator_batch_size", self.discriminator_batch_size, 1)
        _at_least("pretrained.discriminator_patches", self.discriminator_patches, 1)
        _at_least("pretrained.discriminator_defects", self.discriminator_defects, 0)
        _at_least("pretrained.chunk_images", self.chunk_images, 1)
        _check_launcher("pretrained.launcher", self.launcher)
        for key in ("discriminator_noise", "discriminator_lr"):
            value = getattr(self, key)
            if not value > 0:
                raise ParamsError(f"pretrained.{key}: expected a number > 0, got {value!r}")


@dataclass(frozen=True)
class EvaluateParams:
    """Scoring and reporting options of the evaluation stages."""

    image_score: Literal["mean", "top1", "max"]
    smooth_sigma: float
    ssim_window_sigma: float
    batch_size: int
    heatmaps_per_type: int
    curve_points: int
    fused: tuple[PartName, ...]
    bootstrap_resamples: int
    confidence: float
    false_alarm_rate: float

    def check(self) -> None:
        if self.smooth_sigma < 0:
            raise ParamsError(f"evaluate.smooth_sigma: expected a number >= 0, got {self.smooth_sigma!r}")
        if not self.ssim_window_sigma > 0:
            raise ParamsError(f"evaluate.ssim_window_sigma: expected a positive number, got {self.ssim_window_sigma!r}")
        _at_least("evaluate.batch_size", self.batch_size, 1)
        _at_least("evaluate.heatmaps_per_type", self.heatmaps_per_type, 0)
        _at_least("evaluate.curve_points", self.curve_points, 10)
        _at_least("evaluate.bootstrap_resamples", self.bootstrap_resamples, 0)
        if not 0.5 <= self.confidence < 1.0:
            raise ParamsError(f"evaluate.confidence: expected a level from 0.5 to below 1 (e.g. 0.95), "
                              f"got {self.confidence!r}")
        if not 0.0 < self.false_alarm_rate < 1.0:
            raise ParamsError(f"evaluate.false_alarm_rate: expected the share of good images you accept to flag, "
                              f"strictly between 0 and 1 (e.g. 0.1), got {self.false_alarm_rate!r}")
        if len(self.fused) < 2:
            raise ParamsError(f"evaluate.fused: expected at least two of {', '.join(PARTS)} (the maps the fused map "
                              f"sums), got {list(self.fused)}")
        _unique("evaluate.fused", self.fused, what="map")
        if not set(self.fused) & set(AUTOENCODER_PARTS):
            raise ParamsError("evaluate.fused: the fused map is reported per autoencoder, so it needs one of "
                              f"{', '.join(AUTOENCODER_PARTS)}; the pretrained map alone is method 'pretrained'")


@dataclass(frozen=True)
class ExportParams:
    """Which anomaly map the exported detectors use and the formats they are written in (stage ``export``)."""

    method: MethodName
    formats: tuple[ExportFormat, ...]

    def check(self) -> None:
        if not self.formats:
            raise ParamsError(f"export.formats: expected one or more of {', '.join(EXPORT_FORMATS)}, got []")
        _unique("export.formats", self.formats, what="format")


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    synthetic: SyntheticParams
    data: DataParams
    model: ModelParams
    baseline: ArchParams
    multiscale: ArchParams
    segmentation: SegmentationParams
    memory_bank: MemoryBankParams
    pretrained: PretrainedParams
    evaluate: EvaluateParams
    export: ExportParams
    source: Path = field(default=Path("params.yaml"), compare=False)

    def arch(self, model: str) -> ArchParams:
        """The architecture section of ``model`` (``baseline`` or ``multiscale``)."""
        if model not in MODEL_NAMES:
            raise ParamsError(f"unknown model {model!r}: expected one of {', '.join(MODEL_NAMES)}")
        return getattr(self, model)


def params_record(params: Params) -> dict[str, Any]:
    """Every section and key as plain JSON values; :func:`parse_params` reads it back to equal params."""
    record = dataclasses.asdict(params)
    record.pop("source")
    return record


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read ``path`` and validate every section and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return parse_params(raw, source=path)


def parse_params(raw: Any, source: Path = Path("params.yaml")) -> Params:
    """Validate a params mapping (as read from YAML) and build :class:`Params`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    hints = typing.get_type_hints(Params)
    sections = {f.name for f in dataclasses.fields(Params) if f.name != "source"}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ParamsError(f"{source}: unknown section(s) {', '.join(unknown)}; expected {', '.join(sorted(sections))}")
    built: dict[str, Any] = {}
    for name in sections:
        if name not in raw:
            raise ParamsError(f"{source}: missing section '{name}'")
        built[name] = _build_section(name, hints[name], raw[name], source)
    params = Params(**built, source=source)
    params.synthetic.check()
    params.data.check()
    params.model.check()
    _check_flip_rotate(params.model, params.data)
    params.baseline.check("baseline")
    params.multiscale.check("multiscale")
    params.segmentation.check()
    params.memory_bank.check(params.data.image_size)
    params.pretrained.check()
    params.evaluate.check()
    params.export.check()
    missing = missing_components(params, params.export.method)
    if missing:
        raise ParamsError(f"{source}: export.method is '{params.export.method}' but {missing}; choose another "
                          "export.method or train what it needs")
    return params


def _check_flip_rotate(model: ModelParams, data: DataParams) -> None:
    """``model.flip_rotate`` names categories of ``data.categories`` once each; a joint model is augmented as a
    whole, so it lists all of them or none."""
    _unique("model.flip_rotate", model.flip_rotate)
    unknown = [c for c in model.flip_rotate if c not in data.categories]
    if unknown:
        raise ParamsError(f"model.flip_rotate: {', '.join(map(repr, unknown))} not in data.categories "
                          f"({', '.join(data.categories)})")
    if not model.per_category and model.flip_rotate and set(model.flip_rotate) != set(data.categories):
        raise ParamsError("model.flip_rotate: with model.per_category false one model learns every category, so "
                          "list all of data.categories or none")


def parts_of(method: str, evaluate: EvaluateParams) -> tuple[str, ...]:
    """The single maps ``method`` is made of: itself, or for ``fused`` the maps of ``evaluate.fused``."""
    return tuple(evaluate.fused) if method == "fused" else (method,)


def models_of(method: str, evaluate: EvaluateParams) -> tuple[str, ...]:
    """The models ``method`` is reported for: each autoencoder when a part needs one, else the pretrained bank."""
    if set(parts_of(method, evaluate)) & set(AUTOENCODER_PARTS):
        return MODEL_NAMES
    return (PRETRAINED,)


def missing_components(params: Params, method: str) -> str | None:
    """Why ``method``'s map cannot be computed with these params (what is not trained), or None."""
    parts = parts_of(method, params.evaluate)
    if "seg" in parts and params.segmentation.steps == 0:
        return "segmentation.steps is 0, so no segmentation head is trained"
    if "knn" in parts and params.memory_bank.coreset_ratio == 0:
        return "memory_bank.coreset_ratio is 0, so no memory bank is built"
    return None


def _build_section(name: str, cls: type, raw: Any, source: Path) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    keys = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ParamsError(
            f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
            f"section '{name}' takes {', '.join(keys)}"
        )
    values = {}
    for key in keys:
        if key not in raw:
            raise ParamsError(f"{source}: missing key '{name}.{key}'")
        values[key] = _coerce(f"{name}.{key}", hints[key], raw[key])
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; YAML's '1e-3' strings are accepted as floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation for {key}: {hint}")


def _positive_multiple_of_8(key: str, value: int) -> None:
    if value < 8 or value % 8:
        raise ParamsError(f"{key}: expected a positive multiple of 8 (the autoencoders downsample 3 times), got {value}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ParamsError(f"{key}: expected a whole number >= {minimum}, got {value}")


def _non_empty_unique(key: str, values: tuple[str, ...]) -> None:
    if not values:
        raise ParamsError(f"{key}: expected a non-empty list of category names")
    _unique(key, values)


def _unique(key: str, values: tuple[str, ...], what: str = "category") -> None:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ParamsError(f"{key}: {what} listed more than once: {', '.join(dupes)}")
