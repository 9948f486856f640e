"""MVTec AD layout: find the images, read them strictly, split them, and cache them as arrays.

Layout of one category (as MVTec AD ships it)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (optional per image; or <stem>.png)

Images may be PNG, JPEG or BMP, RGB or single-channel (made 3-channel), 8 or 16 bit, of different sizes.
Anything unreadable stops with a :class:`DataError` naming the file; nothing is skipped or replaced.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aead import io
from aead.data.images import IMAGE_EXTENSIONS, open_header, read_image
from aead.errors import DataError
from aead.training.numerics import memory_format

MANIFEST_COLUMNS = ("index", "path", "category", "defect_type", "label", "mask_path")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image of the data set. ``label`` is 0 for good, 1 for anomalous; ``mask_path`` may be None."""

    path: str
    category: str
    defect_type: str
    label: int
    mask_path: str | None = None


@dataclass
class Split:
    """One split as cached by prepare-split: its samples and their resized images (N, H, W, 3) uint8."""

    samples: list[Sample]
    images: np.ndarray
    masks: np.ndarray | None = None

    def select(self, categories: Sequence[str]) -> Split:
        """The rows of the given categories (the whole split when ``categories`` covers all).

        prepare-split writes each category's rows together, so the selection is a slice: a view of a
        memory-mapped array, not a copy in memory. Scattered rows (only possible in a hand-made split) are
        copied."""
        wanted = set(categories)
        keep = [i for i, s in enumerate(self.samples) if s.category in wanted]
        if len(keep) == len(self.samples):
            return self
        rows: slice | np.ndarray = np.asarray(keep, dtype=np.int64)
        if keep and keep[-1] - keep[0] + 1 == len(keep):
            rows = slice(keep[0], keep[-1] + 1)
        return Split(
            samples=[self.samples[i] for i in keep],
            images=self.images[rows],
            masks=None if self.masks is None else self.masks[rows],
        )


def list_images(folder: Path) -> list[Path]:
    """The image files in ``folder``, sorted by name. Hidden files (``.DS_Store`` …) are ignored;
    any other non-image file stops with an error naming it."""
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder of images, but it does not exist")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    others = [p for p in files if p.is_dir() or p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        raise DataError(
            f"{others[0]}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
            f"remove it from {folder} or move it out of the data set"
        )
    return files


def scan_category(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """All training (good) and test samples of one category, with their masks where present."""
    cat_dir = root / category
    if not cat_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
        raise DataError(
            f"data.categories: category '{category}' not found: {cat_dir} does not exist "
            f"(categories under {root}: {', '.join(found) or 'none'})"
        )
    train_files = list_images(cat_dir / "train" / "good")
    if not train_files:
        raise DataError(f"{cat_dir / 'train' / 'good'}: no training images (expected defect-free images here)")
    train = [Sample(str(p), category, "good", 0) for p in train_files]

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: expected a test folder with good/ and one folder per defect type")
    gt_dir = cat_dir / "ground_truth"
    test: list[Sample] = []
    defect_types = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in test_dir.iterdir() if not p.is_dir() and not p.name.startswith("."))
    if stray:
        raise DataError(f"{test_dir / stray[0]}: expected only folders (good/ and one per defect type) in {test_dir}")
    for defect in defect_types:
        files = list_images(test_dir / defect)
        masks = _masks_by_stem(gt_dir / defect, {p.stem for p in files}, test_dir / defect) if defect != "good" else {}
        for p in files:
            mask = masks.get(p.stem)
            test.append(Sample(str(p), category, defect, 0 if defect == "good" else 1, str(mask) if mask else None))
    if not test:
        raise DataError(f"{test_dir}: no test images")
    return train, test


def _masks_by_stem(folder: Path, stems: set[str], images: Path) -> dict[str, Path]:
    """The masks in ``folder`` (which may not exist: no masks then) by the stem of their image in ``images``, whose
    stems are ``stems``: a mask is named ``<image stem>_mask.<ext>`` (MVTec AD) or like its image, ``<image
    stem>.<ext>`` (as many other data sets ship them). A mask that matches no image, or two masks of one image, stop
    with an error naming them."""
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in list_images(folder):
        stripped = p.stem.removesuffix("_mask")
        stem = p.stem if p.stem in stems else stripped
        if stem not in stems:
            raise DataError(f"{p}: a mask without an image (no {images / stripped}.*; masks are named <image stem>_mask"
                            f".png or like their image)")
        if stem in out:
            raise DataError(f"{p}: a second mask for {images / stem}.* (the other is {out[stem]})")
        out[stem] = p
    return out


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Decode a mask into (H, W) bool: pixels above half of the maximum value (tolerates JPEG noise and
    masks saved as 0/1 or 0/255). Its size must equal the image's ``shape`` (H, W)."""
    path = Path(path)
    arr = read_image(path).max(axis=2)
    if arr.shape != tuple(shape):
        raise DataError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} pixels but its image is {shape[1]}x{shape[0]}; "
            "expected the same size"
        )
    top = int(arr.max())
    return arr > (top / 2.0) if top > 0 else np.zeros(arr.shape, dtype=bool)


Shape = tuple[int, int]


def as_shape(size: int | Shape) -> Shape:
    """``(height, width)`` of a square ``size`` or of an explicit shape (an exported graph's symbolic sizes kept as
    they are)."""
    if isinstance(size, int):
        return size, size
    return tuple(v if isinstance(v, torch.SymInt) else int(v) for v in size[:2])  # type: ignore[return-value]


def working_shape(height: int, width: int, short_side: int, multiple: int = 8) -> Shape:
    """The shape an image of ``height`` x ``width`` is resized to when its aspect ratio is kept: the short side
    becomes ``short_side``, the long side scales with it, and both are rounded to a multiple of ``multiple`` (at
    least one ``multiple``). A 200 x 600 strip at short side 224 becomes 224 x 672, not 224 x 224."""
    if height < 1 or width < 1:
        raise DataError(f"working_shape: image of {height}x{width} pixels has no area")
    scale = short_side / min(height, width)

    def side(n: int) -> int:
        return max(multiple, int(round(n * scale / multiple)) * multiple)

    return side(height), side(width)


def image_shape(path: str | Path) -> Shape:
    """(height, width) of an image file, read from its header (the pixels are not decoded)."""
    img = open_header(Path(path))
    return img.height, img.width


def category_shape(samples: Sequence[Sample], short_side: int, multiple: int = 8) -> Shape:
    """The working shape of a category's images when the aspect ratio is kept: the median aspect ratio of
    ``samples`` (its training images) with the short side at ``short_side`` (see :func:`working_shape`). Every image
    of the category is resized to it, so images whose aspect ratio differs from the median are stretched a little."""
    return _median_aspect_shape(image_sizes(samples, "category_shape"), short_side, multiple)


def image_sizes(samples: Sequence[Sample], caller: str) -> np.ndarray:
    """(N, 2) float64 (height, width) of ``samples``, read from their headers (``caller`` names who asked, when there
    are none)."""
    if not samples:
        raise DataError(f"{caller}: no images to measure")
    return np.array([image_shape(s.path) for s in samples], dtype=np.float64)


def _median_ratio(shapes: np.ndarray) -> float:
    """The median width / height of (N, 2) (height, width) ``shapes``."""
    return float(np.median(shapes[:, 1] / shapes[:, 0]))


def _median_aspect_shape(shapes: np.ndarray, short_side: int, multiple: int) -> Shape:
    return working_shape(1000, max(1, round(1000 * _median_ratio(shapes))), short_side, multiple)


GEOMETRIES = ("scale", "shape")


@dataclass(frozen=True)
class Geometry:
    """How a category's images are resized for the pretrained map.

    ``shape``: every image to the category's working ``shape`` (:func:`category_shape`), whatever its own size.
    ``scale``: every image by the one factor ``num / den`` (:func:`category_geometry`: the median training image gets
    as many pixels as the working shape), each side rounded to a multiple of ``multiple`` (half up, at least one
    ``multiple``), so a patch covers the same pixels in every image: crops of one camera in many sizes keep their
    texture's scale, and a long strip keeps its length. On a category of one image size both give the same shape.
    ``shape`` is also the grid the evaluation compares maps and masks on (:meth:`of` gives each image's own)."""

    mode: str
    shape: Shape
    num: int
    den: int
    multiple: int

    def of(self, height: int, width: int) -> Shape:
        """The working shape of an image of ``height`` x ``width`` pixels."""
        if self.mode == "shape":
            return self.shape
        return self.side(height), self.side(width)

    def side(self, n: int) -> int:
        """One side of ``n`` pixels at the scale, in integer arithmetic (the exported graphs compute the same)."""
        return max(1, (2 * n * self.num + self.den * self.multiple) // (2 * self.den * self.multiple)) * self.multiple

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "shape": list(self.shape), "num": self.num, "den": self.den,
                "multiple": self.multiple}

    @classmethod
    def from_dict(cls, record: dict[str, object]) -> Geometry:
        shape = record["shape"]
        return cls(str(record["mode"]), (int(shape[0]), int(shape[1])), int(record["num"]), int(record["den"]),
                   int(record["multiple"]))


SCALE_DENOMINATOR = 1 << 16  # the scale is kept as a fraction num / 2**16: integer arithmetic everywhere


def category_geometry(sizes: np.ndarray, short_side: int, mode: str, multiple: int = 8) -> Geometry:
    """The :class:`Geometry` of a category from the ``sizes`` (N, 2) of its training images (:func:`image_sizes`): its
    working shape (:func:`category_shape`) and the one scale that gives their median image (by area) as many pixels as the
    working shape before rounding, ``short_side`` x ``short_side`` x the median aspect ratio. So the pixels read, and
    the time spent, stay those of one shape, and on a category of one image size the scale takes the short side to
    ``short_side`` exactly, the working shape's own resize."""
    if mode not in GEOMETRIES:
        raise DataError(f"geometry: expected one of {', '.join(GEOMETRIES)}, got {mode!r}")
    if len(sizes) == 0:
        raise DataError("category_geometry: no images to measure")
    ratio = _median_ratio(sizes)
    target = short_side * short_side * max(ratio, 1.0 / ratio)
    scale = math.sqrt(target / float(np.median(sizes[:, 0] * sizes[:, 1])))
    num = max(1, round(scale * SCALE_DENOMINATOR))
    return Geometry(mode, _median_aspect_shape(sizes, short_side, multiple), num, SCALE_DENOMINATOR, multiple)


Images = np.ndarray | list[np.ndarray]  # uint8 (N, H, W, 3), or (H_i, W_i, 3) images at their own working shapes


def stack_if_one_shape(images: list[np.ndarray]) -> Images:
    """``images`` as one (N, H, W, 3) array when they share a shape (the path of a category of one size), else as
    they are."""
    return np.stack(images) if images and len({image.shape for image in images}) == 1 else images


def load_geometry(samples: list[Sample], geometry: Geometry, with_masks: bool, workers: int = 4
                  ) -> tuple[Images, np.ndarray | None]:
    """The images of ``samples`` at ``geometry``: one (N, H, W, 3) uint8 array when they all have one working shape,
    else a list of (H_i, W_i, 3) arrays at each image's own; and with ``with_masks`` the masks (N, H, W) at
    ``geometry.shape`` (the grid the evaluation compares maps and masks on)."""
    if geometry.mode == "shape":
        loaded = load_split(samples, geometry.shape, with_masks=with_masks, workers=workers)
        return loaded.images, loaded.masks

    def load(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        image = read_image(sample.path)
        mask = None
        if with_masks:
            mask = np.zeros(geometry.shape, dtype=bool)
            if sample.mask_path:
                mask = resize_mask(read_mask(sample.mask_path, image.shape[:2]), geometry.shape)
        return resize_image(image, geometry.of(*image.shape[:2])), mask

    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = list(pool.map(load, samples))
    masks = np.stack([m for _, m in loaded]).astype(np.uint8) if with_masks and loaded else None
    return stack_if_one_shape([image for image, _ in loaded]), masks


def resize_image(image: np.ndarray, size: int | Shape) -> np.ndarray:
    """Resize (H, W, 3) uint8 to ``size`` (a side for a square, or (height, width)) with :func:`resize_batch`.

    The exported detectors run exactly these operations in their graphs, so their inputs equal the pipeline's and
    ``aead predict``'s bit for bit, in PyTorch and in ONNX Runtime."""
    shape = as_shape(size)
    if image.shape[:2] == shape:
        return image
    x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)[None].float()
    return resize_batch(x, shape).to(torch.uint8)[0].permute(1, 2, 0).numpy()


RESIZE_BITS = 14  # fractional bits of the resize's fixed-point weights: every product and sum is a whole number below
# 2**24 (255 x weights summing to about 2**14), so float32 computes it exactly, in any order, on any runtime and CPU


def resize_taps(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of an antialiased bilinear resize of one axis from ``size_in`` to ``size_out`` samples: (size_out, K)
    source indices and whole-number float32 weights summing to about ``2**RESIZE_BITS`` per output sample.

    Each output sample is centred at ``scale * (i + 0.5)`` in the input (``scale = size_in / size_out``) and weighs
    the inputs within ``support = max(scale, 1)`` by a triangle, ``1 - |distance| / support``, normalised to sum 1 and
    rounded to fixed point: Pillow's BILINEAR filter (and torch's ``antialias=True``). ``size_in`` may be symbolic (an
    exported graph's input size): no Python branch depends on it."""
    scale = torch.ones((), dtype=torch.float64) * size_in / size_out
    support = scale.clamp(min=1.0)
    center = scale * (torch.arange(size_out, dtype=torch.float64) + 0.5)
    first = torch.floor(center - support + 0.5).clamp(min=0.0)
    taps = (2 * size_in) // size_out + 3  # at least 2 * ceil(support) + 1, the most inputs one output can weigh
    source = first[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    weight = (1.0 - ((source - center[:, None] + 0.5) * (1.0 / support)).abs()).clamp(min=0.0) * (source < size_in)
    weight = weight / weight.sum(dim=1, keepdim=True)
    fixed = torch.floor(weight * float(1 << RESIZE_BITS) + 0.5).to(torch.float32)
    return source.to(torch.int64).clamp(max=size_in - 1), fixed


def _resize_first_axis(x: torch.Tensor, size_out: int) -> torch.Tensor:
    """(n, M) float32 whole values in [0, 255] -> (size_out, M): the first axis resized, rounded to whole values."""
    source, weight = resize_taps(x.shape[0], size_out)
    total = torch.bmm(weight[:, None, :], x[source])[:, 0]  # whole numbers below 2**24: exact in float32
    return torch.floor((total + float(1 << (RESIZE_BITS - 1))) * 2.0**-RESIZE_BITS).clamp(0.0, 255.0)


def resize_batch(x: torch.Tensor, size: int | Shape) -> torch.Tensor:
    """(N, C, H, W) float images with whole values in [0, 255] -> (N, C, height, width) of ``size`` (a side for a
    square, or (height, width)), float with whole values in [0, 255]: antialiased bilinear (:func:`resize_taps`),
    the width first, each pass rounded to whole values (as Pillow's fixed-point resize), in float32 arithmetic that
    is exact. The one resize of the pipeline, ``aead predict`` and the exported detectors, where it gives the same
    values in PyTorch and in ONNX Runtime (whose own antialiased Resize differs from torch's on about 1 % of
    pixels, enough to move a pretrained map's image score by up to 3 %)."""
    n, c, h, w = x.shape
    height, width = as_shape(size)
    y = _resize_first_axis(x.float().round().permute(3, 0, 1, 2).reshape(w, n * c * h), width)
    y = y.reshape(width, n, c, h).permute(3, 1, 2, 0).reshape(h, n * c * width)
    y = _resize_first_axis(y, height).reshape(height, n, c, width).permute(1, 2, 0, 3)
    return y.to(x.dtype).contiguous()


def resize_mask(mask: np.ndarray, size: int | Shape) -> np.ndarray:
    """Resize a bool mask to ``size`` by area averaging, keeping pixels at least half covered."""
    height, width = as_shape(size)
    if mask.shape == (height, width):
        return mask
    as_float = Image.fromarray(mask.astype(np.float32))
    return np.asarray(as_float.resize((width, height), Image.Resampling.BILINEAR)) >= 0.5


def load_sample(sample: Sample, size: int | Shape) -> tuple[np.ndarray, np.ndarray | None]:
    """Read, check and resize one sample's image and (if it has one) its mask."""
    image = read_image(sample.path)
    mask = None
    if sample.mask_path:
        mask = resize_mask(read_mask(sample.mask_path, image.shape[:2]), size)
    return resize_image(image, size), mask


def split_train_val(train: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_fraction`` of each category's good training images for validation (seeded).

    The draw for a category depends only on the seed and the category's name, so adding a category does
    not change the split of the others.
    """
    if len(train) < 2:
        raise DataError(
            f"{Path(train[0].path).parent if train else 'train/good'}: need at least 2 training images "
            "(one for training, one for validation)"
        )
    category = train[0].category
    n_val = min(len(train) - 1, max(1, round(val_fraction * len(train))))
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    val_idx = set(rng.permutation(len(train))[:n_val].tolist())
    return (
        [s for i, s in enumerate(train) if i not in val_idx],
        [s for i, s in enumerate(train) if i in val_idx],
    )


def load_split(samples: list[Sample], size: int | Shape, with_masks: bool, workers: int = 4,
               progress: Callable[[int, int], None] | None = None, folder: Path | None = None,
               name: str = "") -> Split:
    """Decode and resize all ``samples`` (in parallel threads) into one array.

    With ``folder``, the arrays are written straight into ``<folder>/<name>.npy`` (and ``<name>_masks.npy``)
    through memory maps, so a split larger than memory can be prepared; otherwise they are in memory."""

    def allocate(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        if folder is None:
            return np.zeros(shape, dtype=np.uint8)
        return np.lib.format.open_memmap(folder / f"{name}{suffix}.npy", mode="w+", dtype=np.uint8, shape=shape)

    height, width = as_shape(size)
    images = allocate("", (len(samples), height, width, 3))
    masks = allocate("_masks", (len(samples), height, width)) if with_masks else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (image, mask) in enumerate(pool.map(lambda s: load_sample(s, size), samples)):
            images[i] = image
            if masks is not None and mask is not None:
                masks[i] = mask
            if progress:
                progress(i + 1, len(samples))
    for array in (images, masks):
        if isinstance(array, np.memmap):
            array.flush()
    return Split(samples, images, masks)


def write_manifest(folder: Path, name: str, samples: list[Sample]) -> None:
    """Write ``<name>.csv``, the manifest of a split whose arrays are (being) written next to it."""
    rows = [
        {"index": i, "path": s.path, "category": s.category, "defect_type": s.defect_type,
         "label": s.label, "mask_path": s.mask_path or ""}
        for i, s in enumerate(samples)
    ]
    io.write_csv(folder / f"{name}.csv", rows, MANIFEST_COLUMNS)


def read_manifest(folder: str | Path, name: str) -> list[Sample]:
    """The samples of a split's manifest written by prepare-split (``<folder>/<name>.csv``)."""
    manifest = Path(folder) / f"{name}.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: split manifest not found; run the prepare-split stage first (dvc repro)")
    rows = io.read_csv(manifest)
    if not rows or list(rows[0]) != list(MANIFEST_COLUMNS):
        raise DataError(f"{manifest}: expected a manifest with columns {', '.join(MANIFEST_COLUMNS)}")
    return [Sample(r["path"], r["category"], r["defect_type"], int(r["label"]), r["mask_path"] or None) for r in rows]


def read_split(folder: str | Path, name: str, mmap: bool = True) -> Split:
    """Read a split written by prepare-split (arrays memory-mapped by default)."""
    folder = Path(folder)
    manifest = folder / f"{name}.csv"
    samples = read_manifest(folder, name)
    mode = "r" if mmap else None
    images = np.load(folder / f"{name}.npy", mmap_mode=mode)
    if images.shape[0] != len(samples):
        raise DataError(f"{folder / (name + '.npy')}: holds {images.shape[0]} images but {manifest} lists {len(samples)}")
    mask_file = folder / f"{name}_masks.npy"
    masks = np.load(mask_file, mmap_mode=mode) if mask_file.is_file() else None
    return Split(samples, images, masks)


def manifest_digest(folder: str | Path, name: str) -> str:
    """SHA-256 of a split's manifest: recorded in checkpoints to tie a model to the data it saw."""
    return hashlib.sha256((Path(folder) / f"{name}.csv").read_bytes()).hexdigest()


def categories_of(samples: Sequence[Sample]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(s.category for s in samples))


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) uint8 tensor on ``device`` (converted to float per batch)."""
    array = np.require(images, dtype=np.uint8, requirements=["C", "W"])  # copies a read-only memory map
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in [0, 1], channels-last (faster convolutions on CPU and GPU) unless the CPU numerics are
    pinned (:mod:`aead.training.numerics`)."""
    return (batch.float() / 255.0).contiguous(memory_format=memory_format())
